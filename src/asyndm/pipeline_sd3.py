"""``AsynDMSD3Pipeline``: DM, DM_concave or AsynDM on SD3 / SD3.5 (MMDiT, flow matching).

A thin subclass of diffusers' ``StableDiffusion3Pipeline`` (built with ``from_pretrained`` /
``from_pipe``; ``text_encoder_3=None, tokenizer_3=None`` drops T5 as in diffusers) whose
``__call__`` is the parent's, run with AsynDM switched on (:class:`asyndm.hooks.AsynDMHooks`:
:class:`~asyndm.schedulers_flow.AsynDMFlowMatchEulerScheduler`, per-token timesteps from
:class:`asyndm.adapters.sd3.PerTokenTimestep` and subject masks from
:class:`asyndm.adapters.sd3.JointAttentionCapture`). Subject words are found with the first
CLIP tokenizer, whose token ``p`` is text column ``p`` of the joint attention.

Without subjects (or ``mode="dm"``) a call is the parent's. Maps, masks and timesteps are
per image token (a ``2 x 2`` latent patch), so ``masks`` and ``timestep_maps`` are
``(B, h, w)`` / ``(N, B, h, w)`` on the token grid, timesteps as float ``sigma * 1000``.
"""

from __future__ import annotations

from diffusers import StableDiffusion3Pipeline

from .pipeline import _CALL_DOC, AsynDMPipelineOutput, _AsynDMCall, asyndm_call

__all__ = ["AsynDMPipelineOutput", "AsynDMSD3Pipeline"]


class AsynDMSD3Pipeline(_AsynDMCall, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` with asynchronous denoising per image token."""

    __call__ = asyndm_call(StableDiffusion3Pipeline, level_name="mask_layers")
    __call__.__doc__ = _CALL_DOC.replace(
        "mask_level: override of the attention level the masks are read at.",
        "mask_layers: transformer blocks the masks are read from (default: middle third).")
