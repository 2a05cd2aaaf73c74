"""Offline stand-ins for the Hugging Face hub's tiny test repositories.

diffusers' fast pipeline tests build every model from a config in code, but load two tiny
tokenizers (and one config) from the hub: ``hf-internal-testing/tiny-random-clip`` (CLIP BPE
tokenizer, ids < 1000, ``model_max_length`` 77) and ``hf-internal-testing/tiny-random-t5``
(config: d_model 32, d_ff 37, d_kv 8, 4 heads, 5 layers, vocab 1103; a T5 unigram tokenizer).
``write_standins(root)`` writes local folders of the same shape:

- ``root/tiny-random-clip``: a real CLIP BPE tokenizer (``asyndm.shapes.tokenizer``) whose
  vocabulary (< 1000 ids, ``<|endoftext|>`` the highest, as CLIP's argmax pooling needs) makes
  the tests' prompt words single tokens; any other text falls back to byte-level symbols.
- ``root/tiny-random-t5``: the tiny T5 config, a randomly initialised ``T5EncoderModel`` of it
  (for a ``from_pretrained`` of the model) and a sentencepiece-free ``T5Tokenizer`` built from
  a unigram vocabulary (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, whole words, single characters,
  100 ``<extra_id_*>``).

They have the hub repositories' interfaces, not their contents: a test that pins output values
computed with the hub's exact vocabulary (an ``expected_slice``) can fail with them; the
runner reports those as stand-in failures of the stock pipeline.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

REPOS = ("hf-internal-testing/tiny-random-clip", "hf-internal-testing/tiny-random-t5")

# The prompt words of diffusers' SD / SDXL / SD3 fast tests and their mixins, plus common words.
WORDS = sorted(set("""
a an the of in on with and or that is are to at by for from as this it be not no
painting squirrel eating burger photo photograph cat dog astronaut riding horse space
french fries hey hello sign says holding beautiful sunset amidst mountains red car
standing side street pony small cactus happy face sahara desert robot made exotic
candies chocolates different kinds background filled confetti celebratory gifts
negative prompt logo turtle strong style winter neg low poly hd logos icons bad quality
high resolution blurry ugly image picture man woman tree house blue green
""".split()))

T5_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"],
    "d_ff": 37,
    "d_kv": 8,
    "d_model": 32,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "relu",
    "initializer_factor": 0.002,
    "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 5,
    "num_heads": 4,
    "num_layers": 5,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 8,
    "vocab_size": 1103,
}


def write_clip(out_dir: Path) -> None:
    from asyndm.shapes.tokenizer import write_clip_tokenizer

    tok = write_clip_tokenizer(WORDS, out_dir, model_max_length=77)
    if len(tok) > 1000 or tok.eos_token_id != len(tok) - 1:
        raise RuntimeError(f"CLIP stand-in: {len(tok)} ids, eos {tok.eos_token_id}")


def write_t5(out_dir: Path) -> None:
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.5) for c in chars]
    tok = T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=512)
    tok.save_pretrained(str(out_dir))
    if len(tok) > T5_CONFIG["vocab_size"]:
        raise RuntimeError(f"T5 stand-in tokenizer has {len(tok)} ids")
    kwargs = {k: v for k, v in T5_CONFIG.items() if k != "model_type"}
    torch.manual_seed(0)
    T5EncoderModel(T5Config(**kwargs)).save_pretrained(str(out_dir))
    # the hub's config.json is the encoder-decoder's (the encoder edits the config it is given)
    T5Config(**kwargs).save_pretrained(str(out_dir))


def write_standins(root: str | Path) -> dict[str, str]:
    """Write the stand-in folders under ``root``; return ``{hub repo id: local folder}``."""
    root = Path(root)
    mapping = {}
    for repo in REPOS:
        folder = root / repo.split("/")[1]
        if not (folder / ".done").exists():
            (write_clip if repo.endswith("clip") else write_t5)(folder)
            (folder / ".done").write_text("ok\n")
        mapping[repo] = str(folder)
    (root / "mapping.json").write_text(json.dumps(mapping, indent=1) + "\n")
    return mapping


if __name__ == "__main__":
    import sys

    print(json.dumps(write_standins(sys.argv[1]), indent=1))
