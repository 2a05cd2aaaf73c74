"""What several methods share: the DDIM loop over a pipeline's components, attention probes
and the two smoothing kernels.

The loop pieces (:func:`prepare`, :func:`unet_out`, :func:`cfg`, :func:`finish`) repeat the
operations of ``StableDiffusionPipeline.__call__`` in its order -- prompt encoding,
``set_timesteps``, ``prepare_latents`` with the call's generators, the batched
``[uncond; cond]`` UNet call, ``scheduler.step`` with ``eta`` and the generators, the VAE
decode, the safety checker and ``postprocess`` -- so a loop built from them with the plain
CFG rule gives DM's image bit for bit (``tests/test_methods.py`` checks it), and a method
that changes one stage is paired with DM in every other. For SDXL they repeat
``StableDiffusionXLPipeline.__call__``'s instead: the pooled text embeddings and size
conditioning (``added_cond_kwargs``) travel with the prompt embeddings in :class:`Cond`, and
the decode follows SDXL's (VAE upcast, latents mean / std, watermark; no safety checker).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.attention import module_level
from .base import Call

__all__ = ["Cond", "LoopInputs", "ProbeStore", "attention_blocks", "ae_kernel", "blur_queries",
           "cfg", "finish", "probes", "prepare", "smooth_maps", "to_eps", "unet_out"]


@dataclass(frozen=True)
class Cond:
    """Rows of the UNet's text conditioning; indexing a :class:`Cond` takes rows of each."""

    hidden: torch.Tensor
    """``(R, L, D)`` prompt embeddings (``encoder_hidden_states``)."""
    added: dict[str, torch.Tensor] | None = None
    """SDXL's ``added_cond_kwargs``: ``text_embeds`` ``(R, P)``, ``time_ids`` ``(R, 6)``."""

    def __getitem__(self, rows: slice) -> Cond:
        added = None if self.added is None else {k: v[rows] for k, v in self.added.items()}
        return Cond(self.hidden[rows], added)

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


@dataclass
class LoopInputs:
    """What one call's loop starts from."""

    embeds: Cond
    """``2B`` rows ``[negative; positive]`` of the prompt's conditioning."""
    latents: torch.Tensor
    """``(B, C, h, w)`` initial noise (scaled by ``init_noise_sigma``)."""
    timesteps: torch.Tensor
    """``(N,)`` the scheduler's timesteps."""
    step_kwargs: dict
    """``eta`` / ``generator`` for ``scheduler.step`` (what the scheduler accepts)."""
    device: torch.device


def _is_sdxl(pipe) -> bool:
    from diffusers import StableDiffusionXLPipeline

    return isinstance(pipe, StableDiffusionXLPipeline)


def _sdxl_cond(pipe, call: Call, device, height: int, width: int) -> Cond:
    """SDXL's ``[negative; positive]`` conditioning as its ``__call__`` builds it (default
    size conditioning: original and target size ``(height, width)``, no crop)."""
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        call.prompt, device=device, num_images_per_prompt=call.num_images,
        do_classifier_free_guidance=True, negative_prompt=call.negative_arg())
    projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                  else pipe.text_encoder_2.config.projection_dim)
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pos.dtype,
                                      text_encoder_projection_dim=projection)  # (1, 6)
    rows = 2 * call.num_images
    return Cond(torch.cat([neg, pos]),  # (2B, L, D)
                {"text_embeds": torch.cat([neg_pooled, pooled]).to(device),  # (2B, P)
                 "time_ids": time_ids.to(device).repeat(rows, 1)})  # (2B, 6)


def prepare(pipe, call: Call) -> LoopInputs:
    """Encode the prompt, set the timesteps and draw the initial latents, as the parent does."""
    device = pipe._execution_device
    xl = _is_sdxl(pipe)
    size = pipe.default_sample_size if xl else pipe.unet.config.sample_size
    height = call.height or size * pipe.vae_scale_factor
    width = call.width or size * pipe.vae_scale_factor
    if xl:
        embeds = _sdxl_cond(pipe, call, device, height, width)
    else:
        pos, neg = pipe.encode_prompt(call.prompt, device, call.num_images, True,
                                      call.negative_arg())
        embeds = Cond(torch.cat([neg, pos]))  # (2B, L, D)
    pipe.scheduler.set_timesteps(call.steps, device=device)
    gens = call.generator_arg()
    latents = pipe.prepare_latents(call.num_images, pipe.unet.config.in_channels, height, width,
                                   embeds.dtype, device, gens, None)  # (B, C, h, w)
    step_kwargs = pipe.prepare_extra_step_kwargs(gens, call.eta if call.eta is not None else 0.0)
    return LoopInputs(embeds, latents, pipe.scheduler.timesteps, step_kwargs, device)


def unet_out(pipe, x: torch.Tensor, t, embeds: Cond) -> torch.Tensor:
    """The UNet's raw output for ``x`` ``(R, C, h, w)`` and ``R`` rows of ``embeds``."""
    x = pipe.scheduler.scale_model_input(x, t)
    return pipe.unet(x, t, encoder_hidden_states=embeds.hidden, timestep_cond=None,
                     cross_attention_kwargs=None, added_cond_kwargs=embeds.added,
                     return_dict=False)[0]


def cfg(pipe, x: torch.Tensor, t, embeds: Cond, scale: float) -> torch.Tensor:
    """Classifier-free guided output, exactly the parent's arithmetic: one batched call
    (``scale <= 1``: the conditional branch alone, as the parent does without guidance)."""
    if scale <= 1:
        return unet_out(pipe, x, t, embeds[x.shape[0]:])
    uncond, text = unet_out(pipe, torch.cat([x] * 2), t, embeds).chunk(2)  # (B, C, h, w) each
    return uncond + scale * (text - uncond)


def finish(pipe, latents: torch.Tensor, call: Call, dtype: torch.dtype):
    """Decode, safety-check and post-process as the parent does; ``"latent"`` returns them."""
    if call.output_type == "latent":
        return latents
    if _is_sdxl(pipe):
        return _finish_sdxl(pipe, latents, call)
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                            generator=call.generator_arg())[0]
    image, nsfw = pipe.run_safety_checker(image, latents.device, dtype)
    denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
    return pipe.image_processor.postprocess(image, output_type=call.output_type,
                                            do_denormalize=denorm)


def _finish_sdxl(pipe, latents: torch.Tensor, call: Call):
    """SDXL's decode: the fp16 VAE upcast, latents mean / std if configured, watermark."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        pipe.upcast_vae()
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    elif latents.dtype != vae.dtype:
        latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        c = latents.shape[1]
        mean = torch.tensor(mean).view(1, c, 1, 1).to(latents)
        std = torch.tensor(std).view(1, c, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    if pipe.watermark is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type=call.output_type)


def to_eps(out: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor,
           prediction_type: str) -> torch.Tensor:
    """A network output as epsilon: ``eps = sqrt(ab) v + sqrt(1 - ab) x`` for v-prediction."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * out + (1 - alpha_bar).sqrt() * x
    raise ValueError(f"prediction type {prediction_type!r} is not supported here "
                     "(epsilon or v_prediction)")


# --- smoothing kernels -----------------------------------------------------------------------

def ae_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """``(size, size)`` kernel of the ``GaussianSmoothing`` that Attend-and-Excite and S-CFG
    use: ``exp(-((x - m) / (2 sigma))^2)`` per axis, i.e. a Gaussian of standard deviation
    ``sigma * sqrt(2)``, normalised to sum 1."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def smooth_maps(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Smooth ``(N, h, w)`` maps with a ``(k, k)`` kernel, reflect padding (same size)."""
    pad = kernel.shape[-1] // 2
    x = F.pad(maps[:, None].float(), (pad, pad, pad, pad), mode="reflect")  # (N, 1, h+2p, w+2p)
    return F.conv2d(x, kernel.to(x.device)[None, None])[:, 0]  # (N, h, w)


def blur_queries(q: torch.Tensor, sigma: float) -> torch.Tensor:
    """SEG's query blur: ``(B, C, h, w)`` queries convolved with a Gaussian of ``sigma``.

    Kernel size ``ceil(6 sigma) + 1`` made odd, capped by the map's short side (kept odd),
    reflect padding; ``sigma = inf`` is the infinite blur, every query the spatial mean.
    """
    if math.isinf(sigma):
        return q.mean(dim=(-2, -1), keepdim=True).expand_as(q)
    size = math.ceil(6 * sigma) + 1
    size -= 1 - size % 2  # odd
    short = min(q.shape[-2:])
    size = min(size, short if short % 2 else short - 1)
    x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, device=q.device)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = (g / g.sum()).to(q.dtype)
    kernel = (g[:, None] * g[None, :]).expand(q.shape[1], 1, size, size)  # (C, 1, k, k)
    pad = size // 2
    return F.conv2d(F.pad(q, (pad, pad, pad, pad), mode="reflect"), kernel, groups=q.shape[1])


# --- attention probes ------------------------------------------------------------------------

def attention_blocks(unet: nn.Module) -> dict[str, tuple[int, nn.Module, nn.Module | None]]:
    """Per transformer block with cross-attention: ``prefix -> (level, attn1, attn2)``."""
    num_down, num_up = len(unet.down_blocks), len(unet.up_blocks)
    mods = dict(unet.named_modules())
    out = {}
    for name, mod in mods.items():
        if name.endswith(".attn2") and getattr(mod, "is_cross_attention", False):
            prefix = name[: -len("attn2")]
            level = module_level(name, num_down, num_up)
            if level is not None:
                out[prefix] = (level, mods.get(prefix + "attn1"), mod)
    return out


class ProbeStore:
    """Head-averaged attention probabilities of one UNet call, per (level, kind)."""

    def __init__(self) -> None:
        self.maps: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)

    def clear(self) -> None:
        self.maps = defaultdict(list)


class _Probe:
    """Delegates the output to the layer's own processor and records its probabilities
    (float32 softmax of the layer's own queries and keys, mean over heads). The recorded
    maps keep their autograd graph, so a loss on them reaches the latents."""

    def __init__(self, inner, store: ProbeStore, level: int, kind: str) -> None:
        self.inner, self.store, self.level, self.kind = inner, store, level, kind

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        ctx = args[0] if args else kwargs.get("encoder_hidden_states")
        x = hidden_states.flatten(2).transpose(1, 2) if hidden_states.ndim == 4 else hidden_states
        if ctx is None:
            ctx = x
        elif getattr(attn, "norm_cross", None):
            ctx = attn.norm_encoder_hidden_states(ctx)
        q, k = attn.to_q(x), attn.to_k(ctx)  # (R, N, H*d), (R, L, H*d)
        r, n, inner = q.shape
        heads = attn.heads
        q = q.reshape(r, n, heads, inner // heads).transpose(1, 2)  # (R, H, N, d)
        k = k.reshape(r, k.shape[1], heads, inner // heads).transpose(1, 2)  # (R, H, L, d)
        probs = (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(-1)  # (R,H,N,L)
        self.store.maps[(self.level, self.kind)].append(probs.mean(1))  # (R, N, L)
        return out


@contextmanager
def probes(unet: nn.Module, levels: set[int], store: ProbeStore,
           self_attention: bool = False) -> Iterator[None]:
    """Install probes on the cross- (and self-) attention layers at ``levels``; restore on
    exit. Raises ``ValueError`` when no layer sits at those levels."""
    chosen = [(lvl, a1, a2) for lvl, a1, a2 in attention_blocks(unet).values() if lvl in levels]
    if not chosen:
        raise ValueError(f"this UNet has no cross-attention layers at level(s) {sorted(levels)}")
    originals = []
    for lvl, a1, a2 in chosen:
        pairs = [(a2, "cross")] + ([(a1, "self")] if self_attention and a1 is not None else [])
        for mod, kind in pairs:
            originals.append((mod, mod.processor))
            mod.set_processor(_Probe(mod.processor, store, lvl, kind))
    try:
        yield
    finally:
        for mod, proc in originals:
            mod.set_processor(proc)
