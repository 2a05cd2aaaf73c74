"""asyndm: asynchronous denoising (AsynDM, arXiv 2510.04504) for diffusers text-to-image models.

``asyndm.enable(pipe, subjects=[...], k=...)`` switches AsynDM on for a diffusers pipeline
object; ``asyndm.compile_denoiser(pipe, mode)`` compiles its denoiser (DM and AsynDM);
``asyndm.embedded_model_path()`` is the package's own small model. Names are
imported on first use, so ``import asyndm`` (and ``asyndm --help``) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "enable": ("asyndm.hooks", "enable"),
    "compile_denoiser": ("asyndm.compile", "compile_denoiser"),
    "embedded_model_path": ("asyndm.loading", "embedded_model_path"),
    # the embedded model's model_index.json names its VAE stand-in as ("asyndm", this)
    "PixelShuffleVAE": ("asyndm.pixel_vae", "PixelShuffleVAE"),
    # diffusers' loader finds a component's load method by looking its base classes up in
    # the component's library (here: this package), so the VAE stand-in's base is named too
    "ModelMixin": ("diffusers", "ModelMixin"),
}
__all__ = sorted(set(_LAZY) - {"ModelMixin"})


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'asyndm' has no attribute {name!r}")
