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
    """Running sum over the layers of one UNet call, of ``(B, N, P)`` token probabilities
    or, where a processor folds the subjects in, ``(B, N, S)`` subject probabilities."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None  # (B, P) token columns to keep
        self.weights: torch.Tensor | None = None  # (B, S, P) subject averaging, optional
        self.rows: slice = slice(None)
        self.total: torch.Tensor | None = None
        self.count = 0
        self.per_subject = False  # whether `total` is (B, N, S)

    def add(self, probs: torch.Tensor) -> None:
        """Add ``(B, N, P)`` head-mean probabilities of the subject token columns."""
        if self.per_subject:
            raise RuntimeError("token and subject probabilities mixed in one capture")
        self.total = probs if self.total is None else self.total + probs
        self.count += 1

    def add_folded(self, probs: torch.Tensor, fold: torch.Tensor) -> None:
        """Add ``probs @ fold``: ``(B, N, K) @ (B, K, S)`` to a ``(B, N, S)`` sum."""
        if self.total is not None and not self.per_subject:
            raise RuntimeError("token and subject probabilities mixed in one capture")
        self.per_subject = True
        self.total = (torch.bmm(probs, fold) if self.total is None
                      else torch.baddbmm(self.total, probs, fold))  # (B, N, S)
        self.count += 1


class CaptureProcessor:
    """Delegates to the layer's original processor and records subject-token attention.

    With subject weights set (:meth:`AttentionCapture.start`), a layer without query / key
    norms records the subjects' head-mean probability in two matrix products per call:

    * scores: ``q_h . k_hl = x Wq_h^T k_hl`` for every head ``h`` and text token ``l``, so
      ``x @ M`` with ``M = [Wq_h^T k_h * scale]_h`` ``(C, H * L)``, made once per run from
      the (fixed) text keys: the query projection is folded in, and ``M`` costs about what
      the query projection did (``L`` = 77 is close to the head size);
    * after the softmax over each head's ``L`` columns, ``probs @ F`` with ``F`` ``(H * L, S)``
      holding ``w_sp / H`` at the rows ``(h, position p)``: the subject mean over its tokens
      and the mean over heads, accumulated into the layer sum by the same ``baddbmm``.

    Otherwise it recomputes the query-key probabilities of the subject columns explicitly.
    """

    fold_subjects = True
    """Whether the folded path applies (cross-attention ``q = x Wq^T + b``); subclasses with
    other attention maths set it to ``False``."""

    def __init__(self, inner, store: _Store) -> None:
        self.inner = inner
        self.store = store
        self._keys: tuple | None = None  # (cache key, (B, H, d, L) keys)
        self._folded: tuple | None = None  # (cache key, M (B, C, H*L), bias, F (B, H*L, S))
        self.ready: tuple | None = None  # this call's (M, bias, F), made before the call

    def __call__(self, attn, hidden_states, *args, **kwargs):
        # passed on exactly as received: processors differ in what they accept (the sliced
        # processor takes no ``temb``)
        out = self.inner(attn, hidden_states, *args, **kwargs)
        encoder_hidden_states = args[0] if args else kwargs.get("encoder_hidden_states")
        st = self.store
        if st.positions is not None and encoder_hidden_states is not None:
            if self.folds(attn):
                fold = self.ready or self._fold(attn, encoder_hidden_states)
                self._add_folded(attn, hidden_states, fold)
            else:
                st.add(self._subject_probs(attn, hidden_states, encoder_hidden_states))
        return out

    def folds(self, attn) -> bool:
        """Whether this call takes the folded path (subject weights set, a plain
        cross-attention layer)."""
        return (self.fold_subjects and self.store.weights is not None
                and getattr(attn, "norm_q", None) is None
                and getattr(attn, "norm_k", None) is None)

    def _cache_key(self, encoder_hidden_states) -> tuple:
        """The text is the same tensor at every step of a run: what is made from it is kept
        while that tensor (same object, unmodified), the rows and the subjects stay."""
        st = self.store
        return (encoder_hidden_states, encoder_hidden_states._version, st.rows, st.weights,
                st.positions)

    @staticmethod
    def _same(cached: tuple | None, key: tuple) -> bool:
        return cached is not None and all(
            a is b if torch.is_tensor(a) or torch.is_tensor(b) else a == b
            for a, b in zip(cached[0], key))

    def _scaled_keys(self, attn, encoder_hidden_states) -> torch.Tensor:
        """``(B, H, d, L)`` float32 keys of the recorded rows, times the attention scale."""
        key = self._cache_key(encoder_hidden_states)
        if self._same(self._keys, key):
            return self._keys[1]
        ctx = encoder_hidden_states[self.store.rows]
        if getattr(attn, "norm_cross", None):
            ctx = attn.norm_encoder_hidden_states(ctx)
        k = attn.to_k(ctx)  # (B, L, H*d)
        bsz, n_k, inner = k.shape
        k = k.reshape(bsz, n_k, attn.heads, inner // attn.heads).transpose(1, 2)  # (B, H, L, d)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        k_t = k.float().transpose(-1, -2) * attn.scale  # (B, H, d, L)
        self._keys = (key, k_t)
        return k_t

    def _fold(self, attn, encoder_hidden_states) -> tuple:
        """``M`` ``(B, C, H*L)``, the query bias's scores ``(B, 1, H*L)`` (or ``None``) and
        ``F`` ``(B, H*L, S)``, once per run (see the class docstring). ``M`` is made in
        float32 and kept in the model's dtype (float32 where the layer upcasts its
        attention): the scores are then computed as precisely as the model's own attention
        computes them, at half the memory in half precision; the softmax is float32."""
        key = self._cache_key(encoder_hidden_states)
        if self._same(self._folded, key):
            return self._folded[1:]
        st = self.store
        k_t = self._scaled_keys(attn, encoder_hidden_states)  # (B, H, d, L)
        bsz, heads, dim, n_k = k_t.shape
        wq = attn.to_q.weight.float().reshape(heads, dim, -1)  # (H, d, C)
        upcast = getattr(attn, "upcast_attention", False) or getattr(attn, "upcast_softmax", False)
        dtype = torch.float32 if upcast else attn.to_q.weight.dtype
        fold_m = torch.einsum("hdc,bhdl->bchl", wq, k_t).flatten(2).to(dtype)  # (B, C, H*L)
        bias = None
        if attn.to_q.bias is not None:
            bq = attn.to_q.bias.float().reshape(heads, dim)  # (H, d)
            bias = torch.einsum("hd,bhdl->bhl", bq, k_t).flatten(1)[:, None]  # (B, 1, H*L)
            bias = bias.to(dtype)
        w = st.weights.float().to(k_t.device)  # (B, S, P)
        cols = torch.zeros(bsz, n_k, w.shape[1], device=k_t.device)  # (B, L, S)
        cols.scatter_add_(1, st.positions[:, :, None].expand(-1, -1, w.shape[1]),
                          w.transpose(1, 2))  # token l of subject s: sum of its weights
        fold_f = (cols / heads).repeat(1, heads, 1)  # (B, H*L, S), rows ordered (h, l)
        self._folded = (key, fold_m, bias, fold_f)
        return fold_m, bias, fold_f

    def _add_folded(self, attn, hidden_states, fold: tuple) -> None:
        st = self.store
        x = hidden_states[st.rows]
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        fold_m, bias, fold_f = fold
        x = x.to(fold_m.dtype)
        scores = torch.bmm(x, fold_m) if bias is None else torch.baddbmm(bias, x, fold_m)
        bsz, n_q, _ = scores.shape  # (B, N, H*L)
        scores = scores.view(bsz, n_q, attn.heads, -1).float()  # (B, N, H, L)
        probs = scores.softmax(dim=-1)
        st.add_folded(probs.view(bsz, n_q, -1), fold_f)

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

    def start(self, positions: torch.Tensor, rows: slice = slice(None),
              weights: torch.Tensor | None = None, text: torch.Tensor | None = None) -> None:
        """Record the next UNet call: token columns ``positions`` ``(B, P)`` of rows ``rows``;
        with ``weights`` ``(B, S, P)`` (:attr:`asyndm.state.Subjects.weights`), record the
        subjects' attention (each the weighted mean of its columns) instead. ``text``: the
        call's ``encoder_hidden_states``; given, what the layers make from it is made (or
        found) now, so that the call itself only computes (a compiled model traces no
        cache checks)."""
        st = self._store
        st.positions, st.weights, st.rows = positions, weights, rows
        st.total, st.count, st.per_subject = None, 0, False
        for mod in self.layers.values():
            proc = mod.processor
            if isinstance(proc, CaptureProcessor):
                ready = text is not None and proc.folds(mod)
                proc.ready = proc._fold(mod, text) if ready else None

    def stop(self) -> torch.Tensor:
        """Stop recording; return the mean over heads, then over layers: ``(B, P, hm, wm)``
        per token column, or ``(B, S, hm, wm)`` per subject when ``weights`` were given."""
        st = self._store
        total, count, weights = st.total, st.count, st.weights
        st.positions, st.weights, st.total, st.count = None, None, None, 0
        for mod in self.layers.values():
            if isinstance(mod.processor, CaptureProcessor):
                mod.processor.ready = None
        if total is None:
            raise RuntimeError("no attention was captured: was the UNet called?")
        if weights is not None and not st.per_subject:  # token columns: average them now
            total = torch.bmm(total, weights.to(total).transpose(1, 2))  # (B, N, S)
        mean = total / count  # (B, N, P | S)
        bsz, _, n_maps = mean.shape
        return mean.transpose(1, 2).reshape(bsz, n_maps, *self.map_hw)  # (B, P | S, hm, wm)
