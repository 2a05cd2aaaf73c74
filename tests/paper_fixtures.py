"""Tiny random stand-ins of the paper's metric models, saved as the metrics expect them.

Built in code from configs (no download): an OpenCLIP-format CLIP (OpenCLIP's tensor names in
``open_clip_model.safetensors``), an ``ImageReward.pt``-shaped BLIP state dict (BLIP's names,
converted by asyndm), a Qwen2.5-VL with an offline word-level tokenizer and chat template,
and a BERT for BERTScore. ``make_weights`` lays them out as ``asyndm paper --weights`` reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import WORDS
from asyndm.shapes.tokenizer import write_clip_tokenizer

W, TW, E, LAYERS, CTX, PATCH, SIZE = 32, 24, 16, 2, 16, 8, 32


def _openclip_state(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    def blocks(pre, w):
        out = {}
        for i in range(LAYERS):
            b = f"{pre}transformer.resblocks.{i}."
            out.update({b + "ln_1.weight": 1 + r(w), b + "ln_1.bias": r(w),
                        b + "ln_2.weight": 1 + r(w), b + "ln_2.bias": r(w),
                        b + "attn.in_proj_weight": r(3 * w, w), b + "attn.in_proj_bias": r(3 * w),
                        b + "attn.out_proj.weight": r(w, w), b + "attn.out_proj.bias": r(w),
                        b + "mlp.c_fc.weight": r(4 * w, w), b + "mlp.c_fc.bias": r(4 * w),
                        b + "mlp.c_proj.weight": r(w, 4 * w), b + "mlp.c_proj.bias": r(w)})
        return out

    n = (SIZE // PATCH) ** 2
    state = {"logit_scale": torch.tensor(math.log(100.0)), "token_embedding.weight": r(vocab, TW),
             "positional_embedding": r(CTX, TW), "ln_final.weight": 1 + r(TW),
             "ln_final.bias": r(TW), "text_projection": r(TW, E),
             "visual.class_embedding": r(W), "visual.conv1.weight": r(W, 3, PATCH, PATCH),
             "visual.positional_embedding": r(n + 1, W), "visual.ln_pre.weight": 1 + r(W),
             "visual.ln_pre.bias": r(W), "visual.ln_post.weight": 1 + r(W),
             "visual.ln_post.bias": r(W), "visual.proj": r(W, E)}
    state.update(blocks("", TW))
    state.update(blocks("visual.", W))
    return state



def make_openclip(root: Path) -> tuple[dict[str, torch.Tensor], object]:
    """An OpenCLIP-format folder in ``root``; returns its tensors and its CLIP tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    tok = write_clip_tokenizer(WORDS, root, model_max_length=CTX)
    state = _openclip_state(len(tok))
    save_file(state, str(root / "open_clip_model.safetensors"))
    cfg = {"model_cfg": {"embed_dim": E,
                         "vision_cfg": {"image_size": SIZE, "layers": LAYERS, "width": W,
                                        "head_width": W // 4, "patch_size": PATCH},
                         "text_cfg": {"context_length": CTX, "vocab_size": len(tok),
                                      "width": TW, "heads": 4, "layers": LAYERS}}}
    (root / "open_clip_config.json").write_text(json.dumps(cfg))
    return state, tok




IV, IT, IL, IP, IS = 32, 32, 2, 8, 32  # vision width, text width, layers, patch, image size
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "on", "the",
              "table", "two", "dog", "with", "blue", "car"]


def _imagereward_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    def lin(name, o, i):
        return {name + ".weight": r(o, i), name + ".bias": r(o)}

    def ln(name, d):
        return {name + ".weight": 1 + r(d), name + ".bias": r(d)}

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    s = {v + "cls_token": r(1, 1, IV), v + "pos_embed": r(1, (IS // IP) ** 2 + 1, IV),
         v + "patch_embed.proj.weight": r(IV, 3, IP, IP), v + "patch_embed.proj.bias": r(IV),
         **ln(v + "norm", IV),
         t + "embeddings.word_embeddings.weight": r(len(BERT_WORDS) + 2, IT),
         t + "embeddings.position_embeddings.weight": r(40, IT),
         **ln(t + "embeddings.LayerNorm", IT),
         t + "embeddings.position_ids": torch.arange(40)[None],
         "blip.vision_proj.weight": r(8, IV), "blip.text_proj.weight": r(8, IT)}  # unused parts
    for i in range(IL):
        b = f"{v}blocks.{i}."
        s.update({**ln(b + "norm1", IV), **ln(b + "norm2", IV), **lin(b + "attn.qkv", 3 * IV, IV),
                  **lin(b + "attn.proj", IV, IV), **lin(b + "mlp.fc1", 4 * IV, IV),
                  **lin(b + "mlp.fc2", IV, 4 * IV)})
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", IT), ("crossattention", IV)):
            s.update({**lin(f"{b}{att}.self.query", IT, IT),
                      **lin(f"{b}{att}.self.key", IT, kv), **lin(f"{b}{att}.self.value", IT, kv),
                      **lin(f"{b}{att}.output.dense", IT, IT),
                      **ln(f"{b}{att}.output.LayerNorm", IT)})
        s.update({**lin(b + "intermediate.dense", 4 * IT, IT),
                  **lin(b + "output.dense", IT, 4 * IT), **ln(b + "output.LayerNorm", IT)})
    width = IT
    for idx, n in zip((0, 2, 4, 6, 7), (1024, 128, 64, 16, 1)):
        s.update(lin(f"mlp.layers.{idx}", n, width))
        width = n
    return s



def make_imagereward(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """``ImageReward.pt`` (BLIP names) and a BERT tokenizer in ``root``, converted into
    ``root / "converted"``; returns that folder and the checkpoint's tensors."""
    from transformers import BertTokenizerFast

    from asyndm.bench.metrics_imagereward import convert_imagereward

    (root / "bert").mkdir(parents=True, exist_ok=True)
    (root / "bert" / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    BertTokenizerFast(vocab=str(root / "bert" / "vocab.txt"),
                      model_max_length=40).save_pretrained(root / "bert")
    state = _imagereward_state()
    torch.save(state, root / "ImageReward.pt")
    return convert_imagereward(root / "ImageReward.pt", root / "bert", root / "converted"), state


# --- Qwen2.5-VL, QwenScore, BERTScore -------------------------------------------------------

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")



def make_qwen(root: Path, prompts) -> Path:
    """A tiny Qwen2.5-VL folder whose word-level vocabulary covers ``prompts``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    root.mkdir(parents=True, exist_ok=True)
    words = QWEN_SPECIAL + ["user", "assistant", *"0123456789", ".", ":", '"', "/"] \
        + sorted({w for p in prompts for w in p.split()} | {"image", "prompt", "how", "well"})
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                      unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>",
                                  additional_special_tokens=QWEN_SPECIAL[1:])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(root)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                           out_hidden_size=32, window_size=56, fullatt_block_indexes=[1]),
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **ids)
    torch.manual_seed(3)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(root, safe_serialization=True)
    return root




def make_bert(root: Path) -> Path:
    """A tiny BERT folder (safetensors) for BERTScore."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    BertTokenizerFast(vocab=str(root / "vocab.txt"), model_max_length=64).save_pretrained(root)
    torch.manual_seed(4)
    BertModel(BertConfig(vocab_size=len(BERT_WORDS), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
              ).save_pretrained(root, safe_serialization=True)
    return root




def make_roberta(root: Path) -> Path:
    """A tiny RoBERTa with a byte-level BPE tokenizer learnt offline (roberta-large's kind)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    root.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a red cat on the table", "two dog with a blue car"] * 5,
                            vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(root))
    tok = RobertaTokenizer(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"),
                           model_max_length=64)
    tok.save_pretrained(root)
    torch.manual_seed(5)
    RobertaModel(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=37,
                               max_position_embeddings=70, pad_token_id=tok.pad_token_id)
                 ).save_pretrained(root, safe_serialization=True)
    return root


def make_weights(root: Path, prompts) -> Path:
    """All four under the folder names of ``asyndm paper --weights`` (WEIGHT_FOLDERS)."""
    from asyndm.bench.paper import WEIGHT_FOLDERS

    out, _ = make_imagereward(root / "imagereward-src")
    out.rename(root / WEIGHT_FOLDERS["imagereward"])
    make_openclip(root / WEIGHT_FOLDERS["openclip"])
    make_qwen(root / WEIGHT_FOLDERS["qwen"], prompts)
    make_bert(root / WEIGHT_FOLDERS["bertscore"])
    return root
