"""Cross-attention capture at the mask resolution, through attention processors.

Only the cross-attention layers at one resolution level get a capturing processor; every
other layer keeps its own (fused) processor. The capturing processor still computes the
layer's output with the layer's original processor, so outputs are unchanged; it then
recomputes the query-key probabilities for the *conditional* batch rows only, softmaxes
over all text tokens in float32 (at least the precision ``upcast_attention`` /
``upcast_softmax`` ask for), keeps only the subject token columns, and averages over heads.
:meth:`AttentionCapture.maps` then averages over layers.

Level rule (documented choice): the mask short side should be a quarter of the latent's
(SD at 512 px: 64 -> 16, SD 2.1 at 768 px: 96 -> 24, SDXL at 1024 px: 128 -> 32), but at
least 8 pixels for tiny latents; the cross-attention level whose short side is nearest to
that is used (ties: the finer level). Pass ``level=`` to override.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_LEVEL_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def module_level(name: str, num_down: int, num_up: int) -> int | None:
    """Resolution level (0 = latent size, l = latent / 2^l) of a UNet submodule by name."""
    m = _LEVEL_RE.match(name)
    if m is None:
        return None
    if m.group(1) is None:
        return num_down - 1
    idx = int(m.group(2))
    return idx if m.group(1) == "down_blocks" else num_up - 1 - idx


def level_size(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial size at a level: stride-2 convs with padding 1 round up."""
    h, w = latent_hw
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def cross_attention_layers(unet: nn.Module) -> dict[str, tuple[int, nn.Module]]:
    """All cross-attention modules of a UNet with their level."""
    num_down, num_up = len(unet.down_blocks), len(unet.up_blocks)
    out = {}
    for name, mod in unet.named_modules():
        if hasattr(mod, "set_processor") and getattr(mod, "is_cross_attention", False):
            level = module_level(name, num_down, num_up)
            if level is not None:
                out[name] = (level, mod)
    return out


def choose_level(unet: nn.Module, latent_hw: tuple[int, int]) -> int:
    """The documented level rule (see module docstring)."""
    levels = sorted({lvl for lvl, _ in cross_attention_layers(unet).values()})
    if not levels:
        raise ValueError("this UNet has no cross-attention layers to read subject masks from")
    short = min(latent_hw)
    target = max(short / 4, min(8, short))
    return min(levels, key=lambda lvl: (abs(min(level_size(latent_hw, lvl)) - target), lvl))


class _Store:
    """Running sum of ``(B, N, P)`` probabilities over the layers of one UNet call."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None  # (B, P) token columns to keep
        self.rows: slice = slice(None)
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, probs: torch.Tensor) -> None:
        self.total = probs if self.total is None else self.total + probs
        self.count += 1


class CaptureProcessor:
    """Delegates to the layer's original processor and records subject-token attention."""

    def __init__(self, inner, store: _Store) -> None:
        self.inner = inner
        self.store = store
        self._keys: tuple | None = None  # (text tensor, its version, rows, (B, H, d, L) keys)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        # passed on exactly as received: processors differ in what they accept (the sliced
        # processor takes no ``temb``)
        out = self.inner(attn, hidden_states, *args, **kwargs)
        encoder_hidden_states = args[0] if args else kwargs.get("encoder_hidden_states")
        st = self.store
        if st.positions is not None and encoder_hidden_states is not None:
            st.add(self._subject_probs(attn, hidden_states, encoder_hidden_states))
        return out

    def _scaled_keys(self, attn, encoder_hidden_states) -> torch.Tensor:
        """``(B, H, d, L)`` float32 keys of the recorded rows, times the attention scale.

        The text is the same tensor at every step of a run, so the keys are computed once
        and kept while that tensor (same object, unmodified) and the rows stay the same.
        """
        st = self.store
        cached = self._keys
        if (cached is not None and cached[0] is encoder_hidden_states
                and cached[1] == encoder_hidden_states._version and cached[2] == st.rows):
            return cached[3]
        ctx = encoder_hidden_states[st.rows]
        if getattr(attn, "norm_cross", None):
            ctx = attn.norm_encoder_hidden_states(ctx)
        k = attn.to_k(ctx)  # (B, L, H*d)
        bsz, n_k, inner = k.shape
        k = k.reshape(bsz, n_k, attn.heads, inner // attn.heads).transpose(1, 2)  # (B, H, L, d)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        k_t = k.float().transpose(-1, -2) * attn.scale  # (B, H, d, L)
        self._keys = (encoder_hidden_states, encoder_hidden_states._version, st.rows, k_t)
        return k_t

    def _subject_probs(self, attn, hidden_states, encoder_hidden_states) -> torch.Tensor:
        st = self.store
        x = hidden_states[st.rows]
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        q = attn.to_q(x)  # (B, N, H*d)
        bsz, n_q, inner = q.shape
        heads = attn.heads
        q = q.reshape(bsz, n_q, heads, inner // heads).transpose(1, 2)  # (B, H, N, d)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        scores = q.float() @ self._scaled_keys(attn, encoder_hidden_states)  # (B, H, N, L)
        probs = scores.softmax(dim=-1)
        pos = st.positions[:, None, None, :].expand(-1, heads, n_q, -1)  # (B, H, N, P)
        return probs.gather(-1, pos).mean(dim=1)  # (B, N, P)


class AttentionCapture:
    """Install capture processors on the cross-attention layers of one level.

    Args:
        unet: a ``UNet2DConditionModel``.
        latent_hw: latent ``(h, w)`` of the run (selects the level and the map shape).
        level: override of :func:`choose_level`.
    """

    def __init__(self, unet: nn.Module, latent_hw: tuple[int, int], level: int | None = None):
        self.unet = unet
        self.level = choose_level(unet, latent_hw) if level is None else level
        self.map_hw = level_size(latent_hw, self.level)
        self.layers = {
            name: mod for name, (lvl, mod) in cross_attention_layers(unet).items()
            if lvl == self.level
        }
        if not self.layers:
            raise ValueError(f"no cross-attention layers at level {self.level}")
        self._store = _Store()
        self._originals: dict[str, object] = {}

    def install(self) -> "AttentionCapture":
        if self._originals:
            return self
        for name, mod in self.layers.items():
            self._originals[name] = mod.processor
            mod.set_processor(CaptureProcessor(mod.processor, self._store))
        return self

    def remove(self) -> None:
        for name, proc in self._originals.items():
            self.layers[name].set_processor(proc)
        self._originals.clear()

    def __enter__(self) -> "AttentionCapture":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def start(self, positions: torch.Tensor, rows: slice = slice(None)) -> None:
        """Record the next UNet call: token columns ``positions`` ``(B, P)`` of rows ``rows``."""
        st = self._store
        st.positions, st.rows, st.total, st.count = positions, rows, None, 0

    def stop(self) -> torch.Tensor:
        """Stop recording; return ``(B, P, hm, wm)``: mean over heads, then over layers."""
        st = self._store
        if st.total is None:
            st.positions = None
            raise RuntimeError("no attention was captured: was the UNet called?")
        mean = st.total / st.count  # (B, N, P)
        st.positions, st.total, st.count = None, None, 0
        bsz, _, n_pos = mean.shape
        return mean.transpose(1, 2).reshape(bsz, n_pos, *self.map_hw)  # (B, P, hm, wm)
