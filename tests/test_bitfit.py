"""BitFit: only bias terms (+ the head) train, step 0 equals the base (added biases start at zero), the bias
selections pick the paper's terms, bias-free models either gain zero biases or are refused in one line, and the
gradient-to-input cost is paid."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import adam_losses, batch_for, ctx, tiny
from torch.testing import assert_close

from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.methods import trainable_parameters
from sidetune.methods.bitfit import BitFit, BitFitConfig, bias_layers
from sidetune.profile import measure


def _bitfit(preset, task, **kw):
    return BitFit(BitFitConfig(**kw)).apply(tiny(preset, task), ctx(task))


@pytest.mark.parametrize("preset,task,added", [("tiny-bert", "classification", 0), ("tiny-gpt2", "causal_lm", 0),
                                               ("tiny-llama", "causal_lm", 4 * 7), ("tiny-t5", "seq2seq", None)])
def test_step0_equals_base(preset, task, added):
    base = tiny(preset, task).eval()
    batch = batch_for(base, task)
    model = BitFit(BitFitConfig()).apply(copy.deepcopy(base), ctx(task)).eval()
    if added is not None:
        assert len(bias_layers(model)) == added  # Llama: q k v o gate up down in each of 4 layers, not lm_head
    else:
        assert bias_layers(model)
    with torch.no_grad():
        assert_close(model(**batch).logits, base(**batch).logits, rtol=1e-6, atol=1e-6)


def test_bert_all_trains_every_bias_and_the_head_only():
    model = _bitfit("tiny-bert", "classification").train()
    expected = {n for n, _ in model.named_parameters() if n.endswith(".bias") or n.startswith("classifier.")}
    assert set(trainable_parameters(model)) == expected
    assert any("LayerNorm.bias" in n for n in expected) and "bert.pooler.dense.bias" in expected
    model(**batch_for(model, "classification")).loss.backward()
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_llama_added_biases_and_head_get_gradients_nothing_else():
    model = _bitfit("tiny-llama", "classification").train()
    model(**batch_for(model, "classification")).loss.backward()
    for name, p in model.named_parameters():
        if name.endswith(".bitfit_bias") or name.startswith("score."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("biases,expected", [
    (["query_intermediate"], {"attention.self.query.bias", "intermediate.dense.bias"}),
    (["attention"], {"attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias",
                     "attention.output.dense.bias"}),
    (["re:.*\\.output\\.LayerNorm"], {"attention.output.LayerNorm.bias", "output.LayerNorm.bias"}),
    (["value"], {"attention.self.value.bias"}),
])
def test_bias_selections_on_bert(biases, expected):
    model = _bitfit("tiny-bert", "classification", biases=biases)
    names = {n for n in trainable_parameters(model) if not n.startswith("classifier.")}
    assert {n.split("layer.0.", 1)[1] for n in names if ".layer.0." in n} == expected
    assert len(names) == 4 * len(expected)  # the same terms in each of the 4 layers, nothing outside them


def test_paper_subset_on_llama_adds_q_gate_up_biases():
    model = _bitfit("tiny-llama", "causal_lm", biases=["query_intermediate"])
    names = {n.rsplit(".", 2)[-2] for n in trainable_parameters(model)}
    assert names == {"q_proj", "gate_proj", "up_proj"} and len(bias_layers(model)) == 12


def test_bias_free_model_without_add_missing_is_one_clear_error():
    with pytest.raises(SidetuneError, match=r"LlamaForCausalLM has no bias term.*ia3 or lora"):
        _bitfit("tiny-llama", "causal_lm", add_missing=False)
    # A model with biases of its own trains them without any wrapper.
    assert not bias_layers(_bitfit("tiny-gpt2", "causal_lm", add_missing=False))


def test_bad_selection_fails_at_parse_and_at_apply():
    with pytest.raises(SidetuneError, match=r"method\.biases"):
        load_config(None, ["method.name=bitfit", "method.biases=re:(", "data.task=classification"])
    with pytest.raises(SidetuneError, match="matched no bias"):
        _bitfit("tiny-bert", "classification", biases=["nope"])


def test_loss_goes_down():
    torch.manual_seed(0)
    model = _bitfit("tiny-bert", "classification").train()
    batch = batch_for(model, "classification", batch=8)
    losses = adam_losses(model, batch, steps=30, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_merge_keeps_own_biases_and_refuses_added_ones():
    model = _bitfit("tiny-gpt2", "causal_lm")
    assert BitFit(BitFitConfig()).merge(model) is model
    with pytest.raises(SidetuneError, match=r"sidetune\.load"):
        BitFit(BitFitConfig()).merge(_bitfit("tiny-llama", "causal_lm"))


def test_profile_pays_the_gradient_to_input_cost():
    cfg = load_config(None, ["model.name=tiny-llama", "data.task=causal_lm", "train.batch_size=2",
                             "data.max_length=16", "method.name=bitfit"])
    real = measure(cfg, True, "cpu", fake=False)
    assert real["act_backbone_bytes"] > 0 and real["bwd_dx_flops_backbone"] > 0
    assert real["bwd_dw_flops"] == 0  # no weight matrix trains (the head is tied embeddings, frozen)
    pred = measure(cfg, True, "cpu", fake=True)  # the fake-tensor prediction runs, and agrees
    assert pred["act_backbone_bytes"] == real["act_backbone_bytes"]
    assert abs(pred["peak_bytes"] / real["cpu_allocated_peak_bytes"] - 1) <= 0.10
