"""LoRA: step 0 equals the base, forward equals PEFT's, merge/unmerge round-trips, only LoRA trains."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import batch_for, ctx, tiny
from torch.testing import assert_close

from sidetune.methods.lora import LoRA, LoRAConfig, LoRALinear, lora_layers, merge, merge_and_unwrap, unmerge

CASES = [("tiny-llama", "causal_lm"), ("tiny-bert", "classification"), ("tiny-gpt2", "causal_lm"),
         ("tiny-t5", "seq2seq")]


@pytest.mark.parametrize("preset,task", CASES)
def test_step0_equals_base(preset, task):
    base = tiny(preset, task).eval()
    batch = batch_for(base, task)
    expected = base(**batch).logits
    model = LoRA(LoRAConfig(targets=["all-linear"])).apply(copy.deepcopy(base), ctx(base)).eval()
    assert len(lora_layers(model)) > 0
    assert_close(model(**batch).logits, expected)


@pytest.mark.parametrize("init", ["standard", "gaussian", "a_zero"])
def test_inits(init):
    model = LoRA(LoRAConfig(init=init)).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm"))
    layer = lora_layers(model)[0]
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if init == "a_zero":
        assert a.abs().sum() == 0 and b.abs().sum() > 0
    else:
        assert b.abs().sum() == 0 and a.abs().sum() > 0
    if init == "gaussian":
        assert abs(a.std().item() - 1 / layer.lora_A.out_features) < 0.05


def test_only_lora_and_head_get_gradients():
    model = LoRA(LoRAConfig(r=4)).apply(tiny("tiny-bert", "classification"), ctx("classification"))
    model.train()
    batch = batch_for(model, "classification")
    for layer in lora_layers(model):  # make B non-zero so that A receives a gradient too
        torch.nn.init.normal_(layer.lora_B.weight)
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        is_head = name.startswith("classifier.")
        if is_lora or is_head:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("preset,task,targets", [
    ("tiny-llama", "causal_lm", ["q_proj", "v_proj"]),
    ("tiny-llama", "causal_lm", ["all-linear"]),
    ("tiny-bert", "classification", ["query", "value"]),
    ("tiny-gpt2", "causal_lm", ["c_attn"]),
])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_peft(preset, task, targets, rslora):
    peft = pytest.importorskip("peft")
    base = tiny(preset, task).eval()
    ours = LoRA(LoRAConfig(targets=targets, r=4, alpha=8, rslora=rslora)).apply(copy.deepcopy(base), ctx(base)).eval()
    _randomize(ours)
    peft_targets = "all-linear" if targets == ["all-linear"] else targets
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=peft_targets, use_rslora=rslora,
        task_type={"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}[task])).eval()
    ref_layers = {n.removeprefix("base_model.model."): m for n, m in ref.named_modules() if hasattr(m, "lora_A")}
    ours_layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert set(ref_layers) == set(ours_layers)
    with torch.no_grad():
        for name, layer in ours_layers.items():
            ref_layers[name].lora_A["default"].weight.copy_(layer.lora_A.weight)
            ref_layers[name].lora_B["default"].weight.copy_(layer.lora_B.weight)
    batch = batch_for(base, task)
    batch.pop("labels")
    expected = ref(**batch).logits
    actual = ours(**batch).logits
    assert (actual - base(**batch).logits).abs().max() > 1e-3  # the update is not trivially zero
    assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,task", [("tiny-llama", "causal_lm"), ("tiny-gpt2", "causal_lm")])
def test_merge_unmerge_roundtrip(preset, task):
    model = LoRA(LoRAConfig(targets=["all-linear"])).apply(tiny(preset, task), ctx(task)).eval()
    _randomize(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    batch = batch_for(model, task)
    unmerged_logits = model(**batch).logits
    merge(model)
    assert all(layer.merged for layer in lora_layers(model))
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed  # merging really rewrote base weights
    assert_close(model(**batch).logits, unmerged_logits, rtol=1e-4, atol=1e-4)
    unmerge(model)
    for n, p in model.named_parameters():
        if n in before:
            assert_close(p, before[n], rtol=0, atol=1e-6)
    plain = merge_and_unwrap(model)
    assert not lora_layers(plain)
    assert_close(plain(**batch).logits, unmerged_logits, rtol=1e-4, atol=1e-4)


def test_scaling_and_loraplus_groups():
    model = LoRA(LoRAConfig(r=4, alpha=8, rslora=True, loraplus_lr_ratio=16)).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm"))
    layer = lora_layers(model)[0]
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))
    method = LoRA(LoRAConfig(loraplus_lr_ratio=16))
    groups = method.param_groups(model, lr=1e-3)
    b_ids = {id(m.lora_B.weight) for m in lora_layers(model)}
    fast = [g for g in groups if g["lr"] == pytest.approx(1.6e-2)]
    slow = [g for g in groups if g["lr"] == pytest.approx(1e-3)]
    assert len(fast) == 1 and len(slow) == 1
    assert {id(p) for p in fast[0]["params"]} == b_ids
    assert not b_ids & {id(p) for p in slow[0]["params"]}


def test_no_targets_is_one_clear_error():
    from sidetune.errors import SidetuneError

    with pytest.raises(SidetuneError, match="matched no linear layer"):
        LoRA(LoRAConfig(targets=["nope"])).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm"))
