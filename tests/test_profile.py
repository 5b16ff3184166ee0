"""Memory profiles: live-storage tracking, the backward FLOP split, fake-tensor prediction against the CPU allocator,
the `profile` / `plan` commands. Every check runs over whatever METHODS holds (plus the qlora / qlst aliases)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import ctx, tiny
from test_cli import run_cli
from torch.utils.flop_counter import FlopCounterMode

from sidetune import memory as mem
from sidetune.config import load_config
from sidetune.methods import METHODS, build_method
from sidetune.profile import ALIASES, measure, profile_row, resolve_rows
from sidetune.profiling.report import markdown_table

# Every method that trains a causal LM (the profiled task here), and the aliases.
LABELS = [*(m for m, cls in METHODS.items() if "causal_lm" in cls.tasks),
          *(a for a, (m, *_) in ALIASES.items() if m in METHODS)]
BATCH, SEQ = 2, 32


def _spec(label: str, seq: int = SEQ, task: str = "causal_lm", sets=()):
    return next(s for s in resolve_rows(label, "tiny-llama", task, BATCH, seq, list(sets)) if s.label == label)


def _cfg(label: str, **kw):
    return load_config(None, _spec(label, **kw).overrides)


def _backbone_gets_grad(label: str) -> bool:
    """Does any tensor a backbone module returns require grad? (Autograd's own answer, independent of the
    accounting under test: if none does, no gradient can flow through the backbone.)"""
    cfg = _cfg(label)
    model = tiny("tiny-llama", "causal_lm")
    backbone = [m for m in model.modules() if m is not model and m is not model.get_output_embeddings()]
    method, c = build_method(cfg.method), ctx(model)
    if method.reads_float_base():  # LoftQ: its targets quantized by its own fit (the rest stay float here)
        from sidetune.models import quantizer

        c.quantize = quantizer(cfg.model, torch.device("cpu"))
    trained = method.apply(model, c).train()
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(
        any(t.requires_grad for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor))))
        for m in backbone]
    ids = torch.randint(3, 1000, (BATCH, 8))
    trained(input_ids=ids, labels=ids)
    for h in hooks:
        h.remove()
    return any(seen)


# ---------------------------------------------------------------------------------------------------------------------
# The command, once for every registered method


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    result = run_cli("profile", "--model", "tiny-llama", "--methods", "all", "--device", "cpu", "--batch", str(BATCH),
                     "--seq", str(SEQ), "--steps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out, {r["label"]: r for r in json.loads((out / "profile.json").read_text())}


def test_profile_writes_json_markdown_png(cpu_profile):
    out, rows = cpu_profile
    floors = {"floor", *(f"floor-{ALIASES[a][1]}" for a in LABELS if a in ALIASES and ALIASES[a][1])}
    assert set(rows) == {*LABELS, *floors}
    for r in rows.values():
        assert r["error"] is None, r
        assert r["measured_peak_source"].startswith("CPU allocator")
    md = (out / "profile.md").read_text()
    assert "| row | trainable params |" in md and "needs the least" in md and "![profile](profile.png)" in md
    png = (out / "profile.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 800 and height > 300


def test_png_bars_are_what_the_peak_is_made_of(cpu_profile):
    """Each row's bar stacks the storages live at its peak, so it ends at the predicted-peak marker (not past it, as
    a stack of every kind's total did: full fine-tuning's activations and optimizer state are not live together)."""
    from sidetune.profiling.report import peak_segments

    _, rows = cpu_profile
    for label, r in rows.items():
        segments = peak_segments(r)
        assert sum(b for _, b in segments) == r["predicted_peak_bytes"], label
        assert all(b >= 0 for _, b in segments), label
    full = peak_segments(rows["full"])
    assert dict(full)["optimizer state"] > 0 and dict(full)["weights"] == rows["full"]["weights_bytes"]


@pytest.mark.parametrize("label", LABELS)
def test_prediction_within_10_percent_of_cpu_allocator(cpu_profile, label):
    r = cpu_profile[1][label]
    assert r["prediction_error"] is not None, r.get("prediction_failed")
    assert abs(r["prediction_error"]) <= 0.10, r
    # The 4-bit simulation holds exactly the bytes bitsandbytes' quantizer makes.
    assert r["predicted_breakdown"]["weights"] == r["peak_breakdown"]["weights"] == r["weights_bytes"]


@pytest.mark.parametrize("label", LABELS)
def test_gradient_to_input_cost_is_zero_exactly_when_no_gradient_enters_the_backbone(cpu_profile, label):
    r = cpu_profile[1][label]
    declared = getattr(METHODS[r["method"]], "backbone_trains", True)
    if not declared or not _backbone_gets_grad(label):
        assert r["act_backbone_bytes"] == 0 and r["bwd_dx_flops_backbone"] == 0, r
    else:
        assert r["act_backbone_bytes"] > 0 and r["bwd_dx_flops_backbone"] > 0, r


def test_full_finetuning_dw_covers_every_linear_weight(cpu_profile):
    r = cpu_profile[1]["full"]
    model = tiny("tiny-llama", "causal_lm")
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    # The tied LM head is a Linear too; each weight's dL/dW matmul costs 2 * tokens * in * out.
    assert r["bwd_dw_flops"] == 2 * BATCH * SEQ * linear
    assert r["params_trainable"] == r["params_total"] == sum(p.numel() for p in model.parameters())


def test_floor_is_below_every_method(cpu_profile):
    rows = cpu_profile[1]
    for label in LABELS:
        floor = rows["floor" if rows[label]["quantize"] is None else f"floor-{rows[label]['quantize']}"]
        assert floor["act_total_bytes"] == 0 and floor["grads_bytes"] == 0
        assert floor["measured_peak_bytes"] < rows[label]["measured_peak_bytes"]


# ---------------------------------------------------------------------------------------------------------------------
# Accounting in process (no subprocess): linear growth, other configs, FLOPs against FlopCounterMode


@pytest.mark.parametrize("label", LABELS)
def test_backbone_activations_grow_linearly_with_seq(label):
    a, b, c = (measure(_cfg(label, seq=seq), True, "cpu", fake=False)["act_backbone_bytes"] for seq in (16, 32, 48))
    if a == 0:
        assert b == c == 0 and measure(_cfg(label), True, "cpu", fake=False)["bwd_dx_flops_backbone"] == 0
        assert not _backbone_gets_grad(label)
    else:
        assert 0 < b - a <= c - b, (a, b, c)
        if label in ("ptuning_v2", "prefix_tuning"):
            # The prefix needs an explicit B x 1 x T x (P+T) attention mask, which SDPA converts to a float bias and
            # saves in every layer: a T^2 term on top of the linear ones (PEFT's prefix tuning pays the same).
            assert c - b > b - a
        elif label in ("prompt_tuning", "ptuning_v1"):
            # P virtual tokens run through the backbone with the T real ones: linear in T + P (affine in T).
            assert c - b == b - a and a > b - a, (a, b, c)
        else:
            # SDPA with is_causal saves O(T) per layer: every backbone activation is linear in T.
            assert b == 2 * a and c == 3 * a, (a, b, c)


@pytest.mark.parametrize("label,task,sets", [
    ("lora", "causal_lm", ["train.loss_chunk_size=16", "train.gradient_checkpointing=true"]),
    ("qlora", "classification", []),
    ("full", "classification", ["train.optimizer=adamw", "train.max_grad_norm=0"]),
])
def test_prediction_matches_allocator_on_other_configs(label, task, sets):
    cfg = _cfg(label, task=task, sets=sets)
    real = measure(cfg, True, "cpu", fake=False)
    pred = measure(cfg, True, "cpu", fake=True)
    assert abs(pred["peak_bytes"] / real["cpu_allocated_peak_bytes"] - 1) <= 0.10
    assert pred["act_backbone_bytes"] == real["act_backbone_bytes"]
    if "train.gradient_checkpointing=true" in sets:
        assert real["recompute_flops"] > 0  # the checkpointed forward runs again in backward


@pytest.mark.parametrize("label,sets", [(m, []) for m in ("full", "lora") if m in METHODS] +
                         [("lora", ["method.dora=true"])])
def test_backward_flop_split_adds_up_to_flop_counter(label, sets):
    """dL/dx + dL/dW predicted from the forward equals what FlopCounterMode counts in the real backward (eager
    attention, so that every attention matmul is a counted bmm). DoRA: its norm's B A runs under no_grad and has no
    backward."""
    cfg = load_config(None, [*_spec(label).overrides, *sets, "model.attn_implementation=eager"])
    model = tiny("tiny-llama", "causal_lm", attn_implementation="eager")
    backbone = mem.snapshot_modules(model)
    trained = build_method(cfg.method).apply(model, ctx(model)).train()
    roles = mem.module_roles(trained, backbone, model)
    ids = torch.randint(3, 1000, (BATCH, SEQ))
    tracker, saved = mem.LiveTracker(), mem.SavedTensorTracker(trained, roles)
    tracker.track_model(trained)  # weights known to the tracker: their casts and views are weights too
    tracker.flops_from = saved
    with tracker, saved:
        loss = trained(input_ids=ids, labels=ids).loss
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    assert sum(tracker.bwd_flops.values()) == counter.get_total_flops()
    if label == "lora":  # a frozen backbone has no dL/dW; LoRA's A and B do
        assert tracker.bwd_flops[("backbone", "dw")] == 0 < tracker.bwd_flops[("method", "dw")]


def test_live_tracker_follows_allocations_and_counts_a_saved_weight_once():
    lin = torch.nn.Linear(256, 256)  # 256 KiB weight, frozen: saved for dL/dx, yet counted once
    lin.requires_grad_(False)
    x = torch.randn(64, 256, requires_grad=True)
    tracker = mem.LiveTracker()
    tracker.track_model(lin)
    tracker.track([x], "inputs")
    with mem.CPUAllocatorPeak() as alloc, tracker:
        tracker.phase = "forward"
        y = lin(x)  # 64 KiB
        z = (y * y).sum()
        tracker.phase = "backward"
        z.backward()
    weights, act = (256 * 256 + 256) * 4, 64 * 256 * 4
    assert tracker.current["weights"] == weights and tracker.current["inputs"] == act
    assert tracker.peak == mem.storage_bytes([lin.weight, lin.bias, x]) + alloc.peak
    assert weights + 3 * act < tracker.peak < weights + 6 * act  # x, y, y*y, and the backward grads
    del y, z
    assert tracker.current["activations"] == 0


def test_fake_masks_answer_all_true():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), mem.AllTrueMasks():
        x = torch.empty(3, 5, 4)
        keep = torch.empty(3, 5, dtype=torch.bool)
        assert x[keep].shape == (15, 4)
        assert bool(keep.all())


def test_profile_row_meta_for_an_8b_shape_needs_no_memory():
    spec = next(s for s in resolve_rows("lora", "llama-8b", "causal_lm", 1, 64, []) if s.label == "lora")
    row = profile_row(spec, "meta", "cuda", 0)
    assert row["error"] is None and row["measured_peak_bytes"] is None
    # bf16 weights of an 8B model: 16 GB; the prediction holds them without allocating them
    assert 14.5 * 2**30 < row["weights_bytes"] < 15.5 * 2**30 and row["weights_bytes"] < row["predicted_peak_bytes"]
    assert row["act_backbone_bytes"] > 0 and row["dtype"] == "bfloat16" and row["mixed_precision"] == "bf16"


def test_scoped_sets_reach_their_rows_only():
    rows = {s.label: s.overrides for s in resolve_rows(
        "lora,qlora,lst", "tiny-llama", "causal_lm", 2, 16,
        ["train.loss_chunk_size=8", "lora.r=4", "qlora.train.gradient_checkpointing=true"])}
    assert all("train.loss_chunk_size=8" in o for o in rows.values())  # global: every row, references included
    assert "method.r=4" in rows["lora"] and "method.r=4" in rows["qlora"] and "method.r=4" not in rows["lst"]
    assert [label for label, o in rows.items() if "train.gradient_checkpointing=true" in o] == ["qlora"]
    assert load_config(None, rows["qlora"]).train.gradient_checkpointing


# ---------------------------------------------------------------------------------------------------------------------
# plan


def test_plan_largest_batch_is_the_boundary():
    from sidetune.plan import _peak, largest_batch, plan

    spec = _spec("lora")
    at2, at3 = _peak(spec, "cpu", batch=2), _peak(spec, "cpu", batch=3)
    assert largest_batch(spec, "cpu", (at2 + at3) // 2, 2, at2) == 2
    assert largest_batch(spec, "cpu", at3, 2, at2) == 3
    [tight] = plan("tiny-llama", at2 - 1, 2, SEQ, methods="lora", target="cpu", log=lambda *_: None)
    assert not tight["fits"]
    fixes = {c["change"]: c for c in tight["changes"]}
    assert any("chunked" in c for c in fixes) and any("checkpointing" in c for c in fixes)
    for c in fixes.values():
        assert c["fits"] == (c["peak_bytes"] <= at2 - 1)
    assert any(c["fits"] for c in fixes.values())  # chunking the 49k-vocab loss frees far more than one byte
    assert tight["largest_batch"] == 1 and _peak(spec, "cpu", batch=1) <= at2 - 1


def test_plan_largest_seq_is_the_boundary():
    from sidetune.plan import _peak, largest_seq, plan, seq_unit

    assert (seq_unit(131072), seq_unit(8192), seq_unit(SEQ)) == (1024, 64, 1)
    spec = _spec("lora")
    at = {s: _peak(spec, "cpu", batch=BATCH, seq=s) for s in (SEQ, 40, 41)}
    assert at[SEQ] < at[40] < at[41]
    assert largest_seq(spec, "cpu", (at[40] + at[41]) // 2, BATCH, SEQ, at[SEQ]) == 40  # searched up from SEQ
    assert largest_seq(spec, "cpu", at[SEQ] - 1, BATCH, 40, at[40]) < SEQ  # and down from 40
    assert largest_seq(spec, "cpu", 1, BATCH, SEQ, at[SEQ]) == 0
    # A learned position table caps the search: GPT-2's 512 positions, however large the budget.
    gpt2 = next(s for s in resolve_rows("lora", "tiny-gpt2", "causal_lm", 1, 64, []) if s.label == "lora")
    assert largest_seq(gpt2, "cpu", 1 << 40, 1, 64, _peak(gpt2, "cpu", batch=1, seq=64)) == 512
    [entry] = plan("tiny-llama", (at[40] + at[41]) // 2, BATCH, SEQ, methods="lora", target="cpu",
                   log=lambda *_: None)
    assert entry["largest_seq"] == 40 and entry["fits"]


def test_plan_headroom_and_the_smallest_gpu():
    from sidetune.plan import HEADROOM_BYTES, HEADROOM_FRACTION, GiB, smallest_gpu, usable

    assert (GiB, 0.10) == (HEADROOM_BYTES, HEADROOM_FRACTION)
    assert usable(24 * GiB, "cuda") == int(24 * GiB * 0.9) - GiB  # 20.6 GiB of a 24 GiB card
    assert usable(24 * GiB, "cpu") == 24 * GiB
    assert usable(GiB // 2, "cuda") == 0
    assert smallest_gpu(int(21.92 * GiB)).startswith("40 GiB")  # the "21.92 of 24 fits": not with headroom
    assert smallest_gpu(int(20.5 * GiB)).startswith("24 GiB")
    assert smallest_gpu(int(6.3 * GiB)).startswith("12 GiB") and smallest_gpu(6 * GiB).startswith("8 GiB")
    assert smallest_gpu(126 * GiB) is None and smallest_gpu(125 * GiB).startswith("141 GiB")


def test_plan_says_what_batch_1_needs_when_nothing_fits():
    from sidetune.plan import _peak, plan, render

    [entry] = plan("tiny-llama", 1, 2, SEQ, methods="lora", target="cpu", log=lambda *_: None)
    at_one = _peak(_spec("lora"), "cpu", batch=1)
    assert entry["largest_batch"] == 0 and entry["peak_bytes_batch_1"] == at_one
    table = render([entry], 1, 2, SEQ)
    row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert f"none: does not fit even at batch 1 (needs {at_one / 2**20:.2f} MiB)" in row
    assert "| 0 |" not in row and "smallest GPU" not in table  # a CPU plan names no GPU


def test_plan_for_cuda_keeps_headroom_and_names_a_gpu():
    from sidetune.plan import GiB, render, smallest_gpu, usable

    entries = [{"label": "lora", "method": "lora", "peak_bytes": int(21.92 * GiB), "fits": False,
                "budget_bytes": usable(24 * GiB, "cuda"), "target": "cuda", "largest_batch": 3, "changes": [],
                "trains_backbone": False, "peak_bytes_batch_1": None, "smallest_gpu": smallest_gpu(int(21.92 * GiB)),
                "how": ""}]
    table = render(entries, 24 * GiB, 4, 1024)
    assert "a step may fill 20.60 GiB of it: 1 GiB for the CUDA context and 10% for the allocator's fragmentation" in table
    assert "| lora | 21.92 | no | 3 | – | nothing tried fits at this batch: batch 3 does | 40 GiB (A100-40GB) |" in table


def test_plan_cli(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("plan", "--model", "tiny-llama", "--vram", "1GiB", "--batch", "2", "--seq", "16",
                     "--methods", "lora", "--target", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| lora |" in result.stdout and json.loads(out.read_text())[0]["fits"] is True


@pytest.mark.parametrize("args,needle", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--set", "lora.rr=3"], "unknown config key 'method.rr'"),
    (["--vram", "lots"], "memory size 'lots' is not understood"),
    (["--vram", "0"], "memory size '0' is not understood"),
    (["--vram", "1.2.3GiB"], "memory size '1.2.3GiB' is not understood"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--target", "cuda", "--device", "cpu"], "--target cuda applies to --device meta only"),
])
def test_profile_bad_input(tmp_path, args, needle):
    out = tmp_path / "p"
    base = {"--model": "tiny-llama", "--device": "meta", "--out": str(out)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    result = run_cli("profile", *[x for kv in base.items() for x in kv], "--seq", "8", "--batch", "1",
                     "--methods", base.get("--methods", "lora"))
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("label", LABELS)
def test_cuda_prediction_within_10_percent_of_max_memory_allocated(label):
    spec = next(s for s in resolve_rows(label, "tiny-llama", "causal_lm", 4, 128, []) if s.label == label)
    row = profile_row(spec, "cuda", "cuda", 1)
    assert abs(row["prediction_error"]) <= 0.10, row


# ---------------------------------------------------------------------------------------------------------------------
# The LoRA variants' own costs: DoRA's magnitude and norm, the inits' one-time work


def _targets_qv():
    """(out, in) of tiny-llama's default LoRA targets (q_proj and v_proj of each block)."""
    model = tiny("tiny-llama", "causal_lm")
    return [(m.out_features, m.in_features) for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]


def test_dora_row_counts_its_magnitude_norm_flops_and_activations():
    """The dora row against the lora row on the same step (fake tensors): the magnitude vector is one trainable
    number per output row (its gradient and two Adam moments with it); the norm ||W + s B A|| costs the B A product
    in the forward (2 out r in FLOPs a layer) and nothing in the backward (detached); m's gradient keeps W x and
    s B A x (two tokens x out fp32 activations a layer) and a few out-sized vectors."""
    lora, dora = (measure(_cfg(label), True, "cpu", fake=True) for label in ("lora", "dora"))
    shapes, r, tokens = _targets_qv(), load_config(None, _spec("lora").overrides).method.r, BATCH * SEQ
    outs = sum(o for o, _ in shapes)
    assert dora["params_trainable"] - lora["params_trainable"] == outs
    # two Adam moments per number, and a float32 step count per tensor
    assert dora["optimizer_bytes"] - lora["optimizer_bytes"] == 2 * 4 * outs + 4 * len(shapes)
    assert dora["grads_bytes"] - lora["grads_bytes"] == 4 * outs
    assert dora["fwd_flops"] - lora["fwd_flops"] == sum(2 * o * r * i for o, i in shapes)
    assert dora["bwd_dw_flops"] == lora["bwd_dw_flops"] and dora["bwd_dx_flops"] == lora["bwd_dx_flops"]
    extra = dora["act_method_bytes"] - lora["act_method_bytes"]
    assert 2 * tokens * outs * 4 <= extra <= 2 * tokens * outs * 4 + 4 * outs * 4, extra
    assert dora["act_backbone_bytes"] == lora["act_backbone_bytes"]


def test_init_one_time_cost_predicted_and_measured():
    """The method's apply, around which the profile watches: plain LoRA and DoRA allocate exactly A and B (and m)
    plus DoRA's norm, predicted to the byte; PiSSA adds at least its SVD's U, S, V of the largest layer, OLoRA its
    QR, LoftQ its quantized copies; the prediction counts tensors, not the kernels' scratch (LAPACK's workspace,
    bitsandbytes' quantizer buffers), so it is at most the measured peak."""
    shapes = _targets_qv()
    r = load_config(None, _spec("lora").overrides).method.r
    ab = 4 * sum(r * i + o * r for o, i in shapes)
    rows = {label: profile_row(_spec(label, seq=8), "cpu", "cpu", 0)
            for label in ("lora", "dora", "pissa", "olora", "loftq")}
    assert rows["lora"]["init_peak_bytes"] == rows["lora"]["predicted_init_peak_bytes"] == ab
    assert rows["dora"]["init_peak_bytes"] == rows["dora"]["predicted_init_peak_bytes"] > ab + 4 * sum(
        o for o, _ in shapes)
    o, i = max(shapes)
    k = min(o, i)
    assert rows["pissa"]["predicted_init_peak_bytes"] >= ab + 4 * (o * k + k + k * i)  # U, S, Vh of the largest
    assert rows["olora"]["predicted_init_peak_bytes"] >= ab + 4 * (o * k + k * i)  # Q, R
    for label in ("pissa", "olora", "loftq"):
        row = rows[label]
        assert row["init_s"] > 0 and row.get("prediction_failed") is None
        assert rows["lora"]["init_peak_bytes"] < row["predicted_init_peak_bytes"] <= row["init_peak_bytes"] * 1.01
    assert "| dora |" in markdown_table(list(rows.values()))
