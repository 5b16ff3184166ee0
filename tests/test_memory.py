"""Saved-for-backward accounting: bytes per role, deduplicated by storage, weights excluded."""

from __future__ import annotations

import torch
from conftest import batch_for, ctx, tiny

from sidetune.memory import SavedTensorTracker, module_roles, snapshot_modules
from sidetune.methods.full import Full, FullConfig
from sidetune.methods.lora import LoRA, LoRAConfig


def _trace(method, preset="tiny-llama", task="causal_lm", seq=12):
    model = tiny(preset, task)
    backbone = snapshot_modules(model)
    trained = method.apply(model, ctx(model))
    roles = module_roles(trained, backbone, model)
    batch = batch_for(model, task, seq=seq)
    with SavedTensorTracker(trained, roles) as tracker:
        loss = trained(**batch).loss
    loss.backward()
    return tracker


def test_lora_pays_backbone_activations_that_grow_with_seq():
    short = _trace(LoRA(LoRAConfig()), seq=16).by_role()
    long = _trace(LoRA(LoRAConfig()), seq=32).by_role()
    assert short["backbone"] > 0 and short["method"] > 0 and short["head"] > 0
    # Backbone activations scale linearly in T here (tiny sequences: attention's T^2 terms are small but present).
    ratio = long["backbone"] / short["backbone"]
    assert 1.9 < ratio < 2.5, ratio


def test_frozen_model_saves_nothing_without_trainable_parts():
    model = tiny("tiny-llama", "causal_lm")
    for p in model.parameters():
        p.requires_grad_(False)
    roles = module_roles(model, snapshot_modules(model), model)
    with SavedTensorTracker(model, roles) as tracker:
        model(**batch_for(model, "causal_lm"))
    assert tracker.by_role() == {"backbone": 0, "method": 0, "head": 0}


def test_weights_are_not_activations_and_storages_count_once():
    lin = torch.nn.Linear(8, 8)
    roles = {id(lin): "backbone"}
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorTracker(lin, roles) as tracker:
        y = lin(x)
        z = (y * y).sum()  # y saved twice by mul: one storage
    z.backward()
    # linear saves x (4 x 8 floats) and its weight (a parameter: excluded); mul saves y once.
    assert tracker.by_role()["backbone"] == 4 * 8 * 4
    assert tracker.by_role()["head"] == 4 * 8 * 4  # y*y ran outside any module


def test_full_finetuning_counts_backbone_as_backbone():
    roles = _trace(Full(FullConfig())).by_role()
    assert roles["backbone"] > 0 and roles["method"] == 0


def test_flop_split_counts_grouped_query_attention(monkeypatch):
    """CUDA's flash / efficient SDPA kernels take grouped-query k and v as they are (enable_gqa): fewer heads than q.
    The FLOP count must not assert (it did on an H200 with torch 2.11, whose formulas require equal heads; torch
    2.13's accept GQA, so the older, strict formulas are put in place here) and must equal the count of the same
    attention with k and v repeated to q's heads."""
    import torch.utils.flop_counter as fc

    from sidetune.memory import LiveTracker, SavedTensorTracker

    def strict(formula):
        def count(*shapes):
            assert len({s[1] for s in shapes[-3:]}) == 1, "query/key/value shapes are incompatible"
            return formula(*shapes)
        return count

    monkeypatch.setattr(fc, "sdpa_flop_count", strict(fc.sdpa_flop_count))
    monkeypatch.setattr(fc, "sdpa_backward_flop_count", strict(fc.sdpa_backward_flop_count))

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, gqa):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    attn = Attn()
    q = torch.randn(2, 8, 16, 32, requires_grad=True)
    k, v = torch.randn(2, 2, 16, 32), torch.randn(2, 2, 16, 32)
    counts = []
    for args in ((q, k, v, True), (q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), False)):
        tracker = LiveTracker()
        with SavedTensorTracker(attn, {id(attn): "backbone"}) as saved, tracker:
            tracker.phase, tracker.flops_from = "forward", saved
            attn(*args)
        counts.append((tracker.fwd_flops, dict(tracker.bwd_flops)))
    assert counts[0] == counts[1] and counts[0][0] > 0
