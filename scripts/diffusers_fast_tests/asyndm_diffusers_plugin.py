"""pytest plugin for running diffusers' own fast pipeline tests offline, optionally on asyndm.

Loaded with ``-p asyndm_diffusers_plugin`` (this folder on ``PYTHONPATH``); configured by
environment variables that ``scripts/diffusers_fast_tests.py`` sets:

``ASYNDM_STANDINS``
    JSON file ``{hub repo id: local folder}`` (see ``standins.py``). ``from_pretrained`` of
    transformers' tokenizers, configs and models (``PreTrainedTokenizerBase``,
    ``AutoTokenizer``, ``PreTrainedConfig``, ``AutoConfig``, ``PreTrainedModel``) is wrapped so
    that those repo ids load the local folder; every other id goes to the hub as usual (which,
    with ``HF_HUB_OFFLINE=1``, fails: those are the tests that need hub-only checkpoints).
``ASYNDM_SWAP``
    ``1``: at collection, every test class's ``pipeline_class`` (on the class or the base
    class that defines it) that *is* ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
    / ``StableDiffusion3Pipeline`` becomes ``AsynDMPipeline`` / ``AsynDMXLPipeline`` /
    ``AsynDMSD3Pipeline``. Only those exact (text-to-image) classes: img2img, inpaint, ...
    classes are other objects and are left alone.
``ASYNDM_SWAP_LOG``
    JSON file the plugin writes: which test classes were swapped (and which of the collected
    test classes have a ``pipeline_class`` that was not), so the runner can check the swap; and,
    per swapped pipeline, the parent ``__call__`` parameters missing from the subclass's
    ``inspect.signature`` (diffusers' older mixin returns early, i.e. passes without running,
    when a parameter it needs is not in the signature).

One shim, in both runs: diffusers' ``ReturnNameVisitor.get_ast_tree(cls)`` (used by
``test_encode_prompt_works_in_isolation``) looks ``cls.__name__`` up in ``diffusers.pipelines``
to read the source of ``cls.encode_prompt``, which fails for any class defined outside
diffusers. The wrapped version reads ``cls.encode_prompt`` itself when the name is not there;
for diffusers' own classes (the name resolves to ``cls``) it is the original.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import textwrap

_PATCHED = False


def _mapping() -> dict[str, str]:
    path = os.environ.get("ASYNDM_STANDINS")
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _patch_from_pretrained(mapping: dict[str, str]) -> None:
    global _PATCHED
    if _PATCHED or not mapping:
        return
    import transformers
    from transformers import AutoConfig, AutoTokenizer, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    config_base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    for owner in (PreTrainedTokenizerBase, AutoTokenizer, config_base, AutoConfig, PreTrainedModel):
        original = owner.__dict__["from_pretrained"]
        func = original.__func__  # a classmethod on every one of them

        @functools.wraps(func)
        def wrapper(cls, *args, __func=func, **kwargs):
            if args and isinstance(args[0], str) and args[0] in mapping:
                args = (mapping[args[0]],) + args[1:]
            name = kwargs.get("pretrained_model_name_or_path")
            if isinstance(name, str) and name in mapping:
                kwargs["pretrained_model_name_or_path"] = mapping[name]
            return __func(cls, *args, **kwargs)

        setattr(owner, "from_pretrained", classmethod(wrapper))
    _PATCHED = True


def _patch_return_name_visitor() -> None:
    import ast
    import importlib

    from diffusers.utils import source_code_parsing_utils as scp

    visitor = scp.ReturnNameVisitor
    if getattr(visitor.get_ast_tree, "_asyndm_shim", False):
        return
    original = visitor.get_ast_tree

    @functools.wraps(original)
    def get_ast_tree(self, cls, attribute_name="encode_prompt"):
        module = importlib.import_module(f"diffusers.{self._determine_parent_module(cls)}")
        if getattr(module, cls.__name__, None) is not None:
            return original(self, cls, attribute_name)
        source = textwrap.dedent(inspect.getsource(getattr(cls, attribute_name)))
        return ast.parse(source)

    get_ast_tree._asyndm_shim = True
    visitor.get_ast_tree = get_ast_tree


def pytest_configure(config):
    _patch_from_pretrained(_mapping())
    _patch_return_name_visitor()


def _missing_parameters(parent: type, sub: type) -> list[str]:
    """Parameters of ``parent.__call__`` that ``inspect.signature(sub.__call__)`` lacks."""
    have = inspect.signature(sub.__call__).parameters
    return [n for n in inspect.signature(parent.__call__).parameters if n not in have]


def _swap_map():
    from diffusers import (StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)

    from asyndm.pipeline import AsynDMPipeline, AsynDMXLPipeline
    from asyndm.pipeline_sd3 import AsynDMSD3Pipeline

    return {
        StableDiffusionPipeline: AsynDMPipeline,
        StableDiffusionXLPipeline: AsynDMXLPipeline,
        StableDiffusion3Pipeline: AsynDMSD3Pipeline,
    }


def pytest_collection_modifyitems(session, config, items):
    swap = os.environ.get("ASYNDM_SWAP") == "1"
    swap_map = _swap_map() if swap else {}
    import unittest

    swapped: dict[str, str] = {}
    kept: dict[str, str] = {}
    unittest_classes: set[str] = set()
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is None or not hasattr(cls, "pipeline_class"):
            continue
        for klass in cls.__mro__:
            value = vars(klass).get("pipeline_class")
            if value is not None and value in swap_map:
                setattr(klass, "pipeline_class", swap_map[value])
        name = f"{cls.__module__}.{cls.__qualname__}"
        if issubclass(cls, unittest.TestCase):
            unittest_classes.add(name)
        target = cls.pipeline_class
        label = (f"{target.__module__}.{target.__qualname__}" if isinstance(target, type)
                 else repr(target))
        (swapped if target in swap_map.values() else kept)[name] = label
    log = os.environ.get("ASYNDM_SWAP_LOG")
    if log:
        with open(log, "w", encoding="utf-8") as f:
            json.dump({"swap": swap, "swapped": swapped, "not_swapped": kept,
                       "unittest_classes": sorted(unittest_classes),
                       "missing_parameters": {sub.__name__: _missing_parameters(parent, sub)
                                              for parent, sub in swap_map.items()}}, f, indent=1)
