"""The contract every registered method keeps, checked for each entry of METHODS on tiny models.

- step 0 equals the frozen model (where the method allows it: LoRA B=0, adapter up=0, LST output at 0 for LM tasks);
- after backward, exactly the trainable set has gradients (the frozen backbone has `grad is None`);
- the trainable set is what `apply` left with requires_grad, and it is not empty.

A new method adds its entry to CASES (the configs that make step 0 exact) when it is registered.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, tiny
from torch.testing import assert_close

from sidetune.methods import METHODS, build_method, trainable_parameters

# method name -> (method config overrides, [(preset, task), ...] it must support)
CASES: dict[str, tuple[dict, list[tuple[str, str]]]] = {
    "full": ({}, [("tiny-llama", "causal_lm"), ("tiny-bert", "classification")]),
    "lora": ({"targets": ["all-linear"]}, [("tiny-llama", "causal_lm"), ("tiny-llama", "classification"),
                                           ("tiny-bert", "classification"), ("tiny-gpt2", "causal_lm"),
                                           ("tiny-t5", "seq2seq")]),
    "adapter": ({}, [("tiny-llama", "causal_lm"), ("tiny-llama", "classification"), ("tiny-bert", "classification"),
                     ("tiny-gpt2", "causal_lm"), ("tiny-t5", "seq2seq")]),
    # zero_init_attention: a prefix under P-tuning v2's joint softmax cannot be invisible (see ptuning_v2.py).
    "ptuning_v2": ({"zero_init_attention": True}, [("tiny-llama", "causal_lm"), ("tiny-llama", "classification"),
                                                   ("tiny-bert", "classification"), ("tiny-gpt2", "causal_lm")]),
    # LM tasks only: for classification LST's classifier reads its own pooling of h_final + side (e.g. the last real
    # token by attention mask), not transformers' pooler, so step 0 is a different (linear-probe) model by design;
    # tests/test_lst.py checks gradients and saved tensors for classification.
    "lst": ({"side_layers": "every:2"}, [("tiny-llama", "causal_lm"), ("tiny-gpt2", "causal_lm"),
                                         ("tiny-t5", "seq2seq")]),
}


def test_every_registered_method_has_a_contract_case():
    assert set(CASES) == set(METHODS)


def _params():
    for name, (overrides, targets) in CASES.items():
        for preset, task in targets:
            yield pytest.param(name, overrides, preset, task, id=f"{name}-{preset}-{task}")


def _apply(name, overrides, base):
    cfg = METHODS[name].Config(**overrides)
    return build_method(cfg).apply(copy.deepcopy(base))


@pytest.mark.parametrize("name,overrides,preset,task", list(_params()))
def test_step0_equals_frozen_model(name, overrides, preset, task):
    base = tiny(preset, task).eval()
    batch = batch_for(base, task)
    with torch.no_grad():
        expected = base(**batch)
        actual = _apply(name, overrides, base).eval()(**batch)
    assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,overrides,preset,task", list(_params()))
def test_exactly_the_trainable_set_gets_gradients(name, overrides, preset, task):
    base = tiny(preset, task)
    model = _apply(name, overrides, base).train()
    trainable = trainable_parameters(model)
    assert trainable
    model(**batch_for(base, task)).loss.backward()
    for pname, p in model.named_parameters():
        if pname in trainable:
            assert p.grad is not None, f"{pname} is trainable but got no gradient"
        else:
            assert p.grad is None, f"{pname} is frozen but got a gradient"
