"""The training-free competitors of the paper's Table 1, one module each, one interface.

| mode | method (source) | runs through | SDXL |
|---|---|---|---|
| ``cfgpp`` | CFG++, Chung et al. ICLR 2025 | pure DDIM loop | yes |
| ``s_cfg`` | S-CFG, Shen et al. CVPR 2024 | parent + probes + hook | yes |
| ``z_sampling`` | Z-Sampling, Bai et al. ICLR 2025 | pure DDIM loop | yes |
| ``seg`` | SEG, Hong NeurIPS 2024 | PAG pipeline + processor | yes |
| ``pag`` | PAG, Ahn et al. ECCV 2024 (diffusers core) | diffusers PAG pipeline | yes |
| ``attend_excite`` | Attend-and-Excite, Chefer et al. 2023 | pure DDIM loop + grads | yes |

SDXL runs every method (the pure DDIM loops build SDXL's pooled-text and size conditioning
as its pipeline does, asyndm.methods.common). Each module's docstring gives the equation,
the defaults and where they come from. Only ``attend_excite`` reads subjects.

``run_method(pipe, mode, params, call)`` generates; :data:`METHODS` is the registry the CLI and
the bench take their names from (``MODE:KEY=VALUE`` keys are the parameter fields).
"""

from __future__ import annotations

from .attend_excite import METHOD as _AE
from .base import Call, Method, ModelCalls, count_model_calls, params_dict, parse_params
from .cfgpp import METHOD as _CFGPP
from .pag import METHOD as _PAG
from .s_cfg import METHOD as _SCFG
from .seg import METHOD as _SEG
from .z_sampling import METHOD as _Z

__all__ = ["METHODS", "METHOD_NAMES", "Call", "Method", "ModelCalls", "count_model_calls",
           "method_params", "params_dict", "parse_params", "run_method", "split_mode"]

METHODS: dict[str, Method] = {m.name: m for m in (_CFGPP, _SCFG, _Z, _SEG, _PAG, _AE)}
METHOD_NAMES = tuple(METHODS)


def split_mode(text: str) -> tuple[str, dict[str, str]]:
    """``"MODE[:KEY=VALUE,...]"`` -> ``(MODE, {KEY: VALUE})`` (syntax only; keys unchecked)."""
    mode, _, rest = text.strip().partition(":")
    items: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"mode {text!r}: expected KEY=VALUE, got {item!r}")
        if key in items:
            raise ValueError(f"mode {text!r}: {key!r} given twice")
        items[key] = value
    return mode, items


def method_params(mode: str, items: dict[str, str] | None = None):
    """The parameters of ``mode`` from ``KEY=VALUE`` strings (defaults where not given)."""
    if mode not in METHODS:
        raise ValueError(f"unknown method {mode!r}; choose from {METHOD_NAMES}")
    return parse_params(METHODS[mode], items or {})


def run_method(pipe, mode: str, call: Call, params=None):
    """Generate ``call`` with method ``mode`` (``params``: its dataclass, default if None)."""
    method = METHODS.get(mode)
    if method is None:
        raise ValueError(f"unknown method {mode!r}; choose from {METHOD_NAMES}")
    if params is None:
        params = method.default_params()
    if not isinstance(params, method.params):
        raise ValueError(f"{mode}: params must be a {method.params.__name__}")
    return method.run(pipe, call, params)
