"""``asyndm.compile_denoiser(pipe, mode)``: ``torch.compile`` the denoiser of a pipeline, for
DM and AsynDM alike.

What is compiled is the model's ``forward`` (the UNet, a ControlNet, or SD3's / Flux's
transformer), in place, not the module: AsynDM's hooks on the module (the timestep map in,
the attention capture started, the run's tables made or found) stay eager, outside the
compiled region, so the region sees explicit tensors and no cache checks. Inside it the
per-pixel adapters only look up and add (:mod:`asyndm.adapters.unet`,
:mod:`asyndm.adapters.attention`), with shapes that do not depend on the map's values:
the map changes every step and nothing is compiled again.

Compiled graphs, one per configuration the pipeline meets (counted on SD's UNet with a
counting backend, ``tests/test_compile.py``): DM; AsynDM's map path (every step where a
pixel lags); the model's own path with AsynDM installed (the last step, where every pixel
is back on the ladder); and the same without capture for ``dm_concave``. A second run of
the same kind compiles nothing.

``mode="reduce-overhead"`` adds CUDA graphs (on a CUDA device): every step's inputs are
copied into the graph's buffers, and what AsynDM reads from a call (the captured attention)
is read before the next call, as CUDA graphs require.
"""

from __future__ import annotations

# torch is imported where it is used: the CLI reads COMPILE_MODES before anything loads
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
"""``off`` restores the eager ``forward``; the others are ``torch.compile`` modes."""

_DENOISERS = ("unet", "controlnet", "transformer")


def compile_denoiser(pipe, mode: str = "default", *, backend="inductor",
                     fullgraph: bool = False):
    """Compile (or, with ``mode="off"``, un-compile) the ``forward`` of ``pipe``'s denoisers.

    Args:
        pipe: a diffusers pipeline (any: with ``unet``, ``controlnet`` or ``transformer``).
        mode: one of :data:`COMPILE_MODES`.
        backend: ``torch.compile``'s backend (``"inductor"``; tests use counting backends).
        fullgraph: ``torch.compile``'s ``fullgraph`` (an error at any graph break).

    Returns:
        ``pipe``, compiled in place. Each mode's compiled ``forward`` is kept on the model,
        so switching between modes (and ``off``) compiles nothing twice.
    """
    import torch

    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose from {COMPILE_MODES}")
    models = [m for m in (getattr(pipe, n, None) for n in _DENOISERS)
              if isinstance(m, torch.nn.Module)]
    if not models:
        raise ValueError(f"{type(pipe).__name__} has no unet, controlnet or transformer "
                         "to compile")
    for model in models:
        state = model.__dict__.get("_asyndm_compile")  # (eager forward, {key: compiled})
        if mode == "off":
            if state is not None and "forward" in model.__dict__:
                del model.forward  # the class's own forward again
            continue
        if state is None:
            state = model.__dict__["_asyndm_compile"] = (model.forward, {})
        key = (mode, backend, fullgraph)
        compiled = state[1].get(key)
        if compiled is None:  # kept: switching back and forth compiles nothing again
            # "default" is torch.compile's own default mode
            compiled = state[1][key] = torch.compile(
                state[0], mode=None if mode == "default" else mode, backend=backend,
                fullgraph=fullgraph)
        model.__dict__["forward"] = compiled
    return pipe
