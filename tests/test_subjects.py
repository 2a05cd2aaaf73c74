import json
from pathlib import Path

import pytest

from asyndm.subjects import batch_subjects, paper_positions, resolve_subject, resolve_subjects

PAPER = Path(__file__).resolve().parent / "data" / "paper"  # the paper's prompt sets


def test_words_map_to_their_token_positions(tokenizer):
    subs = resolve_subjects(tokenizer, "a cat eating a sandwich", ["cat", "sandwich"], [0.5, 0.3])
    assert [s.positions for s in subs] == [(2,), (5,)]
    assert [s.k for s in subs] == [0.5, 0.3]


def test_phrases_and_multi_token_words_use_all_their_tokens(tokenizer):
    sub = resolve_subject(tokenizer, "a photo of a red car", "red car", 0.5)
    assert sub.positions == (5, 6)
    # "zebra" is not in the tiny vocabulary: it splits into several tokens, all used
    sub = resolve_subject(tokenizer, "a zebra on a table", "zebra", 0.5)
    assert len(sub.positions) > 1 and sub.positions[0] == 2
    n = len(tokenizer("zebra", add_special_tokens=False).input_ids)
    assert sub.positions == tuple(range(2, 2 + n))


def test_repeated_word_by_occurrence(tokenizer):
    prompt = "a cat and a cat on a table"
    assert resolve_subject(tokenizer, prompt, "cat", 0.5).positions == (2,)
    assert resolve_subject(tokenizer, prompt, "cat#2", 0.5).positions == (5,)
    with pytest.raises(ValueError, match="occurs only 2"):
        resolve_subject(tokenizer, prompt, "cat#3", 0.5)


def test_missing_subject_lists_the_prompt_tokens(tokenizer):
    with pytest.raises(ValueError, match=r"'dog' does not occur.*1:a</w>, 2:cat</w>"):
        resolve_subject(tokenizer, "a cat eating a sandwich", "dog", 0.5)


def test_truncated_subject_is_a_clear_error(tokenizer):
    prompt = " ".join(["a"] * 80) + " cat"
    with pytest.raises(ValueError, match="cut off by truncation at 77 tokens"):
        resolve_subject(tokenizer, prompt, "cat", 0.5)


def test_raw_token_indices(tokenizer):
    assert resolve_subject(tokenizer, "a cat", 2, 0.5).positions == (2,)
    assert resolve_subject(tokenizer, "a cat", [1, 2], 0.5).positions == (1, 2)
    # 0 is the start token, 3 the end token of "a cat", 4.. padding: none is a subject
    for bad in (0, 3, 4, 76, 80, [2, 5]):
        with pytest.raises(ValueError, match=r"outside the prompt's tokens 1\.\.2"):
            resolve_subject(tokenizer, "a cat", bad, 0.5)


def test_words_inside_a_positions_list_are_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="one subject's token positions"):
        resolve_subject(tokenizer, "a cat", ["cat", "dog"], 0.5)


def test_occurrences_count_from_one(tokenizer):
    prompt = "a cat and a cat on a table"
    assert resolve_subject(tokenizer, prompt, "cat#1", 0.5).positions == (2,)
    with pytest.raises(ValueError, match="occurrences count from 1"):
        resolve_subject(tokenizer, prompt, "cat#0", 0.5)


def test_k_count_must_match(tokenizer):
    with pytest.raises(ValueError, match="2 subjects but 3 k"):
        resolve_subjects(tokenizer, "a cat eating a sandwich", ["cat", "sandwich"], [0.1, 0.2, 0.3])


def test_paper_item_indices_are_used_as_token_positions(tokenizer):
    items = json.loads((PAPER / "animal_item.json").read_text())
    prompt = "a cat eating a sandwich"
    idx, ks = items["item_idx"][prompt], items["item_k"][prompt]
    subs = resolve_subjects(tokenizer, prompt, paper_positions(idx), ks)
    # the reference indexes the tokens after the start token: position = index + 1
    assert [s.positions for s in subs] == [(2,), (5,)]
    words = resolve_subjects(tokenizer, prompt, ["cat", "sandwich"], ks)
    assert [s.positions for s in words] == [s.positions for s in subs]


def test_batch_padding(tokenizer):
    a = resolve_subjects(tokenizer, "a red car", ["red car"], 0.5)
    b = resolve_subjects(tokenizer, "a cat eating a sandwich", ["cat", "sandwich"], [0.4, 0.6])
    s = batch_subjects([a, b])
    assert s.weights.shape == (2, 2, 2) and s.k.tolist()[0][1] == 0.0
    assert s.weights[0, 0].tolist() == [0.5, 0.5]
    assert s.first_position.tolist() == [[2, 0], [2, 5]]
