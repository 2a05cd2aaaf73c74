"""Prompt suites: the paper's format, object lists, the built-in suite, and clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from asyndm.bench.suites import SuiteError, load_suite, slug
from asyndm.bench.variants import (DEFAULT_CURVE, DEFAULT_K, DEFAULT_MASK_MODE,
                                   DEFAULT_MASK_THRESHOLD, default_variants, parse_variant,
                                   variant_dirname)

PAPER = Path(__file__).resolve().parent / "data" / "paper"  # the paper's prompt sets


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_paper_format_uses_item_indices_as_the_reference_does():
    suite = load_suite(PAPER / "animal.json")
    assert suite.name == "animal" and len(suite.entries) == 40
    e = suite.entries[0]
    assert e.prompt == "a cat eating a sandwich" and e.category == "animal"
    # item_idx [1, 4] = words "cat", "sandwich" = token positions 2 and 5 (0 is the start)
    assert e.subjects == ((2,), (5,)) and e.k == (0.7, 0.7)
    ids = [x.prompt_id for x in suite.entries]
    assert len(set(ids)) == 40 and all(re.fullmatch(r"[a-z0-9-]{1,60}", i) for i in ids)
    assert load_suite(PAPER / "animal.json") == suite  # ids are stable


def test_object_format_and_defaults(tmp_path):
    path = _write(tmp_path / "My Prompts!.json", [
        {"prompt": "a cat eating a sandwich", "subjects": ["cat", "sandwich#1"], "k": 0.4},
        {"prompt": "a red car", "subjects": [[2, 3]], "k": [0.6], "category": "colour"},
        {"prompt": "a red car"},  # duplicates are kept apart
        {"prompt": "a red car"},
    ])
    suite = load_suite(path)
    assert suite.name == "my-prompts"
    a, b, c, d = suite.entries
    assert a.subjects == ("cat", "sandwich#1") and a.k == (0.4, 0.4)
    assert a.category == "my-prompts" and b.category == "colour"
    assert b.subjects == ((2, 3),) and c.subjects == () and c.k is None
    assert len({a.prompt_id, b.prompt_id, c.prompt_id, d.prompt_id}) == 4


def test_a_prompt_list_without_item_file_has_no_subjects(tmp_path):
    suite = load_suite(_write(tmp_path / "plain.json", ["a cat", "a dog"]))
    assert [e.subjects for e in suite.entries] == [(), ()]


@pytest.mark.parametrize("data, expected", [
    ('[{"prompt": "a cat", ', "not valid JSON"),
    ({"prompt": "a cat"}, "expected a JSON list"),
    ([], "no prompts"),
    (["a cat", {"prompt": "a dog"}], r"entry 0 \('a cat'\).*do not mix"),
    ([{"prompt": "ok"}, {"prompt": 3}], r"entry 1 \('3'\): prompt must be a string"),
    ([{"prompt": "  "}], "prompt is empty"),
    ([{"prompt": "a\x00cat"}], "control characters"),
    ([{"prompt": "x" * 3000}], "longer than"),
    ([{"prompt": "a cat", "subject": ["cat"]}], r"entry 0 \('a cat'\): unknown keys"),
    ([{"prompt": "a cat", "subjects": ["cat"], "k": [0.5, 0.5]}], "list of 1 numbers"),
    ([{"prompt": "a cat", "subjects": ["cat"], "k": 1.5}], r"in \(0, 1\)"),
    ([{"prompt": "a cat", "subjects": ["cat"], "k": True}], "k must be"),
    ([{"prompt": "a cat", "k": 0.5}], "k given without subjects"),
    ([{"prompt": "a cat", "subjects": [0]}], "bad subject 0"),
    ([{"prompt": "a cat", "subjects": "cat"}], "subjects must be a list"),
    ([{"prompt": "a cat", "category": "../etc"}], "category"),
])
def test_validation_errors_name_file_and_entry(tmp_path, data, expected):
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(SuiteError, match=expected) as err:
        load_suite(path)
    assert str(path) in str(err.value)


def test_paper_item_file_errors(tmp_path):
    _write(tmp_path / "p.json", ["a cat eating a sandwich", "a dog"])
    item = {"item_idx": {"a cat eating a sandwich": [1, 4]},
            "item_k": {"a cat eating a sandwich": [0.7, 0.7]}}
    _write(tmp_path / "p_item.json", item)
    with pytest.raises(SuiteError, match=r"p_item.json: entry 1 \('a dog'\): no item_idx"):
        load_suite(tmp_path / "p.json")
    item["item_idx"]["a dog"], item["item_k"]["a dog"] = [1, "x"], [0.5, 0.5]
    _write(tmp_path / "p_item.json", item)
    with pytest.raises(SuiteError, match="entry 1.*word indices"):
        load_suite(tmp_path / "p.json")
    _write(tmp_path / "p_item.json", {"item_idx": []})
    with pytest.raises(SuiteError, match="item_idx"):
        load_suite(tmp_path / "p.json")


def test_missing_file_names_builtins(tmp_path):
    with pytest.raises(SuiteError, match="no such prompt file.*shapes"):
        load_suite(tmp_path / "nope.json")


def test_builtin_shapes_suite_and_shapes_suite_files(tmp_path):
    from asyndm.shapes.suite import SUITES

    suite = load_suite("shapes")
    assert suite.source == "builtin:shapes" and suite.kind == "shapes" and suite.entries
    assert all(e.subjects and e.k and len(e.k) == len(e.subjects) for e in suite.entries)
    copy = tmp_path / "mine.json"
    copy.write_text(SUITES["shapes"].read_text())
    from_file = load_suite(copy)
    assert from_file.kind == "shapes" and from_file.entries == suite.entries


def test_slug_is_bounded_and_safe():
    assert slug("A cat / ../../etc: 'x'") == "a-cat-etc-x"
    assert slug("¿¿??") == "x" and len(slug("word " * 50)) <= 40


def test_variant_syntax():
    v = parse_variant("asyndm:curve=piecewise, k=0.50 ,mask=static,thr=1.2")
    assert (v.mode, v.curve, v.k, v.mask_mode, v.mask_threshold) == (
        "asyndm", "piecewise", 0.5, "static", 1.2)
    assert v.name == "asyndm:curve=piecewise,k=0.5,mask=static,thr=1.2"
    assert parse_variant("asyndm:k=0.3,name=weak").name == "weak"
    assert [x.name for x in default_variants(["dm", "dm_concave", "asyndm"])] == [
        "dm", "dm_concave", "asyndm"]
    assert variant_dirname("dm") == "dm"
    names = {variant_dirname(n) for n in ("asyndm:k=0.5", "asyndm_k-0.5", "asyndm:k-0.5")}
    assert len(names) == 3 and all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names)


def test_variant_guidance_key():
    v = parse_variant("dm:guidance=4.0")
    assert (v.name, v.guidance, v.guidance_or(2.0)) == ("dm:guidance=4", 4.0, 4.0)
    assert parse_variant("dm").guidance_or(2.0) == 2.0 and "guidance" not in parse_variant(
        "dm").settings()
    s = parse_variant("s_cfg:guidance=3")
    assert s.name == "s_cfg:guidance=3" and s.settings()["guidance"] == 3.0 and not s.params
    z = parse_variant("z_sampling:zigzag=2,guidance=5")
    assert z.name == "z_sampling:zigzag=2,guidance=5" and z.guidance == 5.0
    assert dict(z.params) == {"zigzag": "2"}


@pytest.mark.parametrize("text, expected", [
    ("ddim", "unknown mode"), ("dm:curve=piecewise", "no effect"),
    ("dm_concave:mask=static", "no effect"), ("asyndm:k", "KEY=VALUE"),
    ("asyndm:k=2", r"\(0, 1\)"), ("asyndm:k=x", "could not convert"),
    ("asyndm:curve=cubic", "unknown curve"), ("asyndm:thr=0", "> 0"),
    ("asyndm:k=0.5,k=0.4", "twice"), ("asyndm:name=a b", "variant name"),
    ("asyndm:colour=red", "unknown key"), ("dm:guidance=-1", ">= 0"),
    ("cfgpp:guidance=3", "lam replaces"), ("s_cfg:guidance=x", "could not convert"),
])
def test_variant_errors(text, expected):
    with pytest.raises(ValueError, match=expected):
        parse_variant(text)


def test_variant_defaults_are_the_pipelines():
    import inspect

    from asyndm.pipeline import AsynDMPipeline

    params = inspect.signature(AsynDMPipeline.__call__).parameters
    assert params["curve"].default == DEFAULT_CURVE
    assert params["mask_mode"].default == DEFAULT_MASK_MODE
    assert params["mask_threshold"].default == DEFAULT_MASK_THRESHOLD
    assert params["k"].default == DEFAULT_K


@pytest.mark.parametrize("name", ["animal", "drawbench", "geneval", "mscoco"])
def test_every_paper_suite_loads_with_subjects_for_each_prompt(name):
    suite = load_suite(PAPER / f"{name}.json")
    assert suite.name == name and suite.entries
    assert all(e.subjects and len(e.k) == len(e.subjects) for e in suite.entries)
