"""LST with method.init=pruned_fisher: the Fisher scores equal autograd's sum_b (dL_b/dw * w)^2, the backbone keeps
no gradient and no requires_grad, the kept dims follow the Fisher where it disagrees with the magnitude, and the LST
contract (step 0 = frozen model, exactly the trainable set gets gradients) still holds."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, tiny
from torch.testing import assert_close

from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.methods import Context, build_method, trainable_parameters
from sidetune.methods._lst_prune import fisher_scores
from sidetune.methods.lst import LST, LSTConfig
from sidetune.session import build
from sidetune.train import load_run, save_trainable

CASES = [("tiny-llama", "causal_lm"), ("tiny-gpt2", "causal_lm"), ("tiny-t5", "seq2seq"),
         ("tiny-bert", "classification")]


def _fisher_lst(base, task, batches, **cfg):
    ctx = Context.for_task(task, calibration=batches)
    return LST(LSTConfig(init="pruned_fisher", **cfg)).apply(base, ctx)


def test_fisher_scores_equal_autograd():
    base = tiny("tiny-llama", "causal_lm").eval()
    batches = [batch_for(base, "causal_lm", seed=s) for s in range(3)]
    scores = fisher_scores(base, "all", batches)
    ref = copy.deepcopy(base).requires_grad_(False)
    q, down = ref.model.layers[1].self_attn.q_proj.weight, ref.model.layers[1].mlp.down_proj.weight
    expected = {"q": 0, "down": 0}
    for batch in batches:
        q.requires_grad_(True)
        down.requires_grad_(True)
        ref(**batch).loss.backward()
        expected["q"] = expected["q"] + (q.grad * q).detach() ** 2
        expected["down"] = expected["down"] + (down.grad * down).detach() ** 2
        q.grad = down.grad = None
    assert_close(scores[0][1]["q"], expected["q"], rtol=1e-4, atol=1e-12)
    assert_close(scores[0][1]["down"], expected["down"], rtol=1e-4, atol=1e-12)
    assert torch.equal(scores[0][1]["ln1"], torch.ones_like(scores[0][1]["ln1"]))  # the gain is in the gradient


@pytest.mark.parametrize("preset,task", CASES)
def test_backbone_keeps_no_grad_and_the_contract_holds(preset, task):
    base = tiny(preset, task).eval()
    batch = batch_for(base, task)
    model = _fisher_lst(copy.deepcopy(base), task, [batch_for(base, task, seed=1)]).eval()
    trainable = trainable_parameters(model)
    for name, p in model.backbone.named_parameters():
        assert p.grad is None, name
        assert not p.requires_grad or f"backbone.{name}" in trainable, name
    if task != "classification":  # only a classifier in the backbone trains
        assert not any(n.startswith("backbone.") for n in trainable)
    if task != "classification":  # LST's step 0 is the frozen model except for classification (see lst.py)
        with torch.no_grad():
            expected, actual = base(**batch), model(**batch)
        assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    model.train()
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def _magnitude_lies(base, dims):
    """Residual dims `dims` carry nothing (zero embeddings, nothing writes them) but have huge reading columns: L1
    ranks them first, their Fisher is exactly 0."""
    with torch.no_grad():
        base.model.embed_tokens.weight[:, dims] = 0
        for layer in base.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.o_proj.weight[dims] = 0
            m.down_proj.weight[dims] = 0
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.up_proj, m.gate_proj):
                lin.weight[:, dims] *= 50
    return base


def test_kept_dims_follow_the_fisher_not_the_magnitude():
    dims = [1, 9, 20, 33, 41, 50, 58, 63]  # d=64, r=8: 8 kept dims
    base = _magnitude_lies(tiny("tiny-llama", "causal_lm").eval(), dims)
    batches = [batch_for(base, "causal_lm", seed=s) for s in range(2)]
    l1 = LST(LSTConfig(r=8)).apply(copy.deepcopy(base), Context.for_task("causal_lm"))
    fisher = _fisher_lst(copy.deepcopy(base), "causal_lm", batches, r=8)
    kept_l1 = set(l1.side.ladders[0].weight.argmax(1).tolist())
    kept_fisher = set(fisher.side.ladders[0].weight.argmax(1).tolist())
    assert kept_l1 == set(dims)
    assert not kept_fisher & set(dims), kept_fisher


def test_calibration_hook_and_config():
    assert build_method(LSTConfig(init="pruned_fisher", calibration_batches=3)).calibration_batches() == 3
    assert build_method(LSTConfig()).calibration_batches() == 0
    with pytest.raises(SidetuneError, match="calibration_batches"):
        LSTConfig(calibration_batches=0)


def test_a_saved_run_reloads_without_data(tmp_path, sst2_small):
    """load_run builds without data: the L1 cut stands in for the Fisher one and the checkpoint overwrites it all."""
    cfg = load_config(None, [
        "model.name=tiny-llama", "data.task=causal_lm", f"data.train={sst2_small['train']}", "data.max_length=16",
        "train.batch_size=4", "method.name=lst", "method.init=pruned_fisher", "method.calibration_batches=2"])
    s = build(cfg, "cpu")
    assert len(s.model.side.blocks) == 4
    save_trainable(s.model, cfg, tmp_path / "final")
    loaded, _ = load_run(tmp_path)
    batch = batch_for(s.base, "causal_lm")
    s.model.eval()
    with torch.no_grad():
        assert_close(loaded(**batch).logits, s.model(**batch).logits)
    # ... and the Fisher cut did differ from the L1 one the reload started from.
    fresh = LST(LSTConfig()).apply(tiny("tiny-llama", "causal_lm"), Context.for_task("causal_lm"))
    assert not torch.equal(fresh.side.ladders[0].weight, s.model.side.ladders[0].weight)
