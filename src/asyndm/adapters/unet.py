"""Per-pixel time embedding for diffusers' ``UNet2DConditionModel``, through hooks only.

While :class:`PerPixelTimestep` is installed, the UNet accepts a timestep *map*
``(B, h, w)`` (or ``(B, 1, h, w)``) of integer timesteps wherever it accepted a timestep.
Scalar and ``(B,)`` timesteps still take the UNet's own path untouched.

How it works (no diffusers code is copied or patched):

1. A forward-pre hook on the UNet takes the map out of the call and hands the UNet a
   placeholder ``(B,)`` timestep.
2. While a map is in use, ``unet.time_proj``, ``unet.time_embedding`` and every ResNet's
   ``time_emb_proj`` are stand-ins (:class:`_Silenced`) that return cached zeros without
   computing anything, so the per-sample embedding the UNet builds is exactly the *extra*
   part (SDXL's ``text_time`` addition, class embeddings), which a pre-hook on
   ``time_embed_act`` (or on the first ResNet) records, and the ResNets' broadcast
   ``temb`` adds add zeros. With a scalar or vector timestep the stand-ins call the
   original modules.
3. Once per run, every timestep ``0 .. T-1`` is embedded (sinusoid, time MLP, plus the
   extra) and projected by every ResNet's own ``time_emb_proj``, side by side per UNet
   block: a table ``(T, sum C)`` per block (``(B T, sum C)`` when the extra differs per
   sample). That is one matrix product per ResNet per run (SD 2.1: 52 GFLOP
   and 80 MiB in float32 in all), kept while the same conditioning tensors come back, as
   they do at every step of a pipeline's loop.
4. Per call, at the first ResNet of a block, one ``embedding`` lookup of the map (resized,
   nearest, to the block's resolution) reads ``(B, h, w, sum C)`` from the table, split into
   per-ResNet views; a forward hook on each ``conv1`` adds its view, which is where
   diffusers adds the embedding for ``time_embedding_norm="default"``. The block's last
   ResNet lets the lookup go, so one block's lookup is alive at a time (SD 2.1, 512 px, CFG:
   at most 31 MiB in float32).

Cost: every operator counts (a fast GPU running SD at batch 1-2 waits on the host's
operator dispatch). Per ResNet this adds one ``add`` and skips the ResNet's projection and
the UNet's time MLP; per block a lookup and a split. On SD 2.1's architecture that is fewer
operators than the UNet's own scalar path (``benchmarks/profile_overhead.py``), no host
synchronisation, and shapes that do not depend on the map's values (for ``torch.compile``).

With gradients enabled (training on timestep maps, `asyndm.shapes.train`) the tables are
made anew at every call, inside its graph, so gradients reach the time MLP and every
ResNet's ``time_emb_proj``; the cache only serves inference.

Removing the hooks (``remove()`` or leaving the ``with`` block) restores the UNet exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.\d+\.|^mid_block\.")


def _tensors(values) -> tuple:
    """The tensors among call arguments (one level into dicts, as ``added_cond_kwargs``)."""
    out = []
    for v in values:
        if torch.is_tensor(v):
            out.append(v)
        elif isinstance(v, dict):
            out.extend(x for _, x in sorted(v.items()) if torch.is_tensor(x))
    return tuple(out)


def _unchanged(cached: tuple | None, now: tuple | None) -> bool:
    """Whether the tensors ``now`` are the ``(tensor, version)`` pairs ``cached``: the same
    objects, not modified in place since."""
    if cached is None or now is None:
        return cached is now
    return len(cached) == len(now) and all(
        t is u and t._version == ver for (t, ver), u in zip(cached, now))


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


class _Silenced(nn.Module):
    """Stand-in for a time-embedding module: cached zeros while a map is in use.

    ``first_only``: only the first call of each UNet call is silenced (``time_proj`` also
    embeds ``class_embed_type="timestep"`` labels, which must stay).
    """

    def __init__(self, inner: nn.Module, owner: "PerPixelTimestep", width: int,
                 first_only: bool = False) -> None:
        super().__init__()
        self.inner, self.width, self.first_only = inner, width, first_only
        object.__setattr__(self, "owner", owner)  # not a submodule

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.owner._state
        if st is None or (self.first_only and st.silenced_time_proj):
            return self.inner(x, *args, **kwargs)
        if self.first_only:
            st.silenced_time_proj = True
        return self.zeros(x.shape[0], x.dtype, x.device)

    def zeros(self, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The cached ``(rows, width)`` zeros it returns (``Timesteps`` gives float32)."""
        dtype = torch.float32 if self.first_only else dtype
        return self.owner._zeros((rows, self.width), dtype, device)


@dataclass
class _Group:
    """The ResNets of one UNet block, whose projections of the table are read as one."""

    resnets: list[nn.Module]
    act: nn.Module | None  # the activation the ResNets apply to ``temb`` (None: skipped)

    def project(self, temb: torch.Tensor) -> torch.Tensor:
        """``(..., sum C)``: every ResNet's own ``time_emb_proj`` (LoRA layers included) of
        ``temb``, side by side."""
        return torch.cat([r.time_emb_proj.inner(temb) for r in self.resnets], dim=-1)

    @property
    def sizes(self) -> list[int]:
        return [r.time_emb_proj.inner.out_features for r in self.resnets]


@dataclass
class _CallState:
    """What one UNet call needs across its hooks; reset at every call."""

    t_map: torch.Tensor  # (B, h, w) int64
    source: tuple  # the call's conditioning tensors: the extra embedding is a function of them
    dtype: torch.dtype = torch.float32
    silenced_time_proj: bool = False
    extra: torch.Tensor | None = None  # (B, C) per-sample extra, where recorded in the call
    tables: list[torch.Tensor] | None = None  # per group: (T | B T, sum C)
    rows_at: dict[tuple[int, int] | None, torch.Tensor] = field(default_factory=dict)
    """Table rows per resolution (``None``: the map's own): ``t`` or ``b T + t``."""
    maps: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # group -> views


class PerPixelTimestep:
    """Install per-pixel time-embedding hooks on a ``UNet2DConditionModel``.

    Use as a context manager (``with PerPixelTimestep(unet): unet(x, t_map, ...)``) or call
    :meth:`install` / :meth:`remove`. Timesteps of a map lie in ``[0, num_timesteps)``
    (the scheduler's ``num_train_timesteps``).
    """

    def __init__(self, unet: nn.Module, num_timesteps: int = 1000) -> None:
        check_unet_supported(unet)
        self.unet = unet
        self.num_timesteps = int(num_timesteps)
        self._handles: list[RemovableHandle] = []
        # (parent, name, original, stand-in)
        self._swapped: list[tuple[nn.Module, str, nn.Module, _Silenced]] = []
        self._state: _CallState | None = None
        self._zero_cache: dict[tuple, torch.Tensor] = {}
        self._groups: list[_Group] = []
        self._where: dict[nn.Module, tuple[int, int]] = {}  # ResNet -> (group, index)
        self._extra = "none"  # how the per-sample extra embedding is known (_extra_kind)
        self._embedded: tuple | None = None  # (device, dtype, weights, (T, C) table)
        # ((device, dtype), conditioning (tensor, version) pairs or None, per group tables)
        self._tables: tuple | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def install(self) -> "PerPixelTimestep":
        if self._handles:
            return self
        unet = self.unet
        add = self._handles.append
        add(unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
        add(unet.register_forward_hook(self._unet_post))
        self._swap(unet, "time_proj", unet.time_proj.num_channels, first_only=True)
        self._swap(unet, "time_embedding", unet.time_embedding.linear_2.out_features)
        act = getattr(unet, "time_embed_act", None)  # SD 1.x / 2.x and ControlNets have none
        self._extra = self._extra_kind()
        record = self._extra == "recorded"
        if act is not None and record:
            add(act.register_forward_pre_hook(self._record_extra))
        groups: dict[tuple, _Group] = {}
        for name, mod in unet.named_modules():
            if type(mod).__name__ != "ResnetBlock2D" or mod.time_emb_proj is None:
                continue
            if act is None and record:
                add(mod.register_forward_pre_hook(self._record_extra_from_resnet,
                                                  with_kwargs=True))
            resnet_act = None if mod.skip_time_act else mod.nonlinearity
            block = _BLOCK.match(name)  # a UNet block's ResNets run one after the other
            key = (block.group(0) if block else name, type(resnet_act))
            group = groups.setdefault(key, _Group([], resnet_act))
            self._where[mod] = (list(groups).index(key), len(group.resnets))
            group.resnets.append(mod)
            self._swap(mod, "time_emb_proj", mod.time_emb_proj.out_features)
            add(mod.conv1.register_forward_hook(self._make_conv1_hook(mod)))
        self._groups = list(groups.values())
        return self

    def _extra_kind(self) -> str:
        """How the per-sample extra embedding is known: ``"none"`` (no class or added
        embedding: SD 1.x / 2.x), ``"eager"`` (made before the call with the model's own
        ``get_class_embed`` / ``get_aug_embed``: SDXL) or ``"recorded"`` (read inside the
        call, where the model has no such methods: a ControlNet with added embeddings)."""
        m = self.unet
        if all(getattr(m, name, None) is None for name in ("class_embedding", "add_embedding")):
            return "none"
        if hasattr(m, "get_class_embed") and hasattr(m, "get_aug_embed"):
            return "eager"
        return "recorded"

    def _swap(self, parent: nn.Module, name: str, width: int, first_only: bool = False) -> None:
        original = getattr(parent, name)
        stand_in = _Silenced(original, self, width, first_only)
        setattr(parent, name, stand_in)
        self._swapped.append((parent, name, original, stand_in))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        while self._swapped:
            parent, name, original, _ = self._swapped.pop()
            setattr(parent, name, original)
        self._state = None
        self._zero_cache.clear()
        self._groups, self._where = [], {}
        self._embedded = self._tables = None

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
        source = (*args[2:], *(v for k, v in sorted(kwargs.items()) if k != "timestep"))
        st = _CallState(t_map=t_map, source=_tensors(source), dtype=sample.dtype)
        if torch.is_grad_enabled():  # training: this call's tables, in this call's graph
            self._tables = self._embedded = None
        for *_, stand_in in self._swapped:  # made outside a compiled call
            stand_in.zeros(sample.shape[0], sample.dtype, sample.device)
        if self._extra != "recorded":  # the tables before the call: the call only looks up
            # (the stand-ins pass through until the state is set: class embeddings of
            # class_embed_type="timestep" use time_proj)
            self._prepare(st, lambda: self._eager_extra(sample, args, kwargs), sample)
        self._state = st
        placeholder = t_map.flatten(1)[:, 0]  # (B,): its embedding is zeroed
        if in_args:
            args = (args[0], placeholder, *args[2:])
        else:
            kwargs = {**kwargs, "timestep": placeholder}
        return args, kwargs

    def _unet_post(self, module, args, output):
        self._state = None
        return output

    def _zeros(self, shape: tuple, dtype, device) -> torch.Tensor:
        # one zero tensor per shape: the UNet only reads it (``h + temb``, out of place)
        key = (shape, dtype, device)
        zeros = self._zero_cache.get(key)
        if zeros is None:
            zeros = self._zero_cache[key] = torch.zeros(shape, dtype=dtype, device=device)
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

    def _eager_extra(self, sample, args, kwargs) -> torch.Tensor:
        """``(B, C)`` class plus added embedding, by the model's own methods."""
        m = self.unet
        params = ("encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
                  "cross_attention_kwargs", "added_cond_kwargs")
        call = {**dict(zip(params, args[2:])), **kwargs}
        width = m.time_embedding.inner.linear_2.out_features
        emb = torch.zeros(sample.shape[0], width, device=sample.device, dtype=sample.dtype)
        extra = m.get_class_embed(sample=sample, class_labels=call.get("class_labels"))
        aug = m.get_aug_embed(emb=emb, encoder_hidden_states=call.get("encoder_hidden_states"),
                              added_cond_kwargs=call.get("added_cond_kwargs") or {})
        if aug is not None:
            extra = aug if extra is None else extra + aug
        return emb if extra is None else extra.to(emb.dtype)

    def _prepare(self, st: _CallState, extra, like: torch.Tensor) -> None:
        """The call's tables and its map's table rows (``b T + t`` for per-sample tables);
        ``extra()`` gives the ``(B, C)`` extra embedding, asked for only to make tables."""
        st.tables = self._projection_tables(st, extra, like)
        rows = st.t_map
        if st.tables[0].shape[0] != self.num_timesteps:  # per sample: b's rows from b * T
            offset = torch.arange(0, rows.shape[0] * self.num_timesteps, self.num_timesteps,
                                  device=rows.device)  # (B,)
            rows = rows + offset[:, None, None]  # (B, h, w)
        st.rows_at[None] = rows

    # -- the run's tables --------------------------------------------------------------------
    def _embedding_table(self, device, dtype) -> torch.Tensor:
        """``(T, C)``: the time MLP of every timestep ``0 .. T-1``, once per device / dtype."""
        mlp = self.unet.time_embedding.inner
        weights = mlp.linear_1.weight
        cached = self._embedded
        if cached is None or cached[:3] != (device, dtype, weights.data_ptr()):
            steps = torch.arange(self.num_timesteps, device=device)  # (T,)
            t_emb = self.unet.time_proj.inner(steps).to(dtype=dtype)  # (T, C0)
            self._embedded = cached = (device, dtype, weights.data_ptr(), mlp(t_emb))
        return cached[3]

    def _projection_tables(self, st: _CallState, extra,
                           like: torch.Tensor) -> list[torch.Tensor]:
        """Per group, ``(T, sum C)`` (or ``(B T, sum C)``) projections of the table; kept
        while the call's conditioning tensors are the same objects, unmodified (``extra``:
        as in :meth:`_prepare`, called only for new per-sample tables)."""
        per_sample = self._extra != "none"
        source = st.source if per_sample else None
        if (self._tables is not None and self._tables[0] == (like.device, like.dtype)
                and _unchanged(self._tables[1], source)):
            return self._tables[2]
        emb = self._embedding_table(like.device, like.dtype)  # (T, C)
        if per_sample:
            emb = emb + extra()[:, None]  # (B, T, C)
        act = getattr(self.unet, "time_embed_act", None)
        if act is not None:
            emb = act(emb)
        acts: dict[type, torch.Tensor] = {}
        tables = []
        for group in self._groups:
            temb = emb
            if group.act is not None:
                temb = acts.get(type(group.act))
                if temb is None:
                    temb = acts[type(group.act)] = group.act(emb)  # shared by the groups
            tables.append(group.project(temb).flatten(0, -2))  # (T | B T, sum C)
        versions = None if source is None else tuple((t, t._version) for t in source)
        self._tables = ((like.device, like.dtype), versions, tables)
        return tables

    def _rows_at(self, st: _CallState, size: tuple[int, int]) -> torch.Tensor:
        """``(B, h_l, w_l)`` table rows of the map resized (nearest) to a block's resolution."""
        rows = st.rows_at.get(size)
        if rows is None:
            full = st.rows_at[None]
            h, w = full.shape[-2:]
            fh, fw = h // size[0], w // size[1]
            if (fh * size[0], fw * size[1]) == (h, w):  # nearest: every f-th pixel
                rows = full[:, ::fh, ::fw]
            else:
                up = F.interpolate(full[:, None].float(), size=size, mode="nearest")
                rows = up[:, 0].long()  # (B, h_l, w_l)
            st.rows_at[size] = rows
        return rows

    def _group_maps(self, st: _CallState, g: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every ResNet of group ``g``: its projection per pixel, ``(B, C, h, w)`` views."""
        maps = st.maps.get(g)
        if maps is None:
            if st.tables is None:  # the extra was recorded inside this call
                self._prepare(st, lambda: st.extra, like)
            table = st.tables[g]  # (T | B T, sum C)
            rows = self._rows_at(st, tuple(like.shape[-2:]))  # (B, h, w)
            gathered = F.embedding(rows, table)  # (B, h, w, sum C)
            maps = gathered.permute(0, 3, 1, 2).split(self._groups[g].sizes, dim=1)
            st.maps[g] = maps  # (B, C_r, h, w) each, channels last in memory
        return maps

    def _make_conv1_hook(self, resnet: nn.Module):
        g, index = self._where[resnet]

        def hook(module, args, output):
            st = self._state
            if st is None:
                return None
            view = self._group_maps(st, g, output)[index]
            if view.shape != output.shape:
                raise RuntimeError(f"ResNets grouped as one block disagree on their size "
                                   f"({tuple(view.shape)} vs {tuple(output.shape)})")
            if index == len(self._groups[g].resnets) - 1:
                del st.maps[g]  # the block's last ResNet: its gathered maps can go
            # conv1(h) + proj[u(pixel)]: conv1's output is this block's own, fresh tensor
            return output.add_(view)

        return hook
