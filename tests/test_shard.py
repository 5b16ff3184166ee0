"""Per-GPU peaks under --processes / --shard: the arithmetic of sidetune/profiling/shard.py on a real prediction."""

from __future__ import annotations

import pytest

from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.profiling.measure import measure
from sidetune.profiling.rows import resolve_rows
from sidetune.profiling.shard import Sharding, per_gpu_peak


@pytest.fixture(scope="module")
def step():
    spec = next(s for s in resolve_rows("full", "tiny-llama", "causal_lm", 2, 16, []) if s.label == "full")
    return measure(load_config(None, spec.overrides), True, "cpu", fake=True)


def test_one_process_is_the_prediction(step):
    assert per_gpu_peak(step, Sharding(1))[0] == step["peak_bytes"]


def test_ddp_adds_one_copy_of_the_gradients(step):
    assert step["grads_bytes"] > 0
    assert per_gpu_peak(step, Sharding(4, "ddp"))[0] == step["peak_bytes"] + step["grads_bytes"]


def test_fsdp_splits_weights_and_optimizer_state_and_gathers_two_blocks(step):
    assert step["block_bytes"] > 0 and step["optimizer_bytes"] > 0
    two, _ = per_gpu_peak(step, Sharding(2, "fsdp"))
    four, note = per_gpu_peak(step, Sharding(4, "fsdp"))
    sharded = step["weights_bytes"] + step["optimizer_bytes"] + (
        step["grads_bytes"] if step["peak_phase"] == "optimizer" else 0)
    assert two == step["peak_bytes"] - sharded + sharded // 2 + 2 * step["block_bytes"]
    assert four < two < step["peak_bytes"]
    assert "FSDP x4" in note


def test_bad_sharding_is_one_line():
    with pytest.raises(SidetuneError, match="--processes"):
        Sharding(0)
    with pytest.raises(SidetuneError, match="--shard"):
        Sharding(2, "zero3")


def test_plan_never_offers_what_the_trainer_refuses_under_fsdp():
    """A 4-bit base under FSDP2 is refused by `sidetune train`; the planner says so for the 4-bit rows and offers no
    "4-bit base" change, with the trainer's own reason. Under DDP the same rows are planned."""
    from sidetune.plan import plan, render
    from sidetune.profiling.shard import fsdp_refusal

    fsdp = Sharding(2, "fsdp")
    entries = plan("tiny-llama", 1, 2, 16, methods="lora,qlora", target="cpu", log=lambda *_: None, sharding=fsdp)
    by = {e["label"]: e for e in entries}
    assert by["qlora"]["refused"] == fsdp_refusal("nf4") and by["qlora"]["peak_bytes"] is None
    assert by["lora"]["peak_bytes"] > 1 and not by["lora"]["fits"]  # a 1-byte budget: every change is tried
    tried = [c["change"] for c in by["lora"]["changes"]]
    assert tried and not any("4-bit" in c for c in tried)
    table = render(entries, 1, 2, 16, fsdp)
    assert "| qlora | – | refused |" in table and "--shard ddp" in table
    ddp = plan("tiny-llama", 1, 2, 16, methods="qlora", target="cpu", log=lambda *_: None, sharding=Sharding(2))
    assert ddp[0]["peak_bytes"] > 0 and "refused" not in ddp[0]
