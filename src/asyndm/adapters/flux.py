"""Per-token timesteps and subject attention for diffusers' ``FluxTransformer2DModel`` (FLUX.1).

Flux is SD3's MMDiT with three differences that matter here (see :mod:`asyndm.adapters.sd3`,
whose machinery this module extends rather than repeats):

* its pipeline *packs* latents: ``(B, C, H, W)`` becomes ``(B, N, 4 C)`` with one token per
  ``2 x 2`` latent patch, token ``n = row * w + col`` of the ``(h, w) = (H / 2, W / 2)`` grid
  (the grid is read back from ``img_ids``, which hold ``(0, row, col)`` per token);
* after its double-stream blocks (``FluxTransformerBlock``, the same AdaLN-Zero structure as
  SD3's: a ``norm1`` wrapper returns neutral gates, shifts and scales, and
  :class:`~asyndm.adapters.sd3.PerTokenTimestep`'s hooks on ``attn``, ``norm2`` and ``ff``
  apply the per-token ones) come single-stream blocks (``FluxSingleTransformerBlock``)
  that modulate the concatenated ``[text; image]`` sequence with one
  ``AdaLayerNormZeroSingle`` (shift, scale, gate);
* the pipeline hands the transformer ``timestep / 1000`` and the guidance scale (FLUX.1-dev is
  guidance-distilled: ``guidance`` is embedded with the timestep; schnell has no guidance
  embedding), and the transformer multiplies both by 1000 before embedding them.

:class:`FluxPerTokenTimestep` accepts ``timestep`` as a token map ``(B, h, w)``, ``(B, 1, h, w)``
or ``(B, N)`` in the units the transformer is called with (``sigma``, i.e. ``t / 1000``). As for
SD3, only the distinct timesteps are embedded, by the model's own ``time_text_embed`` (with the
call's guidance and pooled text embedding, added as the model adds them), and the wrappers
pick each token's modulation from that table (a row ``index_select``). A single-stream
block's wrapper splits the rows by the text length: text rows get the modulation of the
call's own embedding (the background's timestep), image rows their token's; it returns a
neutral gate (ones) and a forward hook on the block's ``proj_out`` applies the per-row gate.
Text tokens stay on the background timestep throughout.

Subject masks (:class:`FluxAttentionCapture`) come from the joint attention of the
double-stream blocks: image-query rows of the conditional samples against all keys, which
``FluxAttnProcessor`` orders ``[text tokens; image tokens]``, after the q/k RMS norms and with
the rotary embedding of ``cat(txt_ids, img_ids)`` applied to queries and keys, as diffusers
builds them; then the float32 softmax probability on the subject text columns (read through
the fused attention kernel, see :class:`FluxCaptureProcessor`). Flux's text sequence is the T5
tokens alone (no start token), so T5 token ``p`` is text column ``p``: subjects resolve with
the pipeline's ``tokenizer_2``. Layers (documented choice): the middle third of the
double-stream blocks (6-11 of FLUX.1's 19), the analogue of SD3's choice. Single-stream blocks
are left out: there text and image share one projection and the two streams have been mixed
for every earlier block, so a text column there is no longer the prompt token's own key. It is
a heuristic, not measured on released FLUX.1 weights; pass ``layers=`` to override.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from .attention import CaptureProcessor
from .sd3 import (JointAttentionCapture, PerTokenTimestep, _CallState, _select_tokens,
                  _TokenNormOut)
from .unet import UnsupportedModelError


def check_flux_supported(transformer: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming the first unsupported feature."""
    if not hasattr(transformer, "single_transformer_blocks"):
        raise UnsupportedModelError("not a Flux transformer: no 'single_transformer_blocks'")
    for i, block in enumerate(transformer.single_transformer_blocks):
        if type(block.norm).__name__ != "AdaLayerNormZeroSingle":
            raise UnsupportedModelError(f"single_transformer_blocks.{i}.norm: "
                                        f"{type(block.norm).__name__} is not supported")


def token_grid(img_ids: torch.Tensor | None, n_tokens: int) -> tuple[int, int]:
    """The ``(h, w)`` token grid of packed latents from Flux's ``img_ids`` ``(N, 3)``.

    Raises ``ValueError`` unless the ids are one plain ``h x w`` grid of ``n_tokens`` tokens
    (image-conditioned variants that append reference-image tokens are not supported).
    """
    if img_ids is None:
        raise ValueError("a Flux transformer call without img_ids")
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # (N, 3)
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != n_tokens or ids.shape[0] != n_tokens:
        raise ValueError(f"AsynDM needs img_ids of one {h}x{w} token grid for {n_tokens} "
                         f"image tokens, got {ids.shape[0]} ids")
    return h, w


def ladder_timestep(timesteps: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
    """The scheduler timestep a Flux call's ``timestep / 1000`` came from (nearest rung)."""
    t = float(model_t.flatten()[0]) * 1000
    return timesteps[int((timesteps.float() - t).abs().argmin())]


def check_text_positions(positions: torch.Tensor, text_len: int) -> None:
    """Subject columns must lie in the encoded T5 sequence (``max_sequence_length``)."""
    last = int(positions.max())
    if last >= text_len:
        raise ValueError(f"subject token {last} lies beyond the {text_len} T5 tokens the "
                         "prompt is encoded to; raise max_sequence_length")


class _TokenNorm1(nn.Module):
    """Stands in for a double-stream block's ``norm1`` (``AdaLayerNormZero``, image tokens)."""

    def __init__(self, inner: nn.Module, owner: "FluxPerTokenTimestep", block: int) -> None:
        super().__init__()
        self.inner = inner
        self._owner = owner
        self._block = block

    def forward(self, x: torch.Tensor, *args, emb: torch.Tensor | None = None, **kwargs):
        st = self._owner.state
        if st is None:
            return self.inner(x, *args, emb=emb, **kwargs)
        inner = self.inner
        mod = _select_tokens(inner.linear(inner.silu(st.table)), st)  # (B, N, 6 D)
        # the module's own chunk order: shift, scale, gate (attention), then for the MLP
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        st.slots[self._block] = {"gate_msa": gate, "shift_mlp": shift_mlp,
                                 "scale_mlp": scale_mlp, "gate_mlp": gate_mlp}
        out = inner.norm(x) * (1 + scale) + shift  # (B, N, D)
        one, zero = x.new_ones(x.shape[0], x.shape[-1]), x.new_zeros(x.shape[0], x.shape[-1])
        return out, one, zero, zero, one  # neutral: the hooks apply the per-token values


class _TokenNormSingle(nn.Module):
    """Stands in for a single-stream block's ``norm`` (``AdaLayerNormZeroSingle``)."""

    def __init__(self, inner: nn.Module, owner: "FluxPerTokenTimestep", block: int) -> None:
        super().__init__()
        self.inner = inner
        self._owner = owner
        self._block = block

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None):
        st = self._owner.state
        if st is None:
            return self.inner(x, emb=emb)
        inner = self.inner
        n_txt = x.shape[1] - st.index.shape[1]
        # the module's own chunk order: shift, scale, gate
        img = _select_tokens(inner.linear(inner.silu(st.table)), st).chunk(3, dim=-1)
        txt = [p[:, None].expand(-1, n_txt, -1)  # (B, L, D): the background's, every text row
               for p in inner.linear(inner.silu(emb)).chunk(3, dim=-1)]
        shift, scale, gate = (torch.cat(pair, dim=1) for pair in zip(txt, img))  # (B, L + N, D)
        st.slots[("single", self._block)] = {"gate": gate}
        out = inner.norm(x) * (1 + scale) + shift  # (B, L + N, D)
        return out, x.new_ones(x.shape[0], x.shape[-1])  # neutral gate: the hook applies it


class FluxPerTokenTimestep(PerTokenTimestep):
    """Install per-token timesteps on a ``FluxTransformer2DModel`` (see module docstring).

    Use as a context manager (``with FluxPerTokenTimestep(transformer): transformer(x, ...,
    timestep=t_map)``) or call :meth:`install` / :meth:`remove`. A ``(B,)`` or scalar timestep
    takes the model's own path untouched; ``text_timestep=`` (a ``(B,)`` or scalar, in the
    call's units) sets the text tokens' timestep, by default the map's smallest. The gate,
    MLP-modulation and removal machinery is :class:`~asyndm.adapters.sd3.PerTokenTimestep`'s.
    """

    def __init__(self, transformer: nn.Module) -> None:
        check_flux_supported(transformer)
        super().__init__(transformer)

    def install(self) -> "FluxPerTokenTimestep":
        if self._handles:
            return self
        model = self.transformer
        add = self._handles.append
        add(model.register_forward_pre_hook(self._pre, with_kwargs=True))
        add(model.register_forward_hook(self._post, always_call=True))
        self._swap(model, "norm_out", _TokenNormOut(model.norm_out, self))
        for i, block in enumerate(model.transformer_blocks):
            # the block applies gate_msa to attn's image output, shift / scale_mlp to norm2's
            # output and gate_mlp to ff's: hooks there apply the per-token values
            self._swap(block, "norm1", _TokenNorm1(block.norm1, self, i))
            add(block.attn.register_forward_hook(self._gate_hook(i, "gate_msa")))
            add(block.norm2.register_forward_hook(self._mlp_norm_hook(i)))
            add(block.ff.register_forward_hook(self._gate_hook(i, "gate_mlp", last=True)))
        for i, block in enumerate(model.single_transformer_blocks):
            # the block applies its gate to proj_out's output
            self._swap(block, "norm", _TokenNormSingle(block.norm, self, i))
            add(block.proj_out.register_forward_hook(
                self._gate_hook(("single", i), "gate", last=True)))
        return self

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
        hidden = bound.arguments["hidden_states"]  # (B, N, C) packed latents
        t_tok = self._as_tokens(t, hidden)  # (B, N)
        dtype = hidden.dtype
        values, inverse = torch.unique(t_tok, return_inverse=True)  # (U,), (B, N)
        bsz, n_val = t_tok.shape[0], values.numel()
        # the model's own embedding of every (sample, distinct timestep) pair, with the
        # units the model applies to a (B,) timestep and guidance
        emb_args = [values.to(dtype).repeat(bsz) * 1000]  # (B U,)
        guidance = bound.arguments.get("guidance")
        if guidance is not None:
            emb_args.append(guidance.to(dtype).repeat_interleave(n_val, 0) * 1000)
        emb_args.append(bound.arguments["pooled_projections"].repeat_interleave(n_val, 0))
        table = module.time_text_embed(*emb_args)  # (B U, D)
        self.state = _CallState.of(inverse, table.reshape(bsz, n_val, -1))  # (B, N), (B, U, D)
        if text_t is None:
            text_t = t_tok.amin(dim=1)  # (B,): the background's timestep
        bound.arguments["timestep"] = torch.as_tensor(text_t, device=t.device).to(
            t.dtype).expand(bsz)
        return bound.args, bound.kwargs

    @staticmethod
    def _as_tokens(t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``t`` as a float32 ``(B, N)`` map in token order; checked against the latents."""
        bsz, n_tok = hidden.shape[0], hidden.shape[1]
        if t.ndim == 4 and t.shape[1] == 1:
            t = t[:, 0]  # (B, 1, h, w) -> (B, h, w)
        if t.ndim not in (2, 3) or t.shape[0] != bsz or t[0].numel() != n_tok:
            raise ValueError(
                f"a timestep map must be (B, h, w) with h * w = N or (B, N) = ({bsz}, {n_tok}) "
                f"for packed latents of shape {tuple(hidden.shape)}, got {tuple(t.shape)}")
        return t.reshape(bsz, n_tok).float()  # (B, N): row-major, Flux's packing order


# -- subject attention ---------------------------------------------------------------------
class FluxCaptureProcessor(CaptureProcessor):
    """Delegates to the layer's original processor and records image -> subject-text attention.

    The output is the original processor's, unchanged. Its signature names the arguments
    ``FluxAttention`` passes (it filters keywords by the processor's signature).

    Queries and keys are the ones the original processor made: forward hooks on the layer's
    ``norm_q``, ``norm_k`` and ``norm_added_k`` (installed by :class:`FluxAttentionCapture`)
    keep their outputs while a capture records, so no projection is computed twice; where a
    processor did not call them (or called them on other shapes) they are recomputed.

    The probabilities are read through the fused attention kernel rather than a materialised
    ``(B, H, N, L + N)`` matrix: attention with one-hot values (value ``c`` is ``1`` at subject
    column ``c``, else ``0``) returns, per query, exactly its softmax probability on each
    subject column. Inputs are float32; on the CPU the kernel is float32 throughout (matches
    the explicit softmax to ~1e-8), on CUDA the float32 kernel may use TF32 (~1e-3 relative),
    which the mean threshold of the masks does not resolve.
    """

    def __init__(self, inner, store) -> None:
        super().__init__(inner, store)
        self.seen: dict[str, torch.Tensor] = {}  # norm name -> its output in this call

    def norm_hook(self, name: str):
        """A forward hook for the layer's ``name`` norm: keeps its output while recording."""
        def hook(module, args, output):
            if self.store.positions is not None:
                self.seen[name] = output
        return hook

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        self.seen.clear()
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask,
                         image_rotary_emb, **kwargs)
        st = self.store
        if st.positions is not None and encoder_hidden_states is not None:
            st.add(self._flux_probs(attn, hidden_states, encoder_hidden_states,
                                    image_rotary_emb))
        self.seen.clear()
        return out

    def _projections(self, attn, hidden_states, encoder_hidden_states):
        """``(q, k_txt, k_img)`` ``(M, n, H, d)`` after the norms, for all rows."""
        seen = self.seen
        m, n_img, n_txt = hidden_states.shape[0], hidden_states.shape[1], \
            encoder_hidden_states.shape[1]
        shapes = {"norm_q": n_img, "norm_added_k": n_txt, "norm_k": n_img}
        if all(k in seen and seen[k].ndim == 4 and seen[k].shape[:2] == (m, n)
               for k, n in shapes.items()):
            return seen["norm_q"], seen["norm_added_k"], seen["norm_k"]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (-1, attn.head_dim))  # (M, n, H, d)

        return (attn.norm_q(split(attn.to_q(hidden_states))),
                attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states))),
                attn.norm_k(split(attn.to_k(hidden_states))))

    def _flux_probs(self, attn, hidden_states, encoder_hidden_states, rotary) -> torch.Tensor:
        """``(B, N, P)``: head-mean softmax probability of each image token on each column."""
        st = self.store
        n_txt = encoder_hidden_states.shape[1]
        q, k_txt, k_img = (t[st.rows] for t in
                           self._projections(attn, hidden_states, encoder_hidden_states))
        keys = torch.cat([k_txt, k_img], dim=1)  # (B, L + N, H, d): text first
        if rotary is not None:  # positions of cat(txt_ids, img_ids), as the processor uses
            cos, sin = rotary
            q = apply_rotary_emb(q, (cos[n_txt:], sin[n_txt:]), sequence_dim=1)
            keys = apply_rotary_emb(keys, rotary, sequence_dim=1)
        q = q.transpose(1, 2).float()  # (B, H, N, d)
        keys = keys.transpose(1, 2).float()  # (B, H, L + N, d)
        heads, dim = q.shape[1], q.shape[3]
        # text column p is T5 token p; one-hot values of the kernel's head size (which the
        # fused kernels need), a head size of columns at a time
        onehot = F.one_hot(st.positions, keys.shape[2]).transpose(1, 2).float()  # (B, L+N, P)
        picked = []
        for c0 in range(0, onehot.shape[2], dim):
            part = onehot[:, :, c0:c0 + dim]  # (B, L + N, c)
            values = F.pad(part, (0, dim - part.shape[2]))[:, None]  # (B, 1, L + N, d)
            probs = F.scaled_dot_product_attention(
                q, keys, values.expand(-1, heads, -1, -1))  # (B, H, N, d)
            picked.append(probs[..., :part.shape[2]])
        return torch.cat(picked, dim=-1).mean(dim=1)  # (B, N, P)


class FluxAttentionCapture(JointAttentionCapture):
    """Capture processors on the joint attention of some double-stream blocks.

    ``start`` / ``stop`` (``(B, P, h, w)`` token-grid maps, mean over heads, then layers) are
    :class:`~asyndm.adapters.attention.AttentionCapture`'s; ``remove`` also removes the norm
    hooks of :class:`FluxCaptureProcessor`.

    Args:
        transformer: a ``FluxTransformer2DModel``.
        token_hw: the token grid ``(h, w)`` of the run.
        layers: double-stream block indices; default the middle third
            (:func:`~asyndm.adapters.sd3.default_capture_layers`).
    """

    def install(self) -> "FluxAttentionCapture":
        if self._originals:
            return self
        self._handles = []
        for name, mod in self.layers.items():
            if getattr(mod, "fused_projections", False):
                raise UnsupportedModelError(f"{name}: fused qkv projections")
            self._originals[name] = mod.processor
            proc = FluxCaptureProcessor(mod.processor, self._store)
            mod.set_processor(proc)
            for norm in ("norm_q", "norm_k", "norm_added_k"):
                self._handles.append(
                    getattr(mod, norm).register_forward_hook(proc.norm_hook(norm)))
        return self

    def remove(self) -> None:
        for handle in getattr(self, "_handles", ()):
            handle.remove()
        self._handles = []
        super().remove()
