"""Per-token timesteps and subject attention for diffusers' ``SD3Transformer2DModel`` (MMDiT).

While :class:`PerTokenTimestep` is installed, the transformer accepts ``timestep`` as a
per-token map ``(B, h, w)`` (or ``(B, 1, h, w)``) of float timesteps (``sigma * 1000``, as SD3
uses them), with ``h, w`` the latent size over the patch size; a scalar or ``(B,)`` timestep
takes the model's own path untouched. How it works (no diffusers code is copied or patched):

1. A forward-pre hook on the transformer takes the map out of the call. Only the *distinct*
   timesteps are embedded, by the model's own ``time_text_embed`` (timestep embedding plus
   pooled-text projection): a table ``(B, U, D)``, ``U`` usually 2-4. The model gets a
   ``(B,)`` timestep for the text tokens instead.
2. Each block's ``norm1`` (``AdaLayerNormZero``, or SD3.5's ``SD35AdaLayerNormZeroX``) and the
   output ``norm_out`` (``AdaLayerNormContinuous``) are replaced by wrappers that project the
   table with the module's own ``linear`` and gather the modulation per token.
3. The block applies what ``norm1`` returns as ``gate.unsqueeze(1) * attn_output`` and
   ``norm2(h) * (1 + scale[:, None]) + shift[:, None]``: that broadcasting only takes one
   vector per sample. So the wrapper returns neutral values (gates ``1``, shift and scale
   ``0``, which leave every product bit-exact) and forward hooks apply the per-token values
   where the block would have: the gate on the output of ``attn`` (image part) and ``attn2``,
   shift and scale on the output of ``norm2``, the MLP gate on the output of ``ff``.

Text tokens keep one timestep per sample: by default the smallest timestep of the map, i.e.
the background's (subject tokens only ever lag behind it), or the ``text_timestep=`` keyword
the hook consumes. Text tokens are not spatial, the background is the ordinary schedule, and
the paper's mechanism concerns image regions; so the text stream, including every
``norm1_context``, sees exactly what a synchronous model at the background's step would.

Removing (``remove()`` or leaving the ``with`` block) puts the original modules back.

Subject masks come from the joint attention (:class:`JointAttentionCapture`): for the
conditional rows, image queries against *all* keys, which diffusers' ``JointAttnProcessor2_0``
orders ``[image tokens; text tokens]``, after the q/k norms; softmax in float32, then the
subject text columns (CLIP token ``p`` is text column ``p``: the joint text sequence is
``[CLIP-L + CLIP-G (77 tokens); T5 tokens]``). Layers (documented choice): the middle third of
the blocks, by analogy with the UNet, whose masks come from its middle level rather than its
first or last layers: in the first blocks the text stream has barely met the image, in the
last ones the image stream is being turned into pixels. It is a heuristic, not yet measured
on released SD3 weights; pass ``layers=`` to override.

Flux (``FluxTransformer2DModel``) does not fall out: its single-stream blocks modulate the
concatenated ``[text; image]`` sequence with one ``AdaLayerNormZeroSingle`` (a wrapper there
must split rows by text length), its timestep embedding also takes the guidance scale, its
attention orders keys ``[text; image]`` with rotary embeddings applied before the scores, its
text columns are T5 tokens (no start token, so subject positions need the T5 tokenizer), and its
pipeline packs latents into ``(B, N, 64)``. :mod:`asyndm.flow` already handles its
resolution-dependent ``mu``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .attention import AttentionCapture, CaptureProcessor, _Store
from .unet import UnsupportedModelError

_NORM1_CHUNKS = {"AdaLayerNormZero": 6, "SD35AdaLayerNormZeroX": 9}


def check_sd3_supported(transformer: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming the first unsupported feature."""
    for attr in ("time_text_embed", "transformer_blocks", "norm_out"):
        if not hasattr(transformer, attr):
            raise UnsupportedModelError(f"not an SD3-style transformer: no {attr!r}")
    if type(transformer.norm_out).__name__ != "AdaLayerNormContinuous":
        raise UnsupportedModelError("norm_out must be an AdaLayerNormContinuous")
    for i, block in enumerate(transformer.transformer_blocks):
        kind = type(block.norm1).__name__
        if kind not in _NORM1_CHUNKS or getattr(block.norm1, "emb", None) is not None:
            raise UnsupportedModelError(f"transformer_blocks.{i}.norm1: {kind} is not supported")


def _select_tokens(per_value: torch.Tensor, st: "_CallState") -> torch.Tensor:
    """``(B, U, C)`` values per distinct timestep -> ``(B, N, C)``, one row copy per token.

    A row ``index_select`` on the flattened table: on the CPU ten times faster than a
    ``gather`` with an index expanded over ``C`` (measured at ``N`` = 1024, ``C`` = 768).
    """
    bsz = per_value.shape[0]
    return per_value.flatten(0, 1).index_select(0, st.flat).unflatten(0, (bsz, -1))


@dataclass
class _CallState:
    """What one transformer call needs across wrappers and hooks; reset at every call."""

    index: torch.Tensor  # (B, N) index of each image token's timestep in `table`
    table: torch.Tensor  # (B, U, D) time_text_embed of each distinct timestep
    flat: torch.Tensor  # (B N,) the row of each token in the flattened (B U, D) table
    slots: dict = field(default_factory=dict)  # block -> {name: (B, N, D)}

    @classmethod
    def of(cls, index: torch.Tensor, table: torch.Tensor) -> "_CallState":
        """The state for ``(B, N)`` indices into a ``(B, U, D)`` table."""
        n_val = table.shape[1]
        offset = n_val * torch.arange(index.shape[0], device=index.device)[:, None]  # (B, 1)
        return cls(index=index, table=table, flat=(index + offset).flatten())


class _TokenNorm1(nn.Module):
    """Stands in for a block's ``norm1``: per-token AdaLN-Zero modulation while a map is active."""

    def __init__(self, inner: nn.Module, owner: "PerTokenTimestep", block: int) -> None:
        super().__init__()
        self.inner = inner
        self.chunks = _NORM1_CHUNKS[type(inner).__name__]
        self._owner = owner
        self._block = block

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        st = self._owner.state
        if st is None:
            return self.inner(hidden_states, *args, **kwargs)
        inner = self.inner
        mod = inner.linear(inner.silu(st.table))  # (B, U, chunks * D)
        # the module's own chunk order: shift, scale, gate (attention), then the same for the
        # MLP, then (SD3.5) for the second attention
        parts = _select_tokens(mod, st).chunk(self.chunks, dim=-1)  # (B, N, D) each
        normed = inner.norm(hidden_states)  # (B, N, D)
        out = normed * (1 + parts[1]) + parts[0]
        bsz, dim = hidden_states.shape[0], hidden_states.shape[-1]
        one = hidden_states.new_ones(bsz, dim)
        zero = hidden_states.new_zeros(bsz, dim)
        slot = {"gate_msa": parts[2], "shift_mlp": parts[3], "scale_mlp": parts[4],
                "gate_mlp": parts[5]}
        st.slots[self._block] = slot
        if self.chunks == 6:
            return out, one, zero, zero, one
        slot["gate_msa2"] = parts[8]
        out2 = normed * (1 + parts[7]) + parts[6]
        return out, one, zero, zero, one, out2, one


class _TokenNormOut(nn.Module):
    """Stands in for ``norm_out`` (``AdaLayerNormContinuous``, order scale then shift)."""

    def __init__(self, inner: nn.Module, owner: "PerTokenTimestep") -> None:
        super().__init__()
        self.inner = inner
        self._owner = owner

    def forward(self, x: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
        st = self._owner.state
        if st is None:
            return self.inner(x, conditioning_embedding)
        inner = self.inner
        mod = _select_tokens(inner.linear(inner.silu(st.table).to(x.dtype)), st)  # (B, N, 2 D)
        scale, shift = mod.chunk(2, dim=-1)
        return inner.norm(x) * (1 + scale) + shift  # (B, N, D)


class PerTokenTimestep:
    """Install per-token timesteps on an ``SD3Transformer2DModel`` (see module docstring).

    Use as a context manager (``with PerTokenTimestep(transformer): transformer(x, ...,
    timestep=t_map)``) or call :meth:`install` / :meth:`remove`.
    """

    def __init__(self, transformer: nn.Module) -> None:
        check_sd3_supported(transformer)
        self.transformer = transformer
        self.state: _CallState | None = None
        self._signature = inspect.signature(transformer.forward)
        self._handles: list[RemovableHandle] = []
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []

    # -- lifecycle -------------------------------------------------------------------------
    def install(self) -> "PerTokenTimestep":
        if self._handles:
            return self
        model = self.transformer
        add = self._handles.append
        add(model.register_forward_pre_hook(self._pre, with_kwargs=True))
        add(model.register_forward_hook(self._post, always_call=True))
        self._swap(model, "norm_out", _TokenNormOut(model.norm_out, self))
        for i, block in enumerate(model.transformer_blocks):
            self._swap(block, "norm1", _TokenNorm1(block.norm1, self, i))
            add(block.attn.register_forward_hook(self._gate_hook(i, "gate_msa")))
            if getattr(block, "attn2", None) is not None:
                add(block.attn2.register_forward_hook(self._gate_hook(i, "gate_msa2")))
            add(block.norm2.register_forward_hook(self._mlp_norm_hook(i)))
            add(block.ff.register_forward_hook(self._gate_hook(i, "gate_mlp", last=True)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for parent, name, original in reversed(self._originals):
            setattr(parent, name, original)
        self._originals.clear()
        self.state = None

    def __enter__(self) -> "PerTokenTimestep":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _swap(self, parent: nn.Module, name: str, wrapper: nn.Module) -> None:
        self._originals.append((parent, name, getattr(parent, name)))
        setattr(parent, name, wrapper)

    # -- hooks -----------------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        self.state = None
        text_t = kwargs.get("text_timestep")
        kwargs = {k: v for k, v in kwargs.items() if k != "text_timestep"}
        bound = self._signature.bind(*args, **kwargs)
        t = bound.arguments.get("timestep")
        if not torch.is_tensor(t) or t.ndim <= 1:
            if text_t is not None:
                raise ValueError("text_timestep is only used with a per-token timestep map")
            return args, kwargs
        hidden = bound.arguments["hidden_states"]
        pooled = bound.arguments["pooled_projections"]
        t_map = self._as_map(t, hidden, module.config.patch_size)  # (B, h, w)
        for i, block in enumerate(module.transformer_blocks):
            if block._chunk_size is not None:
                raise UnsupportedModelError(f"transformer_blocks.{i}: feed-forward chunking")
        values, inverse = torch.unique(t_map, return_inverse=True)  # (U,), (B, h, w)
        bsz, n_val = t_map.shape[0], values.numel()
        # the model's own embedding of every (sample, distinct timestep) pair
        table = module.time_text_embed(values.repeat(bsz), pooled.repeat_interleave(n_val, 0))
        self.state = _CallState.of(inverse.flatten(1), table.reshape(bsz, n_val, -1))
        if text_t is None:
            text_t = t_map.flatten(1).amin(dim=1)  # (B,): the background's timestep
        bound.arguments["timestep"] = torch.as_tensor(text_t, device=t.device).float().expand(bsz)
        return bound.args, bound.kwargs

    def _post(self, module, args, output):
        self.state = None
        return output

    @staticmethod
    def _as_map(t: torch.Tensor, hidden: torch.Tensor, patch: int) -> torch.Tensor:
        """``t`` as a float32 ``(B, h, w)`` token map; checks its shape against the latents."""
        if t.ndim == 4 and t.shape[1] == 1:
            t = t[:, 0]  # (B, 1, h, w) -> (B, h, w)
        bsz, _, big_h, big_w = hidden.shape
        want = (bsz, big_h // patch, big_w // patch)
        if tuple(t.shape) != want:
            raise ValueError(
                f"a timestep map must be (B, h, w) = {want} (one timestep per {patch}x{patch} "
                f"patch) for latents of shape {tuple(hidden.shape)}, got {tuple(t.shape)}"
            )
        return t.float()

    def _slot(self, block: int, last: bool = False) -> dict[str, torch.Tensor] | None:
        st = self.state
        if st is None:
            return None
        return st.slots.pop(block, None) if last else st.slots.get(block)

    def _gate_hook(self, block: int, key: str, last: bool = False):
        def hook(module, args, output):
            slot = self._slot(block, last)
            if slot is None:
                return None
            if isinstance(output, tuple):  # joint attention: (image, text)
                return (output[0] * slot[key], *output[1:])
            return output * slot[key]

        return hook

    def _mlp_norm_hook(self, block: int):
        def hook(module, args, output):
            slot = self._slot(block)
            if slot is None:
                return None
            return output * (1 + slot["scale_mlp"]) + slot["shift_mlp"]

        return hook


# -- subject attention ---------------------------------------------------------------------
def default_capture_layers(num_layers: int) -> tuple[int, ...]:
    """The middle third of the blocks (at least one): blocks 8-15 of SD3-medium's 24."""
    lo = num_layers // 3
    return tuple(range(lo, max(lo + 1, 2 * num_layers // 3)))


class JointCaptureProcessor(CaptureProcessor):
    """Delegates to the layer's original processor and records image -> subject-text attention.

    The output is the original processor's, unchanged (see :class:`CaptureProcessor`).
    """

    fold_subjects = False  # joint attention: image keys too, so no folded cross-attention

    max_elements = 2**26
    """Bound on the float32 score tensor of one chunk of heads (256 MiB)."""

    def _subject_probs(self, attn, hidden_states, encoder_hidden_states) -> torch.Tensor:
        """``(B, N, P)``: head-mean softmax probability of each image token on each column.

        Scores and softmax are plain float32 (a fused kernel may round them through TF32),
        computed a few heads at a time so the ``(B, h, N, N + L)`` matrix stays bounded.
        """
        st = self.store
        x = hidden_states[st.rows]  # (B, N, D)
        ctx = encoder_hidden_states[st.rows]  # (B, L, D)
        bsz, n_img, _ = x.shape
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(bsz, t.shape[1], heads, -1).transpose(1, 2)  # (B, H, n, d)

        q, k_img, k_txt = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.add_k_proj(ctx))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k_img = attn.norm_k(k_img)
        if attn.norm_added_k is not None:
            k_txt = attn.norm_added_k(k_txt)
        keys = torch.cat([k_img, k_txt], dim=2)  # (B, H, N + L, d): image keys first
        scale = q.shape[-1] ** -0.5  # scaled_dot_product_attention's default
        cols = (n_img + st.positions)[:, None, None, :]  # (B, 1, 1, P)
        chunk = max(1, self.max_elements // (bsz * n_img * keys.shape[2]))
        total = 0.0
        for h0 in range(0, heads, chunk):
            qh, kh = q[:, h0:h0 + chunk].float(), keys[:, h0:h0 + chunk].float()
            probs = ((qh @ kh.transpose(-1, -2)) * scale).softmax(dim=-1)  # (B, h, N, N + L)
            picked = probs.gather(-1, cols.expand(-1, qh.shape[1], n_img, -1))  # (B, h, N, P)
            total = total + picked.sum(dim=1)  # (B, N, P)
        return total / heads


class JointAttentionCapture(AttentionCapture):
    """Install capture processors on the joint attention of some blocks.

    ``remove``, ``start`` and ``stop`` (which returns ``(B, P, h, w)`` token-grid maps, mean
    over heads, then over layers) are :class:`AttentionCapture`'s.

    Args:
        transformer: an ``SD3Transformer2DModel``.
        token_hw: the token grid ``(h, w)`` of the run (latent size over the patch size).
        layers: block indices; default :func:`default_capture_layers`.
    """

    def __init__(self, transformer: nn.Module, token_hw: tuple[int, int],
                 layers: tuple[int, ...] | None = None) -> None:
        blocks = transformer.transformer_blocks
        idx = default_capture_layers(len(blocks)) if layers is None else tuple(layers)
        if not idx or any(not 0 <= i < len(blocks) for i in idx):
            raise ValueError(f"capture layers must be block indices in [0, {len(blocks)}), "
                             f"got {idx}")
        self.transformer = transformer
        self.map_hw = tuple(token_hw)
        self.layers = {f"transformer_blocks.{i}.attn": blocks[i].attn for i in idx}
        self._store = _Store()
        self._originals: dict[str, object] = {}

    def install(self) -> "JointAttentionCapture":
        if self._originals:
            return self
        for name, mod in self.layers.items():
            self._originals[name] = mod.processor
            mod.set_processor(JointCaptureProcessor(mod.processor, self._store))
        return self
