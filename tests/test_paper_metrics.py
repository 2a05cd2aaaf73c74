"""The paper's metrics on tiny random models saved as safetensors and loaded back by path.

OpenCLIP and ImageReward are checked against a forward pass written here from their published
architectures, over the checkpoints' own tensor names (so the renaming, the q / k / v split,
the transposed projections and the head are pinned); BERTScore against a hand-computed
greedy cosine matching; QwenScore's parsing on replies; the VLM's batching against one image
at a time.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from paper_fixtures import (BERT_WORDS, CTX, IL, IP, IS, IT, IV, LAYERS, PATCH, SIZE, TW, W,
                            make_bert, make_imagereward, make_openclip, make_qwen,
                            make_roberta)
from PIL import Image

from asyndm.bench.metrics import METRICS, MetricOptions, build_metrics, score_images
from asyndm.bench.metrics_local import clip_pixels
from asyndm.bench.suites import BenchEntry

PROMPTS = ["a red cat on the table", "two dog with a blue car"]


def _entries(prompts=PROMPTS):
    return [BenchEntry(f"p{i}", p, "test") for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g).byte().numpy())
            for h, w in ((40, 56), (48, 48))]


# --- OpenCLIP -------------------------------------------------------------------------------

def _ref_block(x, s, b, heads, mask=None):
    """OpenCLIP's ResidualAttentionBlock: pre-LN, nn.MultiheadAttention, GELU MLP."""
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), s[b + "ln_1.weight"], s[b + "ln_1.bias"]).transpose(0, 1)
    a, _ = F.multi_head_attention_forward(
        h, h, h, w, heads, s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"], None, None,
        False, 0.0, s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"],
        need_weights=False, attn_mask=mask)
    x = x + a.transpose(0, 1)
    h = F.layer_norm(x, (w,), s[b + "ln_2.weight"], s[b + "ln_2.bias"])
    h = F.linear(F.gelu(F.linear(h, s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"])),
                 s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"])
    return x + h


def _ref_openclip(s, pixels, ids, eos):
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, W)
    x = torch.cat([cls, x], 1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (W,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
    for i in range(LAYERS):
        x = _ref_block(x, s, f"visual.transformer.resblocks.{i}.", 4)
    img = F.layer_norm(x[:, 0], (W,), s["visual.ln_post.weight"], s["visual.ln_post.bias"])
    img = img @ s["visual.proj"]
    t = s["token_embedding.weight"][ids] + s["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)
    for i in range(LAYERS):
        t = _ref_block(t, s, f"transformer.resblocks.{i}.", 4, causal)
    t = F.layer_norm(t, (TW,), s["ln_final.weight"], s["ln_final.bias"])
    end = (ids == eos).int().argmax(-1)  # the first end-of-text token (OpenCLIP: argmax id)
    txt = t[torch.arange(len(ids)), end] @ s["text_projection"]
    return F.cosine_similarity(img, txt, dim=-1)


@pytest.fixture(scope="module")
def openclip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("openclip")
    state, tok = make_openclip(root)
    return root, state, tok


def test_openclip_equals_reference_forward(openclip_dir, images):
    root, state, tok = openclip_dir
    metric, = build_metrics(["openclip"], MetricOptions(paths={"openclip": str(root)}))
    got = metric.score(images, _entries())
    ids = tok(PROMPTS, padding="max_length", max_length=CTX, return_tensors="pt").input_ids
    want = _ref_openclip(state, clip_pixels(images, SIZE), ids, tok.eos_token_id)
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    assert all(-1 <= v <= 1 for v in got) and got[0] != got[1]
    assert metric.score(images, _entries()) == got  # deterministic


def test_openclip_transformers_folder_gives_the_same_scores(openclip_dir, images, tmp_path):
    root, _, tok = openclip_dir
    metric, = build_metrics(["openclip"], MetricOptions(paths={"openclip": str(root)}))
    metric.model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    again, = build_metrics(["openclip"], MetricOptions(paths={"openclip": str(tmp_path)}))
    assert again.score(images, _entries()) == pytest.approx(metric.score(images, _entries()),
                                                            abs=1e-6)


def test_vit_h_14_has_openclips_parameter_count():
    """OpenCLIP's model table lists ViT-H-14 at 986.11 M parameters."""
    from transformers import CLIPModel

    from asyndm.bench.metrics_clip import VIT_H_14, clip_config

    with torch.device("meta"):
        model = CLIPModel(clip_config(VIT_H_14, 49407, 49407))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(986.11, abs=0.01)


def test_clip_pixels_follow_torchvision_rounding():
    im = Image.new("RGB", (50, 30), (255, 0, 0))
    x = clip_pixels([im], 16)
    assert x.shape == (1, 3, 16, 16)
    assert x[0, :, 8, 8].tolist() == pytest.approx([(1 - 0.48145466) / 0.26862954,
                                                     -0.4578275 / 0.26130258,
                                                     -0.40821073 / 0.27577711], abs=1e-5)


# --- ImageReward ----------------------------------------------------------------------------

def _attend(q, k, v, heads, mask=None):
    b, lq, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    a = (split(q) @ split(k).transpose(-1, -2)) / math.sqrt(d // heads)  # (B, h, Lq, Lk)
    if mask is not None:
        a = a.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (a.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)


def _ref_imagereward(s, pixels, ids, mask):
    """BLIP's ViT (pre-LN, eps 1e-6) + BERT with cross-attention (post-LN) + linear head."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    p = lambda name: (s[name + ".weight"], s[name + ".bias"])  # noqa: E731
    x = F.conv2d(pixels, *p(v + "patch_embed.proj"), stride=IP).flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "cls_token"].expand(len(x), 1, IV), x], 1) + s[v + "pos_embed"]
    for i in range(IL):
        b = f"{v}blocks.{i}."
        h = F.layer_norm(x, (IV,), *p(b + "norm1"), eps=1e-6)
        q, k, vv = F.linear(h, *p(b + "attn.qkv")).chunk(3, -1)
        x = x + F.linear(_attend(q, k, vv, IV // 64 or 1), *p(b + "attn.proj"))
        h = F.layer_norm(x, (IV,), *p(b + "norm2"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, *p(b + "mlp.fc1"))), *p(b + "mlp.fc2"))
    img = F.layer_norm(x, (IV,), *p(v + "norm"), eps=1e-6)
    y = s[t + "embeddings.word_embeddings.weight"][ids]
    y = y + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = F.layer_norm(y, (IT,), *p(t + "embeddings.LayerNorm"), eps=1e-12)
    heads = max(IT // 64, 1)
    for i in range(IL):
        b = f"{t}encoder.layer.{i}."
        for att, src, m in (("attention", None, mask.bool()), ("crossattention", img, None)):
            kv = y if src is None else src
            a = _attend(F.linear(y, *p(f"{b}{att}.self.query")),
                        F.linear(kv, *p(f"{b}{att}.self.key")),
                        F.linear(kv, *p(f"{b}{att}.self.value")), heads, m)
            y = F.layer_norm(y + F.linear(a, *p(f"{b}{att}.output.dense")), (IT,),
                             *p(f"{b}{att}.output.LayerNorm"), eps=1e-12)
        h = F.linear(F.gelu(F.linear(y, *p(b + "intermediate.dense"))), *p(b + "output.dense"))
        y = F.layer_norm(y + h, (IT,), *p(b + "output.LayerNorm"), eps=1e-12)
    r = y[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = F.linear(r, *p(f"mlp.layers.{idx}"))  # no activations: their ReLUs are commented out
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def imagereward_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    out, state = make_imagereward(root)
    return root, out, state


def test_imagereward_equals_reference_forward(imagereward_dir, images):
    root, out, state = imagereward_dir
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    metric, = build_metrics(["imagereward"], MetricOptions(paths={"imagereward": str(out)}))
    got = metric.score(images, _entries())
    tok = metric.tokenizer
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(BERT_WORDS), len(BERT_WORDS) + 1]
    text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert text.input_ids[0, 0] == tok.cls_token_id
    want = _ref_imagereward(state, clip_pixels(images, IS), text.input_ids, text.attention_mask)
    assert got == pytest.approx(want.tolist(), abs=1e-4)
    assert got[0] != got[1] and metric.score(images, _entries()) == got


class _Code:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_imagereward_conversion_refuses_pickled_code(tmp_path, imagereward_dir):
    root = imagereward_dir[0]
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": _Code()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        from asyndm.bench.metrics_imagereward import convert_imagereward

        convert_imagereward(tmp_path / "evil.pt", root / "bert", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- Qwen2.5-VL, QwenScore, BERTScore -------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_qwen(tmp_path_factory.mktemp("qwen"), PROMPTS)


@pytest.mark.parametrize("reply, value", [
    ("8", 8.0), ("Score: 7/10", 7.0), ("8.5 out of 10", 8.5), (" 10.", 10.0), ("0", 0.0),
    ("12", None), ("-1", None), ("eleven", None), ("", None), ("v2 then 6", 6.0)])
def test_parse_rating(reply, value):
    from asyndm.bench.metrics_vlm import parse_rating

    assert parse_rating(reply) == value


def test_qwenscore_runs_the_vlm_and_batches_like_single_images(qwen_dir, images):
    from asyndm.bench.metrics_vlm import RATING_QUESTION, parse_rating

    metric, = build_metrics(["qwenscore"], MetricOptions(paths={"qwen": str(qwen_dir)}))
    got = metric.score(images, _entries())
    replies = [s.details["reply"] for s in got]
    assert [s.value for s in got] == [parse_rating(r) for r in replies]
    questions = [RATING_QUESTION.format(prompt=p) for p in PROMPTS]
    one = [metric.vlm.ask([im], [q], 8)[0] for im, q in zip(images, questions)]
    assert replies == one and all(replies)  # left padding does not change a reply


def test_qwenscore_scores_what_the_vlm_says(qwen_dir, images, monkeypatch):
    metric, = build_metrics(["qwenscore"], MetricOptions(paths={"qwen": str(qwen_dir)}))
    asked = []

    def ask(ims, questions, max_new_tokens):
        asked.extend(questions)
        return ["7", "no idea"][: len(ims)]

    monkeypatch.setattr(metric.vlm, "ask", ask)
    scores = score_images([metric], images, _entries())
    assert [s["qwenscore"] for s in scores] == [(7.0, {"reply": "7"}),
                                                (None, {"reply": "no idea"})]
    assert PROMPTS[0] in asked[0] and "0 (does not match at all) to 10" in asked[0]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert"))


def _ref_bertscore(folder, layers, cand, ref):
    """Greedy matching of unit token embeddings of layer ``layers``, as bert-score does it:
    [CLS] / [SEP] are not scored (idf 0) but may be matched."""
    from transformers import BertModel, BertTokenizerFast

    tok, model = BertTokenizerFast.from_pretrained(folder), BertModel.from_pretrained(folder)

    def emb(text):
        enc = tok(text, return_tensors="pt")
        h = model(**enc, output_hidden_states=True).hidden_states[layers][0]  # (L, D)
        return F.normalize(h, dim=-1)

    with torch.no_grad():
        sim = emb(cand) @ emb(ref).T  # (Lc, Lr)
    p, r = sim[1:-1].max(1).values.mean().item(), sim[:, 1:-1].max(0).values.mean().item()
    return 2 * p * r / (p + r)


def test_bertscore_of_the_caption_against_the_prompt(qwen_dir, bert_dir, images, monkeypatch):
    opts = MetricOptions(paths={"qwen": str(qwen_dir), "bertscore": str(bert_dir)})
    metric, = build_metrics(["bertscore"], opts)
    real = metric.score(images, _entries())  # the tiny VLM's own captions
    assert all(math.isfinite(s.value) for s in real)
    assert [s.details["caption"] for s in real] == metric.vlm.ask(
        images, ["Describe this image in one sentence."] * 2, 64)
    captions = ["a cat on the table", "a blue dog"]
    monkeypatch.setattr(metric.vlm, "ask", lambda ims, qs, n: captions[: len(ims)])
    got = metric.score(images, _entries())
    for s, cap, prompt in zip(got, captions, PROMPTS):
        assert s.value == pytest.approx(_ref_bertscore(bert_dir, 2, cap, prompt), abs=1e-5)
        assert s.details["caption"] == cap
    same = metric.score(images[:1], _entries(["a cat on the table"]))
    assert same[0].value == pytest.approx(1.0, abs=1e-6)


def test_bertscore_gives_roberta_its_leading_space(qwen_dir, tmp_path, images, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    folder = make_roberta(tmp_path / "roberta")
    opts = MetricOptions(paths={"qwen": str(qwen_dir), "bertscore": str(folder)})
    metric, = build_metrics(["bertscore"], opts)
    tok = metric.scorer._tokenizer
    assert tok.encode("a red cat") == tok.encode(" a red cat")  # "Ġa", as bert-score means
    monkeypatch.setattr(metric.vlm, "ask", lambda ims, qs, n: ["a cat on the table"])
    got = metric.score(images[:1], _entries(PROMPTS[:1]))[0].value
    plain, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)

    def emb(text):
        ids = plain(" " + text, return_tensors="pt")
        return F.normalize(model(**ids).last_hidden_state[0], dim=-1)  # (L, D), 2 layers

    with torch.no_grad():
        sim = emb("a cat on the table") @ emb(PROMPTS[0]).T
    p, r = sim[1:-1].max(1).values.mean().item(), sim[:, 1:-1].max(0).values.mean().item()
    assert got == pytest.approx(2 * p * r / (p + r), abs=1e-5)


# --- missing weights ------------------------------------------------------------------------

@pytest.mark.parametrize("name, key", [("openclip", "openclip"), ("imagereward", "imagereward"),
                                       ("qwenscore", "qwen"), ("bertscore", "qwen")])
def test_missing_weights_name_the_path(name, key, tmp_path):
    gone = tmp_path / "no-such-folder"
    with pytest.raises(ValueError, match=f"{name}.*{gone}"):
        build_metrics([name], MetricOptions(paths={key: str(gone), "bertscore": str(gone)}))
    with pytest.raises(ValueError, match=f"the {name} metric needs its local weights folder"):
        build_metrics([name], MetricOptions())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no .*safetensors|has no config\.json"):
        empty = str(tmp_path / "empty")
        build_metrics([name], MetricOptions(paths={key: empty, "bertscore": empty}))
    assert name in METRICS
