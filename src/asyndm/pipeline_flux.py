"""``AsynDMFluxPipeline``: DM, DM_concave or AsynDM on FLUX.1 dev / schnell (flow matching).

A thin subclass of diffusers' ``FluxPipeline`` (built with ``from_pretrained`` / ``from_pipe``)
whose ``__call__`` is the parent's, run with AsynDM switched on
(:class:`asyndm.hooks.AsynDMHooks`: :class:`~asyndm.schedulers_flow.AsynDMFlowMatchEulerScheduler`
on Flux's own sigmas, shift and resolution-dependent ``mu``; per-token timesteps from
:class:`asyndm.adapters.flux.FluxPerTokenTimestep`; subject masks from
:class:`asyndm.adapters.flux.FluxAttentionCapture`). Subject words are found with the T5
tokenizer (``tokenizer_2``), whose token ``p`` is text column ``p`` of the joint attention,
in ``prompt_2`` when it is given (T5 reads it), else in ``prompt``.

FLUX.1-dev embeds ``guidance_scale`` (guidance distillation, one model call per step);
schnell has no guidance embedding and is sampled in about 4 steps. ``true_cfg_scale`` with a
``negative_prompt`` (two calls per step) works too: the masks come from the first call.

Without subjects (or ``mode="dm"``) a call is the parent's. Maps, masks and timesteps are per
image token (a ``2 x 2`` latent patch), so ``masks`` and ``timestep_maps`` are ``(B, h, w)`` /
``(N, B, h, w)`` on the token grid, timesteps as float ``sigma * 1000``.
"""

from __future__ import annotations

from diffusers import FluxPipeline

from .pipeline import _CALL_DOC, AsynDMPipelineOutput, _AsynDMCall, asyndm_call

__all__ = ["AsynDMFluxPipeline", "AsynDMPipelineOutput"]


class AsynDMFluxPipeline(_AsynDMCall, FluxPipeline):
    """``FluxPipeline`` with asynchronous denoising per image token."""

    __call__ = asyndm_call(FluxPipeline, level_name="mask_layers")
    __call__.__doc__ = _CALL_DOC.replace(
        "mask_level: override of the attention level the masks are read at.",
        "mask_layers: double-stream blocks the masks are read from (default: middle third).",
    ).replace(
        """The scheduler may be DDIM (the paper's sampler; ``eta=1.0`` is the paper's setting,
        ``0.0`` the parent's default), Euler or Euler-ancestral.""",
        """The scheduler is Flux's FlowMatchEulerDiscreteScheduler (deterministic steps);
        subject words are looked up with the T5 tokenizer.""")
