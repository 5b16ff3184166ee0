"""prefix_tuning: forward equals PEFT's PrefixTuningConfig(prefix_projection=True) with the same weights, the MLP is
always there and can be dropped after training without changing the output, zero-init attention starts exact, only
the prefix (and the task head) get gradients, and training lowers the loss."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, ctx, tiny
from prefix_oracle import peft_prefix_reference
from torch.testing import assert_close

from sidetune.errors import SidetuneError
from sidetune.methods import METHODS
from sidetune.methods._prefix import kv_shape
from sidetune.methods.prefix_tuning import PrefixTuning, PrefixTuningConfig

CASES = [("tiny-llama", "causal_lm"), ("tiny-llama", "classification"), ("tiny-gpt2", "causal_lm"),
         ("tiny-bert", "classification")]


def _apply(base, **kw):
    cfg = PrefixTuningConfig(num_virtual_tokens=kw.pop("p", 5), projection_dim=kw.pop("h", 32), **kw)
    return PrefixTuning(cfg).apply(copy.deepcopy(base), ctx(base))


def test_registered_with_the_papers_defaults():
    assert METHODS["prefix_tuning"] is PrefixTuning
    cfg = PrefixTuningConfig()
    assert (cfg.num_virtual_tokens, cfg.projection_dim) == (10, 512)
    model = PrefixTuning(cfg).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm"))
    # Always reparameterized: E is P x d_kv (d_kv = 2 kv heads x 16), the MLP maps d_kv -> 512 -> L * 2 * d_kv.
    assert model.prefix.embedding.weight.shape == (10, 32)
    assert [tuple(m.weight.shape) for m in model.prefix.transform[::2]] == [(512, 32), (4 * 2 * 32, 512)]


@pytest.mark.parametrize("preset,task", CASES)
def test_forward_equals_peft_prefix_projection(preset, task):
    pytest.importorskip("peft")
    base = tiny(preset, task).eval()
    ours = _apply(base, shift_positions=True).eval()  # PEFT leaves the real tokens at positions P..P+T-1
    with torch.no_grad():  # a non-trivial MLP: PEFT's default init would do, but make the bias matter too
        for p in ours.prefix.transform.parameters():
            p.normal_(std=0.3)
    batch = batch_for(base, task)
    expected = peft_prefix_reference(base, ours, task, batch, projection_dim=32)
    with torch.no_grad():
        actual, plain = ours(**batch), base(**batch)
    assert (actual.logits - plain.logits).abs().max() > 1e-3  # the prefix really acts
    assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)


def test_the_oracle_sees_a_wrong_position_or_prefix():
    # The llama-classification oracle (PEFT on the backbone plus our score head) is not vacuous: unshifted
    # positions, or a different prefix, are caught.
    base = tiny("tiny-llama", "classification").eval()
    batch = batch_for(base, "classification")
    ours = _apply(base, shift_positions=False).eval()
    expected = peft_prefix_reference(base, ours, "classification", batch, projection_dim=32)
    with torch.no_grad():
        assert (ours(**batch).logits - expected.logits).abs().max() > 1e-4
        ours.shift_positions = True
        assert_close(ours(**batch).logits, expected.logits, rtol=1e-5, atol=1e-5)
        ours.prefix.embedding.weight.add_(0.1)
        assert (ours(**batch).logits - expected.logits).abs().max() > 1e-4


@pytest.mark.parametrize("preset,task", [("tiny-llama", "causal_lm"), ("tiny-bert", "classification")])
def test_materialize_drops_the_mlp_and_keeps_the_output(preset, task):
    base = tiny(preset, task)
    model = _apply(base, dropout=0.2).eval()
    batch = batch_for(base, task)
    with torch.no_grad():
        before = model(**batch).logits
        model.prefix.materialize()
        assert model.prefix.transform is None
        layers, kv_heads, head_dim = kv_shape(base)
        assert model.prefix.embedding.weight.shape == (5, layers * 2 * kv_heads * head_dim)
        assert_close(model(**batch).logits, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset,task", CASES)
def test_zero_init_attention_makes_step0_exact(preset, task):
    base = tiny(preset, task).eval()
    batch = batch_for(base, task)
    model = _apply(base, zero_init_attention=True).eval()
    with torch.no_grad():
        assert_close(model(**batch).logits, base(**batch).logits, rtol=1e-6, atol=1e-6)
        model.prefix.transform[-1].weight.normal_()
        assert (model(**batch).logits - base(**batch).logits).abs().max() > 1e-3


@pytest.mark.parametrize("preset,task", CASES)
def test_only_the_prefix_and_head_get_gradients(preset, task):
    model = _apply(tiny(preset, task), dropout=0.1).train()
    model(**batch_for(model, task)).loss.backward()
    head = tuple(f"model.{h}." for h in model.model.sidetune_head)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"prefix.embedding.weight", "prefix.transform.0.weight", "prefix.transform.2.bias"} <= names
    for name, p in model.named_parameters():
        if name.startswith("prefix.") or name.startswith(head):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_train_pooler_adds_exactly_the_pooler():
    model = _apply(tiny("tiny-bert", "classification"), train_pooler=True).train()
    model(**batch_for(model, "classification")).loss.backward()
    for name, p in model.named_parameters():
        trains = name.startswith(("prefix.", "model.classifier.", "model.bert.pooler."))
        assert p.requires_grad == trains and (p.grad is not None) == trains, name
    with pytest.raises(SidetuneError, match="has no pooler"):
        _apply(tiny("tiny-llama", "classification"), train_pooler=True)


def test_the_prefix_alone_lowers_the_loss():
    base = tiny("tiny-bert", "classification")
    model = _apply(base).eval()  # eval: no dropout noise in the comparison
    batch = batch_for(base, "classification", batch=8)
    with torch.no_grad():  # a head that reads: the random one's logits are ~0.02 and pass almost no gradient
        model.model.classifier.weight.normal_()
    opt = torch.optim.AdamW(model.prefix.parameters(), lr=1e-2)  # the head stays as it is
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_bad_configs_fail_in_one_line():
    with pytest.raises(SidetuneError, match="projection_dim must be >= 1"):
        PrefixTuningConfig(projection_dim=0)
    with pytest.raises(SidetuneError, match="dropout must be in"):
        PrefixTuningConfig(dropout=1.0)
    with pytest.raises(SidetuneError, match="prefix_tuning supports decoder-only and encoder-only"):
        PrefixTuning(PrefixTuningConfig()).apply(tiny("tiny-t5", "seq2seq"), ctx("seq2seq"))


def test_head_lr_and_pooling_reach_prefix_tuning():
    # The readout and the head's lr are the shared _prefix.py options (tested in depth in test_ptuning_v2.py);
    # prefix_tuning passes them on: the recipe's settings give the classifier its own group and read the mean.
    base = tiny("tiny-bert", "classification").eval()
    method = PrefixTuning(PrefixTuningConfig(num_virtual_tokens=5, projection_dim=32, pooling="mean", head_lr=1e-2,
                                             zero_init_attention=True))
    model = method.apply(copy.deepcopy(base), ctx(base)).eval()
    groups = method.param_groups(model, 1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.model.classifier.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.prefix.parameters()}
    batch = batch_for(base, "classification")
    with torch.no_grad():
        hidden = base.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        assert_close(model(**batch).logits, base.classifier((hidden * m).sum(1) / m.sum(1)), rtol=1e-5, atol=1e-6)
