"""The generated CLIP vocabulary: one token per word, real transformers tokenizers load it."""

from __future__ import annotations

import json
import random

import pytest
from transformers import CLIPTokenizer, CLIPTokenizerFast

from asyndm.shapes.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    bpe_merges_for_words,
    write_clip_tokenizer,
    write_vocab_files,
)

WORDS = "a the red blue green circle circles square on left of to its right above".split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_clip_tokenizer(WORDS, out, model_max_length=16)
    return out


def test_every_word_is_one_token_and_ids_round_trip(tok_dir):
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1
        assert tok.convert_ids_to_tokens(ids) == [word + "</w>"]
        assert tok.decode(ids) == word
    prompt = "a red circle to the left of the blue square"
    ids = tok(prompt).input_ids
    assert len(ids) == len(prompt.split()) + 2
    assert tok.decode(ids, skip_special_tokens=True) == prompt


def test_special_tokens_and_layout(tok_dir):
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab[BOS_TOKEN] == len(vocab) - 2 and vocab[EOS_TOKEN] == len(vocab) - 1
    assert tok.bos_token == BOS_TOKEN and tok.eos_token == EOS_TOKEN
    assert tok.pad_token == EOS_TOKEN and tok.pad_token_id == vocab[EOS_TOKEN]
    assert vocab["a"] == ord("a") and vocab["a</w>"] == 256 + ord("a")
    assert (tok_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version")


def test_max_length_padding_and_truncation(tok_dir):
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    assert tok.model_max_length == 16
    enc = tok(["red", " ".join(["circle"] * 40)], padding="max_length",
              max_length=tok.model_max_length, truncation=True)
    short, long = enc.input_ids
    assert len(short) == len(long) == 16
    assert short[:3] == [tok.bos_token_id, tok.convert_tokens_to_ids("red</w>"), tok.eos_token_id]
    assert set(short[3:]) == {tok.pad_token_id}
    assert long[0] == tok.bos_token_id and long[-1] == tok.eos_token_id


def test_unknown_words_fall_back_to_characters(tok_dir):
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    pieces = tok.tokenize("zebra")
    assert "".join(pieces) == "zebra</w>" and len(pieces) > 1
    assert tok.unk_token_id not in tok("zebra 7 ?!", add_special_tokens=False).input_ids


def test_fast_class_name_loads_the_same_vocabulary(tok_dir):
    slow = CLIPTokenizer.from_pretrained(str(tok_dir))
    fast = CLIPTokenizerFast.from_pretrained(str(tok_dir))
    prompt = "the green circles above its square"
    assert slow(prompt).input_ids == fast(prompt).input_ids


def test_merges_build_words_left_to_right_from_characters():
    assert bpe_merges_for_words(["red", "on"]) == [
        ("o", "n</w>"), ("r", "e"), ("re", "d</w>"),
    ]


def test_conflicting_words_still_become_single_tokens(tmp_path):
    rng = random.Random(0)
    words = ["ab", "bc", "abc", "aaa", "aa", "a", "ba", "bab"]
    words += ["".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(150)]
    tok = write_clip_tokenizer(words, tmp_path)
    assert all(len(tok.tokenize(w)) == 1 for w in set(words))


def test_vocabulary_depends_on_the_set_not_the_order(tmp_path):
    write_clip_tokenizer(WORDS, tmp_path / "x")
    write_clip_tokenizer(list(reversed(WORDS)) + WORDS[:3], tmp_path / "y")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "x" / name).read_text() == (tmp_path / "y" / name).read_text()


def test_write_vocab_files_reproduces_the_classic_files(tmp_path):
    tok = write_clip_tokenizer(WORDS, tmp_path / "a")
    write_vocab_files(tok, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    b = json.loads((tmp_path / "b" / "vocab.json").read_text(encoding="utf-8"))
    assert a == b
    merges = [(tmp_path / d / "merges.txt").read_text(encoding="utf-8") for d in ("a", "b")]
    assert merges[0] == merges[1]


@pytest.mark.parametrize("bad", ["Red", "two words", "", "ab1", "red\n"])
def test_rejects_words_that_cannot_be_one_token(tmp_path, bad):
    with pytest.raises(ValueError):
        write_clip_tokenizer(["red", bad], tmp_path)
