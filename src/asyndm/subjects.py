"""Subjects by word: map subject words or phrases to the prompt's token positions.

A subject is given as

* a word or phrase (``"cat"``, ``"red car"``): all its tokens, first occurrence;
* a word with an occurrence (``"cat#2"``): the second occurrence of ``cat`` (from 1);
* an int or a sequence of ints: raw token positions of the prompt's own tokens (position 0
  is the start token; the end token and the padding after it are refused).

The paper's ``*_item.json`` files give 0-based indices that the reference applies to the
text tokens after the start token, so index ``i`` is token position ``i + 1``
(:func:`paper_positions`). Those indices count words, so wherever an earlier word splits
into several tokens they point at another token than the intended word; word mode avoids
that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampler import Subjects

SubjectSpec = str | int | Sequence[int]
_OCCURRENCE = re.compile(r"^(.*\S)#(\d+)$")


@dataclass(frozen=True)
class ResolvedSubject:
    """One subject: its label, token positions in the prompt and curve strength."""

    label: str
    positions: tuple[int, ...]
    k: float

    def __post_init__(self) -> None:
        if not self.positions:
            raise ValueError(f"subject {self.label!r} has no token positions")
        if not 0 < self.k < 1:
            raise ValueError(f"subject {self.label!r}: k must be in (0, 1), got {self.k}")


def paper_positions(indices: Sequence[int]) -> list[tuple[int]]:
    """The reference's subject indices as token positions (one token per subject)."""
    return [(int(i) + 1,) for i in indices]


def _prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt with the start token, truncated like the text encoder sees it."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


def _describe(tokenizer, ids: list[int]) -> str:
    toks = tokenizer.convert_ids_to_tokens(ids)
    return ", ".join(f"{i}:{t}" for i, t in enumerate(toks))


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub]


def resolve_subject(tokenizer, prompt: str, spec: SubjectSpec, k: float) -> ResolvedSubject:
    """Resolve one subject spec against a prompt (see module docstring)."""
    ids = _prompt_tokens(tokenizer, prompt)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    n_valid = len(ids)
    if isinstance(spec, int) or (not isinstance(spec, str) and isinstance(spec, Sequence)):
        if not isinstance(spec, int) and any(isinstance(p, str) for p in spec):
            raise ValueError(f"subject {list(spec)!r} for prompt {prompt!r}: a list inside "
                             "the subjects is one subject's token positions (integers); give "
                             "words as plain strings, one list per prompt")
        positions = (spec,) if isinstance(spec, int) else tuple(int(p) for p in spec)
        # the prompt's own tokens: not the start token, not the end token or the padding
        # (T5, Flux's text columns, has no start token: its position 0 is the first word)
        first = 1 if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id \
            else 0
        last = n_valid - 2 if ids[-1] == tokenizer.eos_token_id else n_valid - 1
        bad = [p for p in positions if not first <= p <= last]
        if bad:
            start = "0 is the start token, " if first else ""
            raise ValueError(
                f"token positions {bad} outside the prompt's tokens {first}..{last} for prompt "
                f"{prompt!r} ({start}beyond {last} the end token and "
                f"padding); tokens: {_describe(tokenizer, ids)}"
            )
        return ResolvedSubject(label=f"tokens{list(positions)}", positions=positions, k=k)
    text, occurrence = spec.strip(), 1
    m = _OCCURRENCE.match(text)
    if m:
        text, occurrence = m.group(1), int(m.group(2))
        if occurrence < 1:
            raise ValueError(f"subject {spec!r}: occurrences count from 1 "
                             f"('{text}#1' is the first {text!r})")
    if not text:
        raise ValueError(f"empty subject for prompt {prompt!r}")
    sub = [i for i in tokenizer(text, add_special_tokens=False).input_ids if i not in special]
    hits = _find([i if i not in special else -1 for i in ids], sub) if sub else []
    if len(hits) < occurrence:
        full = tokenizer(prompt, truncation=False).input_ids
        cut = len(_find(full, sub)) >= occurrence and len(full) > n_valid
        why = (
            f"is cut off by truncation at {tokenizer.model_max_length} tokens" if cut
            else "does not occur" if not hits
            else f"occurs only {len(hits)} time(s)"
        )
        which = f"occurrence {occurrence} of " if occurrence > 1 else ""
        raise ValueError(
            f"subject {which}{text!r} {why} in prompt {prompt!r}; its tokens are: "
            f"{_describe(tokenizer, ids)}"
        )
    start = hits[occurrence - 1]
    return ResolvedSubject(label=spec if isinstance(spec, str) else text,
                           positions=tuple(range(start, start + len(sub))), k=k)


def k_values(k: float | Sequence[float], n: int, noun: str, context: str = "") -> list[float]:
    """``k`` (one value for all, or one per item) as ``n`` floats; the error names ``noun``."""
    ks = [float(k)] * n if not isinstance(k, (list, tuple)) else [float(v) for v in k]
    if len(ks) != n:
        raise ValueError(f"{n} {noun} but {len(ks)} k values{context}")
    return ks


def resolve_subjects(
    tokenizer, prompt: str, specs: Sequence[SubjectSpec], k: float | Sequence[float]
) -> list[ResolvedSubject]:
    """Resolve all subjects of one prompt; ``k`` is one value or one per subject."""
    if not specs:
        raise ValueError(f"no subjects given for prompt {prompt!r}")
    ks = k_values(k, len(specs), "subjects", f" for prompt {prompt!r}")
    return [resolve_subject(tokenizer, prompt, s, kk) for s, kk in zip(specs, ks)]


def batch_subjects(per_prompt: Sequence[Sequence[ResolvedSubject]],
                   device: torch.device | str | None = None) -> Subjects:
    """Pad a batch of resolved subjects into :class:`~asyndm.sampler.Subjects` tensors."""
    bsz = len(per_prompt)
    n_s = max(len(s) for s in per_prompt)
    n_p = max(sum(len(x.positions) for x in s) for s in per_prompt)
    positions = torch.zeros(bsz, n_p, dtype=torch.long)
    weights = torch.zeros(bsz, n_s, n_p)
    k = torch.zeros(bsz, n_s)
    first = torch.zeros(bsz, n_s, dtype=torch.long)
    for b, subs in enumerate(per_prompt):
        col = 0
        for s, sub in enumerate(subs):
            for p in sub.positions:
                positions[b, col] = p
                weights[b, s, col] = 1.0 / len(sub.positions)
                col += 1
            k[b, s] = sub.k
            first[b, s] = sub.positions[0]
        positions[b, col:] = positions[b, 0]  # padding columns get weight 0
    return Subjects(positions=positions.to(device), weights=weights.to(device),
                    k=k.to(device), first_position=first.to(device))


def subject_tokenizer(pipe):
    """The tokenizer whose token ``p`` is text column ``p`` of ``pipe``'s subject attention:
    Flux's T5 (``tokenizer_2``), else ``tokenizer``."""
    if type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel":
        return pipe.tokenizer_2
    return pipe.tokenizer


def check_for_pipeline(pipe, prompt: str, specs: Sequence[SubjectSpec],
                       k: float | Sequence[float], steps: int,
                       curve: str) -> list[ResolvedSubject]:
    """Resolve ``specs`` with ``pipe``'s tokenizer and check every ``k`` against the DDIM
    plan of ``steps`` and ``curve``, before any model work (flow pipelines check their own k).
    """
    from diffusers import DDIMScheduler

    from .schedules import SchedulePlan

    resolved = resolve_subjects(subject_tokenizer(pipe), prompt, specs, k)
    if isinstance(pipe.scheduler, DDIMScheduler):
        plan = SchedulePlan.from_scheduler(pipe.scheduler, steps, curve)
        for sub in resolved:
            plan.validate_k(sub.k)
    return resolved
