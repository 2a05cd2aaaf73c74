"""A real CLIP BPE vocabulary, generated for a closed word list, so no download is needed.

`write_clip_tokenizer(words, out_dir)` writes ``vocab.json`` and ``merges.txt`` in the format
of OpenAI's CLIP tokenizer and loads them with transformers' own `CLIPTokenizer`. Every given
word becomes exactly one token ``word</w>``; any other text still tokenizes, into byte-level
characters, because all 256 byte symbols and their ``</w>`` forms are in the vocabulary.

Vocabulary layout (the same as CLIP's):

| ids                   | tokens                                            |
|-----------------------|---------------------------------------------------|
| 0 .. 255              | the 256 byte-level symbols                        |
| 256 .. 511            | the same symbols followed by ``</w>``             |
| 512 .. 512 + M - 1    | the result of each merge, in merge order          |
| last two              | ``<|startoftext|>``, ``<|endoftext|>`` (also pad) |

Merges are found by simulating BPE itself: words are visited in sorted order and each one is
built left to right, merging its first two symbols, until the tokenizer's own merge rule
(lowest rank first) turns it into a single token. When words share no conflicting pairs this is
plain left-to-right construction from characters; when an earlier word's merge cuts into a later
word, the later word continues from whatever BPE left it with, so every word still ends as one
token. Each new merge has the highest rank so far, so it never changes how earlier words merge.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from transformers import CLIPTokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "END_OF_WORD",
    "bpe_merges_for_words",
    "write_clip_tokenizer",
    "write_vocab_files",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
_MERGES_HEADER = "#version: 0.2"
# CLIP's pre-tokenizer keeps a run of letters, or a single digit, or a run of other symbols,
# together; a vocabulary word must be exactly one such piece to become one token.
_ONE_PIECE = re.compile(r"(?:[^\W\d_]+|\d|(?:[^\w\s]|_)+)")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for the bytes 0..255, by byte.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen)
    are moved, in byte order, to code points from 256 upward, which is the GPT-2/CLIP scheme.
    """
    keep = set(range(ord("!"), ord("~") + 1))
    keep |= set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    symbols, moved = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + moved))
            moved += 1
    return symbols


def _word_symbols(word: str, byte_symbols: list[str]) -> list[str]:
    """The initial BPE symbols of one word: its UTF-8 bytes, the last carrying ``</w>``."""
    symbols = [byte_symbols[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return symbols


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge ``symbols`` as CLIP's BPE does: repeatedly merge the lowest-ranked adjacent pair.

    All non-overlapping occurrences of that pair are merged left to right in one pass.
    """
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _check_words(words: Sequence[str]) -> list[str]:
    """Validate the word list and return its distinct words, sorted (ids then depend on the set)."""
    out = set()
    for word in words:
        if not isinstance(word, str) or not word:
            raise ValueError(f"words must be non-empty strings, got {word!r}")
        if word != unicodedata.normalize("NFC", word).lower():
            raise ValueError(f"words must be lower-case NFC text, got {word!r}")
        if _ONE_PIECE.fullmatch(word) is None:
            raise ValueError(
                f"{word!r} would be split by CLIP's pre-tokenizer; a word must be a run of "
                "letters, one digit, or a run of punctuation, without spaces"
            )
        out.add(word)
    return sorted(out)


def bpe_merges_for_words(words: Sequence[str]) -> list[tuple[str, str]]:
    """The BPE merges (in rank order) that make every word in ``words`` a single token.

    Contract: for each word ``w``, CLIP BPE with these merges maps ``w`` to ``[w + "</w>"]``.
    Pure and deterministic: the result depends only on the set of words.
    """
    byte_symbols = _byte_symbols()
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for word in _check_words(words):
        symbols = _apply_bpe(_word_symbols(word, byte_symbols), ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply_bpe(symbols, ranks)
    return merges


def _vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in CLIP's layout (see the module docstring)."""
    byte_symbols = _byte_symbols()
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
    tokens += [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        # Two merge paths can produce the same string; the token keeps its first id.
        vocab.setdefault(token, len(vocab))
    return vocab


def _write_files(out_dir: Path, vocab: dict[str, int], merges: Sequence[Sequence[str]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    lines = [_MERGES_HEADER] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_clip_tokenizer(
    words: Sequence[str], out_dir: str | Path, model_max_length: int = 32
) -> CLIPTokenizer:
    """Write a CLIP tokenizer for ``words`` to ``out_dir`` and return it, loaded by transformers.

    Args:
        words: lower-case words (each a run of letters, a digit or a run of punctuation);
            duplicates are ignored and the order does not matter.
        out_dir: folder for ``vocab.json``, ``merges.txt`` and transformers' own tokenizer
            files (``tokenizer.json``, ``tokenizer_config.json``); created if missing.
        model_max_length: the padded length of every prompt, ``<|startoftext|>`` and
            ``<|endoftext|>`` included; the text encoder's ``max_position_embeddings``.

    Returns:
        ``CLIPTokenizer`` in which every word of ``words`` is the single token ``word</w>``,
        pad = unk = eos = ``<|endoftext|>``, and ``from_pretrained(out_dir)`` gives it back.

    Raises:
        ValueError: a word is not lower-case, or CLIP's pre-tokenizer would split it; or the
            loaded tokenizer does not give one token per word (a transformers change).
    """
    if model_max_length < 3:
        raise ValueError(f"model_max_length must be >= 3, got {model_max_length}")
    out_dir = Path(out_dir)
    merges = bpe_merges_for_words(words)
    _write_files(out_dir, _vocabulary(merges), merges)
    tokenizer = CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=model_max_length)
    tokenizer.save_pretrained(str(out_dir))
    _check_single_tokens(tokenizer, _check_words(words))
    return tokenizer


def _check_single_tokens(tokenizer: CLIPTokenizer, words: Sequence[str]) -> None:
    """Fail loudly if the real tokenizer does not map each word to its own single token."""
    byte_symbols = _byte_symbols()
    bad = [w for w in words if tokenizer.tokenize(w) != ["".join(_word_symbols(w, byte_symbols))]]
    if bad:
        raise ValueError(f"words not tokenized as one token: {bad[:10]}")


def write_vocab_files(tokenizer: CLIPTokenizer, out_dir: str | Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of a loaded CLIP tokenizer into ``out_dir``.

    transformers 5 saves only ``tokenizer.json``; the two classic files let older transformers
    (whose slow ``CLIPTokenizer`` needs them) load the same tokenizer.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    _write_files(Path(out_dir), dict(model["vocab"]), merges)
