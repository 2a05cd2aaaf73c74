"""Per-pixel time embedding for diffusers' ``UNet2DConditionModel``, through hooks only.

While :class:`PerPixelTimestep` is installed, the UNet accepts a timestep *map*
``(B, h, w)`` (or ``(B, 1, h, w)``) of integer timesteps wherever it accepted a timestep.
Scalar and ``(B,)`` timesteps still take the UNet's own path untouched.

How it works (no diffusers code is copied or patched):

1. A forward-pre hook on the UNet takes the map out of the call and hands the UNet a
   placeholder ``(B,)`` timestep.
2. A forward hook on ``unet.time_embedding`` returns zeros, so the per-sample embedding the
   UNet builds is exactly the *extra* part (SDXL's ``text_time`` addition, class
   embeddings), which a pre-hook on ``time_embed_act`` (or on the first ResNet) records.
3. Only the *distinct* timesteps of the map are embedded (sinusoid, then the time MLP, plus
   the per-sample extra): a table ``(B, U, C)`` with ``U`` usually 2-4.
4. In every ResNet block a forward hook on ``time_emb_proj`` returns zeros (cancelling the
   broadcast ``temb`` add), and a forward hook on ``conv1`` adds the block's projection of
   the table, gathered through the map resized (nearest) to that block's own resolution.
   Since ``conv1(h) + temb`` is exactly where diffusers adds the embedding for
   ``time_embedding_norm="default"``, the block computes what it would for a uniform map.

Cost: every operator counts (a fast GPU running SD at batch 1-2 waits on the host's
operator dispatch), so each ResNet adds two: its ``(B, U)``-row projection and one
``baddbmm`` that gathers and adds at once (``conv1 + proj @ one_hot``, the one-hot of the
map at the block's resolution holding a single 1 per pixel, so the sum is exact). The
activation of the table, the zeros and the per-resolution one-hot maps are made once per
call (the zeros once per install).

Removing the hooks (``remove()`` or leaving the ``with`` block) restores the UNet exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle


class UnsupportedModelError(ValueError):
    """The model's configuration cannot take per-pixel timesteps through these hooks."""


def check_unet_supported(unet: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming the first unsupported feature."""
    cfg = unet.config
    if getattr(cfg, "class_embeddings_concat", False):
        raise UnsupportedModelError("class_embeddings_concat=True is not supported")
    if getattr(cfg, "time_cond_proj_dim", None) is not None:
        raise UnsupportedModelError("timestep_cond (LCM-style time_cond_proj_dim) is not supported")
    for name, mod in unet.named_modules():
        kind = type(mod).__name__
        if kind == "ResnetBlockCondNorm2D":
            raise UnsupportedModelError(f"{name}: ResnetBlockCondNorm2D is not supported")
        if kind == "ResnetBlock2D" and mod.time_emb_proj is not None:
            if mod.time_embedding_norm != "default":
                raise UnsupportedModelError(
                    f"{name}: time_embedding_norm={mod.time_embedding_norm!r} is not supported "
                    "(only 'default', as in SD 1.x/2.x and SDXL)"
                )


def _as_map(t: torch.Tensor, sample: torch.Tensor) -> torch.Tensor | None:
    """Return ``t`` as a ``(B, h, w)`` int64 map, or ``None`` if it is a scalar / vector."""
    if t.ndim <= 1:
        return None
    if t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]  # (B, 1, h, w) -> (B, h, w)
    bsz, _, h, w = sample.shape
    if t.ndim != 3 or t.shape != (bsz, h, w):
        raise ValueError(
            f"timestep map must be (B, h, w) = {(bsz, h, w)} for a sample of shape "
            f"{tuple(sample.shape)}, got {tuple(t.shape)}"
        )
    return t.long()


@dataclass
class _CallState:
    """What one UNet call needs across its hooks; reset at every call."""

    inverse: torch.Tensor | None = None  # (B, h, w) index into `values`
    values: torch.Tensor | None = None  # (U,) distinct timesteps
    dtype: torch.dtype = torch.float32
    extra: torch.Tensor | None = None  # (B, C) per-sample embedding before the activation
    emb: torch.Tensor | None = None  # (B, U, C) full embedding after the activation
    acts: dict[type, torch.Tensor] = field(default_factory=dict)  # ResNet act -> (B, U, C)
    one_hot: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (B, U, h*w)


class PerPixelTimestep:
    """Install per-pixel time-embedding hooks on a ``UNet2DConditionModel``.

    Use as a context manager (``with PerPixelTimestep(unet): unet(x, t_map, ...)``) or call
    :meth:`install` / :meth:`remove`.
    """

    def __init__(self, unet: nn.Module) -> None:
        check_unet_supported(unet)
        self.unet = unet
        self._handles: list[RemovableHandle] = []
        self._state: _CallState | None = None
        self._zeros: dict[tuple, torch.Tensor] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def install(self) -> "PerPixelTimestep":
        if self._handles:
            return self
        unet = self.unet
        add = self._handles.append
        add(unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
        add(unet.register_forward_hook(self._unet_post))
        add(unet.time_embedding.register_forward_hook(self._zero_when_active))
        act = getattr(unet, "time_embed_act", None)  # a ControlNetModel has none
        if act is not None:
            add(act.register_forward_pre_hook(self._record_extra))
        for mod in unet.modules():
            if type(mod).__name__ == "ResnetBlock2D" and mod.time_emb_proj is not None:
                if act is None:
                    add(mod.register_forward_pre_hook(self._record_extra_from_resnet,
                                                      with_kwargs=True))
                add(mod.time_emb_proj.register_forward_hook(self._zero_when_active))
                add(mod.conv1.register_forward_hook(self._make_conv1_hook(mod)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._state = None
        self._zeros.clear()

    def __enter__(self) -> "PerPixelTimestep":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- hooks -----------------------------------------------------------------------------
    def _unet_pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        in_args = len(args) > 1
        t = args[1] if in_args else kwargs.get("timestep")
        self._state = None
        if not torch.is_tensor(t):
            return None
        t_map = _as_map(t, sample)
        if t_map is None:
            return None
        values, inverse = torch.unique(t_map, return_inverse=True)  # (U,), (B, h, w)
        self._state = _CallState(inverse=inverse, values=values, dtype=sample.dtype)
        placeholder = t_map.flatten(1)[:, 0]  # (B,): its embedding is zeroed below
        if in_args:
            args = (args[0], placeholder, *args[2:])
        else:
            kwargs = {**kwargs, "timestep": placeholder}
        return args, kwargs

    def _unet_post(self, module, args, output):
        self._state = None
        return output

    def _zero_when_active(self, module, args, output):
        if self._state is None:
            return None
        # one zero tensor per shape: the UNet only reads it (``h + temb``, out of place)
        key = (tuple(output.shape), output.dtype, output.device)
        zeros = self._zeros.get(key)
        if zeros is None:
            zeros = self._zeros[key] = torch.zeros_like(output)
        return zeros

    def _record_extra(self, module, args):
        if self._state is not None:
            self._state.extra = args[0]
        return None

    def _record_extra_from_resnet(self, module, args, kwargs):
        st = self._state
        if st is not None and st.extra is None:
            st.extra = args[1] if len(args) > 1 else kwargs["temb"]
        return None

    def _embedding(self, st: _CallState) -> torch.Tensor:
        """``(B, U, C)``: time MLP of each distinct timestep plus the per-sample extra."""
        if st.emb is None:
            unet = self.unet
            t_emb = unet.time_proj(st.values).to(dtype=st.dtype)  # (U, C0)
            # .forward bypasses our zeroing hook on the same module.
            table = unet.time_embedding.forward(t_emb)  # (U, C)
            extra = st.extra if st.extra is not None else torch.zeros_like(table[:1])
            emb = table[None] + extra[:, None]  # (B, U, C)
            act = getattr(unet, "time_embed_act", None)
            if act is not None:
                emb = act.forward(emb)
            st.emb = emb
        return st.emb

    def _one_hot_at(self, st: _CallState, size: tuple[int, int], dtype) -> torch.Tensor:
        """``(B, U, h_l * w_l)`` one-hot of the map resized (nearest) to a block's resolution."""
        one_hot = st.one_hot.get(size)
        if one_hot is None:
            full_hw = tuple(st.inverse.shape[-2:])
            if full_hw not in st.one_hot:
                codes = torch.arange(st.values.numel(), device=st.inverse.device)  # (U,)
                full = (st.inverse[:, None] == codes[:, None, None]).to(dtype)  # (B, U, h, w)
                st.one_hot[full_hw] = full.flatten(2)  # (B, U, h*w)
            one_hot = st.one_hot[full_hw]
            if size != full_hw:
                # nearest resizing of the one-hot picks the same pixels as resizing the map
                full = one_hot.unflatten(2, full_hw)  # (B, U, h, w)
                one_hot = F.interpolate(full, size=size, mode="nearest").flatten(2)
                st.one_hot[size] = one_hot  # (B, U, h_l * w_l)
        return one_hot

    def _make_conv1_hook(self, resnet: nn.Module):
        def hook(module, args, output):
            st = self._state
            if st is None:
                return None
            act = None if resnet.skip_time_act else type(resnet.nonlinearity)
            temb = st.acts.get(act)
            if temb is None:
                temb = self._embedding(st)
                if act is not None:
                    temb = resnet.nonlinearity(temb)
                st.acts[act] = temb  # (B, U, C), shared by every ResNet with this activation
            proj = resnet.time_emb_proj.forward(temb).transpose(1, 2)  # (B, C_out, U)
            one_hot = self._one_hot_at(st, tuple(output.shape[-2:]), proj.dtype)  # (B, U, h*w)
            # conv1(h) + proj[u(pixel)]: one matmul that gathers and adds (exactly)
            return torch.baddbmm(output.flatten(2), proj, one_hot).view_as(output)

        return hook
