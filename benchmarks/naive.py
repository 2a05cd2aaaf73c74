"""A naive AsynDM adapter pair: the baseline that shows what the real adapters save.

Both classes plug into the same seams as :mod:`asyndm.adapters` (module hooks, attention
processors) and compute the same thing, the obvious way:

* :class:`NaivePerPixelTimestep` embeds the timestep of *every* latent pixel (sinusoid and
  time MLP on a ``(B * h * w,)`` vector), and every ResNet projects that full-resolution
  embedding with its ``time_emb_proj`` before subsampling it (nearest) to its own
  resolution. :class:`asyndm.adapters.unet.PerPixelTimestep` embeds only the distinct
  timesteps (2-4) and gathers.
* :class:`NaiveAttentionCapture` replaces the processor of *every* attention layer,
  self-attention included, with one that materialises ``softmax(Q K^T)``, and keeps the
  subject-token columns of the cross-attention layers at the mask level.
  :class:`asyndm.adapters.attention.AttentionCapture` leaves every layer on its fused
  kernel and recomputes ``Q K^T`` only for the conditional rows of a few 16x16 layers.

Only what Stable Diffusion 1.x / 2.x UNets use is supported (no added embeddings, no
attention masks, no spatial or group norm inside attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from asyndm.adapters.attention import choose_level, cross_attention_layers, level_size
from asyndm.adapters.unet import check_unet_supported


class NaivePerPixelTimestep:
    """Per-pixel time embedding at full latent resolution (context manager)."""

    def __init__(self, unet: nn.Module, num_timesteps: int = 1000) -> None:
        # num_timesteps: the interface of asyndm's PerPixelTimestep (no table here)
        check_unet_supported(unet)
        cfg = unet.config
        if cfg.addition_embed_type is not None or cfg.class_embed_type is not None:
            raise ValueError("the naive adapter supports UNets without added embeddings only")
        self.unet = unet
        self._handles: list[RemovableHandle] = []
        self._t_map: torch.Tensor | None = None  # (B, h, w) int64 while a map call runs
        self._dtype = torch.float32
        self._emb: torch.Tensor | None = None  # (B, h, w, C) full-resolution embedding

    def __enter__(self) -> "NaivePerPixelTimestep":
        unet = self.unet
        add = self._handles.append
        add(unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
        add(unet.register_forward_hook(self._unet_post))
        add(unet.time_embedding.register_forward_hook(self._zero_when_active))
        for mod in unet.modules():
            if type(mod).__name__ == "ResnetBlock2D" and mod.time_emb_proj is not None:
                add(mod.time_emb_proj.register_forward_hook(self._zero_when_active))
                add(mod.conv1.register_forward_hook(self._make_conv1_hook(mod)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._t_map = self._emb = None

    # the interface asyndm.hooks.AsynDMHooks installs adapters through
    install, remove = __enter__, __exit__

    def _unet_pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self._t_map = self._emb = None
        if not torch.is_tensor(t) or t.ndim <= 1:
            return None
        t_map = t[:, 0] if t.ndim == 4 else t  # (B, h, w)
        self._t_map, self._dtype = t_map.long(), sample.dtype
        placeholder = t_map.flatten(1)[:, 0]  # (B,): its embedding is zeroed
        if len(args) > 1:
            return (args[0], placeholder, *args[2:]), kwargs
        return args, {**kwargs, "timestep": placeholder}

    def _unet_post(self, module, args, output):
        self._t_map = self._emb = None
        return output

    def _zero_when_active(self, module, args, output):
        return None if self._t_map is None else torch.zeros_like(output)

    def _embedding(self) -> torch.Tensor:
        """``(B, h, w, C)``: sinusoid and time MLP of every pixel's timestep."""
        if self._emb is None:
            unet, t_map = self.unet, self._t_map
            t_emb = unet.time_proj(t_map.flatten()).to(self._dtype)  # (B*h*w, C0)
            emb = unet.time_embedding.forward(t_emb)  # (B*h*w, C)
            if unet.time_embed_act is not None:
                emb = unet.time_embed_act(emb)
            self._emb = emb.reshape(*t_map.shape, emb.shape[-1])  # (B, h, w, C)
        return self._emb

    def _make_conv1_hook(self, resnet: nn.Module):
        def hook(module, args, output):
            if self._t_map is None:
                return None
            temb = self._embedding()
            if not resnet.skip_time_act:
                temb = resnet.nonlinearity(temb)
            full = resnet.time_emb_proj.forward(temb)  # (B, H, W, C_out) at latent size
            full = full.permute(0, 3, 1, 2)  # (B, C_out, H, W)
            if full.shape[-2:] != output.shape[-2:]:
                # (B, C_out, H, W) -> (B, C_out, h, w)
                full = F.interpolate(full, size=output.shape[-2:], mode="nearest")
            return output + full

        return hook


class _MaskLevelStore:
    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None  # (B, P)
        self.rows: slice = slice(None)
        self.total: torch.Tensor | None = None  # (B, N, P)
        self.count = 0


class FullSoftmaxProcessor:
    """Attention with ``softmax(Q K^T)`` materialised; optionally records subject columns."""

    def __init__(self, store: _MaskLevelStore, keep: bool) -> None:
        self.store = store
        self.keep = keep

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if (attention_mask is not None or attn.spatial_norm is not None
                or attn.group_norm is not None):
            raise NotImplementedError("attention masks, spatial and group norm are not supported")
        residual = hidden_states
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        x = hidden_states
        if shape4 is not None:
            x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, N, C)
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)  # (B, N|L, H*d)
        bsz, n_q, inner = q.shape
        heads = attn.heads
        q = q.reshape(bsz, n_q, heads, inner // heads).transpose(1, 2)  # (B, H, N, d)
        k = k.reshape(bsz, -1, heads, inner // heads).transpose(1, 2)  # (B, H, L, d)
        v = v.reshape(bsz, -1, heads, inner // heads).transpose(1, 2)  # (B, H, L, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        scores = (q @ k.transpose(-1, -2)) * attn.scale  # (B, H, N, L), materialised
        probs = scores.softmax(dim=-1) if not attn.upcast_softmax else scores.float().softmax(-1)
        st = self.store
        if self.keep and st.positions is not None:
            rows = probs[st.rows].float()  # (B', H, N, L)
            pos = st.positions[:, None, None, :].expand(-1, heads, n_q, -1)  # (B', H, N, P)
            kept = rows.gather(-1, pos).mean(dim=1)  # (B', N, P)
            st.total = kept if st.total is None else st.total + kept
            st.count += 1
        out = probs.to(v.dtype) @ v  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(bsz, n_q, inner)  # (B, N, H*d)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if shape4 is not None:
            out = out.transpose(1, 2).reshape(shape4)  # (B, C, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class NaiveAttentionCapture:
    """Full-softmax processors on every attention layer; same interface as ``AttentionCapture``."""

    def __init__(self, unet: nn.Module, latent_hw: tuple[int, int], level: int | None = None):
        self.unet = unet
        self.level = choose_level(unet, latent_hw) if level is None else level
        self.map_hw = level_size(latent_hw, self.level)
        self._weights: torch.Tensor | None = None
        self.kept = {name for name, (lvl, _) in cross_attention_layers(unet).items()
                     if lvl == self.level}
        self._store = _MaskLevelStore()
        self._originals: dict | None = None

    def __enter__(self) -> "NaiveAttentionCapture":
        self._originals = dict(self.unet.attn_processors)
        procs = {}
        for key in self._originals:
            layer = key.removesuffix(".processor")
            procs[key] = FullSoftmaxProcessor(self._store, keep=layer in self.kept)
        self.unet.set_attn_processor(procs)
        return self

    def __exit__(self, *exc) -> None:
        if self._originals is not None:
            self.unet.set_attn_processor(self._originals)
            self._originals = None

    install, remove = __enter__, __exit__

    def start(self, positions: torch.Tensor, rows: slice = slice(None),
              weights: torch.Tensor | None = None, text: torch.Tensor | None = None) -> None:
        st = self._store
        st.positions, st.rows, st.total, st.count = positions, rows, None, 0
        self._weights = weights  # (B, S, P) subject averaging, or None

    def stop(self) -> torch.Tensor:
        """``(B, P, hm, wm)`` (with weights: ``(B, S, hm, wm)``): mean over heads, then over
        the mask-level layers."""
        st = self._store
        mean = st.total / st.count  # (B, N, P)
        st.positions, st.total, st.count = None, None, 0
        if self._weights is not None:  # the subjects: weighted means of their columns
            mean = torch.bmm(mean, self._weights.to(mean).transpose(1, 2))  # (B, N, S)
        bsz, _, n_maps = mean.shape
        return mean.transpose(1, 2).reshape(bsz, n_maps, *self.map_hw)  # (B, P | S, hm, wm)
