"""`sidetune plan`: which methods fit a memory budget, the largest batch each can take, and what to change.

Every number is a prediction from `sidetune profile`'s accounting on fake tensors (the live storages of one
steady-state training step; nothing is allocated), so a 70B plan runs on a laptop. For each method (and the aliases
qlora / qlst) the planner predicts the peak at the requested batch, searches the largest batch that fits (a handful of
predictions, `largest_batch`) and the longest sequence that fits at that batch (`largest_seq`, the long-context
question), and, for a method that does not fit, predicts the changes that cut memory:

- quantize the frozen base to 4-bit (model.quantize=nf4),
- the chunked LM loss (train.loss_chunk_size), which never holds the B x T x V logits,
- gradient checkpointing (train.gradient_checkpointing), for methods that backpropagate through the backbone,
- the frozen backbone's MLPs in token chunks (train.mlp_chunk_size), for methods that do not,
- a method's own options: `Method.plan_options`, a description mapped to method-config overrides (e.g. LST:
  {"a side layer on every 2nd layer": {...}}),
- all of these together.

A GPU cannot give all of its memory to the step the prediction follows (`torch.cuda.max_memory_allocated`): the CUDA
context (cuBLAS/cuDNN workspaces, kernels: 0.75 GiB measured on an H200) is outside it, and the caching allocator's fragmentation
reserves more than it allocates. So for --target cuda a method "fits" when its predicted peak is within the budget
less HEADROOM_BYTES and less HEADROOM_FRACTION of it (`usable`); the plan prints both numbers. For --target cpu the
budget is used as it is. Each method also names the smallest common GPU (`GPUS`) whose usable memory holds its peak.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sidetune.errors import SidetuneError
from sidetune.profile import (
    ALIASES,
    GiB,
    MiB,
    RowSpec,
    check_model,
    check_rows,
    measure,
    objective_rows,
    parse_bytes,
    resolve_rows,
)
from sidetune.profiling.shard import Sharding, per_gpu_peak
from sidetune.tasks import get_task

ONE_PROCESS = Sharding()
CHUNK = 1024  # loss chunk the planner proposes: at most 1024 positions of logits at a time
MLP_CHUNK = 4096  # tokens per frozen-MLP chunk the planner proposes (train.mlp_chunk_size)
# Measured on an H200 (torch 2.11, CUDA 13; 2026-12-04; a 1.1B Llama, bf16, fused AdamW, batch 4/8/16 x 512): the
# process held 0.75 GiB outside the caching allocator (context, cuBLAS), and the allocator reserved 3.9%, 3.4% and
# 13.4% more than max_memory_allocated.
HEADROOM_BYTES = 1 << 30  # the CUDA context and library workspaces, outside max_memory_allocated
HEADROOM_FRACTION = 0.10  # the caching allocator's fragmentation: reserved above allocated
# Common GPU memory sizes (GiB, as sold) and examples, smallest first: which one a method's peak needs.
GPUS = ((8, "RTX 4060 / 3070"), (12, "RTX 3060 / 4070"), (16, "T4, V100-16GB, RTX 4080"),
        (24, "RTX 3090 / 4090, A10, L4"), (40, "A100-40GB"), (48, "A6000, L40S"), (80, "A100-80GB, H100"),
        (141, "H200"))


def usable(vram: int, target: str) -> int:
    """The part of a `vram` budget a training step may fill: all of it on a CPU; on CUDA less the context and the
    allocator's fragmentation (see the module docstring)."""
    if target != "cuda":
        return vram
    return max(0, int(vram * (1 - HEADROOM_FRACTION)) - HEADROOM_BYTES)


def smallest_gpu(peak: int) -> str | None:
    """The smallest common GPU whose usable memory holds `peak`, e.g. "24 GiB (RTX 3090 / 4090, A10, L4)"; None if
    not even the largest does."""
    for gib, examples in GPUS:
        if peak <= usable(gib * GiB, "cuda"):
            return f"{gib} GiB ({examples})"
    return None


def _measure(spec: RowSpec, target: str, extra: list[str] = (), batch: int | None = None,
             sharding: Sharding = ONE_PROCESS, seq: int | None = None) -> dict[str, Any]:
    """The predicted step; its `peak_bytes` is the per-GPU peak under `sharding` (one process by default)."""
    from sidetune.config import load_config

    overrides = [*spec.overrides, *extra, *([f"train.batch_size={batch}"] if batch else []),
                 *([f"data.max_length={seq}"] if seq else [])]
    step = measure(load_config(None, overrides), spec.method is not None, target, fake=True)
    step["peak_bytes"], step["per_gpu_note"] = per_gpu_peak(step, sharding)
    return step


def _peak(spec: RowSpec, target: str, extra: list[str] = (), batch: int | None = None,
          sharding: Sharding = ONE_PROCESS, seq: int | None = None) -> int:
    return _measure(spec, target, extra, batch, sharding, seq)["peak_bytes"]


def _largest(peak, vram: int, start: int, cap: int) -> int:
    """The largest n in 1..cap with peak(n) <= vram (0 if not even n = 1 fits), peak(start) known or cheap.

    The peak grows with n but is not one straight line: it is the largest of several (the forward's end, the
    backward's start, the loss chunks, the optimizer step), each affine (attention scores: quadratic) in n, and the
    one on top changes with n. So: bracket the boundary (secant jumps, doubling), then close in alternating secant
    and bisection steps; each step is one prediction."""
    if peak(start) <= vram:
        lo, hi = start, None
        while hi is None:
            if lo >= cap:
                return cap
            step = peak(min(2 * lo, cap)) - peak(lo)  # per min(lo, cap - lo) more
            jump = int(lo + (vram - peak(lo)) * (min(2 * lo, cap) - lo) / step) if step > 0 else 4 * lo
            cand = min(cap, max(lo + 1, min(jump, 64 * lo)))
            if peak(cand) <= vram:
                lo = cand
            else:
                hi = cand
    else:
        if peak(1) > vram:
            return 0
        lo, hi = 1, start
    secant = True
    while hi - lo > 1:
        if secant and peak(hi) > peak(lo):
            mid = lo + int((vram - peak(lo)) * (hi - lo) / (peak(hi) - peak(lo)))
        else:
            mid = (lo + hi) // 2
        mid = min(max(mid, lo + 1), hi - 1)
        secant = not secant
        if peak(mid) <= vram:
            lo = mid
        else:
            hi = mid
    return lo


def largest_batch(spec: RowSpec, target: str, vram: int, batch: int, peak_at_batch: int,
                  extra: list[str] = (), sharding: Sharding = ONE_PROCESS, *, known: dict[int, int] | None = None,
                  log=None) -> int:
    """The largest batch whose predicted peak fits `vram` (0 if not even batch 1 fits), by `_largest`. Beyond 2**24
    samples memory no longer grows with the batch in any way that matters: the search stops there."""
    known = {} if known is None else known  # batch -> predicted peak; the caller may read it back (batch 1's)
    known[batch] = peak_at_batch

    def peak(b: int) -> int:
        if b not in known:
            known[b] = _peak(spec, target, extra, b, sharding)
            if log is not None:  # each prediction takes seconds on a large model: say what is happening
                log(f"sidetune: plan:   {spec.label} at batch {b}: {known[b] / GiB:.2f} GiB")
        return known[b]

    return _largest(peak, vram, batch, max(batch, 1 << 24))


SEQ_CEILING = 1 << 20  # the longest sequence the search tries where the model's positions set no limit (RoPE)


def seq_unit(seq: int) -> int:
    """The resolution of the sequence search: 1/128 of the requested length, a power of two (1024 at 131072)."""
    return max(1, 1 << max(0, (seq // 128).bit_length() - 1))


def largest_seq(spec: RowSpec, target: str, vram: int, batch: int, seq: int, peak_at_seq: int,
                sharding: Sharding = ONE_PROCESS, *, log=None) -> int:
    """The longest sequence, in steps of `seq_unit(seq)`, whose predicted peak at `batch` fits `vram` (0 if not even
    one step does), up to the positions the model can read (`checks.max_positions`) or SEQ_CEILING."""
    from sidetune.checks import max_positions, model_config
    from sidetune.config import load_config

    unit = seq_unit(seq)
    config = model_config(load_config(None, spec.overrides).model)
    limit = max_positions(config) if config is not None else None
    cap = max(1, (limit or SEQ_CEILING) // unit)
    known = {seq // unit: peak_at_seq} if seq % unit == 0 else {}

    def peak(n: int) -> int:
        if n not in known:
            known[n] = _peak(spec, target, batch=batch, sharding=sharding, seq=n * unit)
            if log is not None:
                log(f"sidetune: plan:   {spec.label} at seq {n * unit}: {known[n] / GiB:.2f} GiB")
        return known[n]

    return unit * _largest(peak, vram, max(1, min(seq // unit, cap)), cap)


def changes(spec: RowSpec, task: str, trains_backbone_weights: bool = False,
            sharding: Sharding = ONE_PROCESS) -> list[tuple[str, list[str]]]:
    """The memory-cutting changes that apply to a row: (description, config overrides). A method that trains the
    backbone's own weights is not offered 4-bit quantization: it would freeze them, a different method. Nor is a
    sharding the trainer refuses a 4-bit base under (FSDP2)."""
    from sidetune.config import load_config
    from sidetune.methods import METHODS

    cfg = load_config(None, spec.overrides)
    cls = METHODS[spec.method]
    out = []
    if cfg.model.quantize is None and not trains_backbone_weights and sharding.refusal("nf4") is None:
        out.append(("4-bit base", ["model.quantize=nf4"]))
    if get_task(task).shift_labels and not cfg.train.loss_chunk_size:
        # At least 8 chunks per batch, so that only an eighth of the logits is ever alive (a power of two: 512, not 511).
        positions = max(1, cfg.train.batch_size * (cfg.data.max_length - 1) // 8)
        chunk = min(CHUNK, 1 << (positions.bit_length() - 1))
        out.append(("chunked LM loss", [f"train.loss_chunk_size={chunk}"]))
    if cls.backbone_trains and not cfg.train.gradient_checkpointing:
        out.append(("gradient checkpointing", ["train.gradient_checkpointing=true"]))
    if not cls.backbone_trains and not cfg.train.mlp_chunk_size and cfg.data.max_length * cfg.train.batch_size > MLP_CHUNK:
        # The frozen backbone's forward is the step's largest transient at long context: its MLPs in token chunks.
        out.append((f"frozen MLPs in chunks of {MLP_CHUNK} tokens", [f"train.mlp_chunk_size={MLP_CHUNK}"]))
    for description, fields in cls.plan_options.items():
        out.append((description, [f"method.{k}={json.dumps(v)}" for k, v in fields.items()]))
    if len(out) > 1:
        out.append(("all together (" + " + ".join(d for d, _ in out) + ")", [o for _, ov in out for o in ov]))
    return out


def plan(model: str, vram: int, batch: int, seq: int, task: str = "causal_lm", methods: str = "all",
         target: str = "cuda", sets: list[str] = (), log=None, sharding: Sharding = ONE_PROCESS) -> list[dict[str, Any]]:
    """One entry per method: per-GPU peak at `batch` (per process), whether it fits, its largest batch, and the
    changes that make it fit."""
    log = log or (lambda line: print(line, flush=True))  # flushed: progress must show through a pipe too
    specs = resolve_rows(methods, model, task, batch, seq, list(sets), references=False)
    check_rows(specs)
    budget = usable(vram, target)  # what a step may fill: the budget less the CUDA headroom
    result = []
    for i, spec in enumerate(specs, 1):
        refused = sharding.refusal(_quantize(spec), _optimizer(spec))
        if refused:
            # The trainer would refuse this launch: no prediction, the reason instead.
            result.append({"label": spec.label, "method": spec.method, "refused": refused, "fits": False,
                           "peak_bytes": None, "largest_batch": 0, "changes": [], "how": f"refused: {refused}"})
            continue
        started = time.monotonic()
        log(f"sidetune: plan {i}/{len(specs)}: {spec.label} at batch {batch} x seq {seq}")
        base = _measure(spec, target, sharding=sharding)
        peak = base["peak_bytes"]
        log(f"sidetune: plan:   {spec.label} at batch {batch}: {peak / GiB:.2f} GiB")
        known: dict[int, int] = {}
        entry: dict[str, Any] = {"label": spec.label, "method": spec.method, "peak_bytes": peak,
                                 "fits": peak <= budget, "budget_bytes": budget, "target": target,
                                 "how": base["per_gpu_note"],
                                 "largest_batch": largest_batch(spec, target, budget, batch, peak, sharding=sharding,
                                                                known=known, log=log),
                                 "changes": []}
        # Batch 1's peak: what "does not fit even at batch 1" needs (the search predicted it when batch 1 failed).
        entry["peak_bytes_batch_1"] = known.get(1)
        # The longest sequence that fits at this batch (long context: where memory grows with tokens, not samples).
        entry["largest_seq"] = largest_seq(spec, target, budget, batch, seq, peak, sharding, log=log)
        entry["smallest_gpu"] = smallest_gpu(peak) if sharding.single and target == "cuda" else None
        # Most parameters trainable: the method trains the backbone itself (full fine-tuning).
        trains_backbone = base["params_trainable"] > base["params_total"] / 2
        entry["trains_backbone"] = trains_backbone
        if not entry["fits"]:
            for description, extra in changes(spec, task, trains_backbone, sharding):
                log(f"sidetune: plan:   {spec.label} with {description}")
                p = _peak(spec, target, extra, sharding=sharding)
                entry["changes"].append({"change": description, "overrides": extra, "peak_bytes": p,
                                         "fits": p <= budget})
        log(f"sidetune: plan:   {spec.label} done in {time.monotonic() - started:.0f} s")
        result.append(entry)
    return result


def _quantize(spec: RowSpec) -> str | None:
    from sidetune.config import load_config

    return load_config(None, spec.overrides).model.quantize


def _optimizer(spec: RowSpec) -> str:
    from sidetune.config import load_config

    return load_config(None, spec.overrides).train.optimizer


def render(entries: list[dict], vram: int, batch: int, seq: int, sharding: Sharding = ONE_PROCESS) -> str:
    scale, unit = (GiB, "GiB") if vram >= GiB else (MiB, "MiB")
    where = ("" if sharding.single else
             f" per GPU, {sharding.processes} processes with {sharding.kind}, batch {batch} per process")
    budget = next((e["budget_bytes"] for e in entries if e.get("budget_bytes") is not None), vram)
    usable_note = ("" if budget == vram else
                   f"; a step may fill {budget / scale:.2f} {unit} of it: {HEADROOM_BYTES / GiB:.0f} GiB for the CUDA "
                   f"context and {100 * HEADROOM_FRACTION:.0f}% for the allocator's fragmentation are kept free")
    gpu_column = sharding.single and any(e.get("target") == "cuda" for e in entries)
    lines = [f"Budget {vram / scale:.2f} {unit}{where}, batch {batch} x seq {seq} (predicted peaks){usable_note}:", "",
             f"| method | peak {unit} | fits | largest batch | longest seq at batch {batch} | changes that make it "
             f"fit: their peak {unit} |" + (" smallest GPU for this batch |" if gpu_column else ""),
             "|---|---|---|---|---|---|" + ("---|" if gpu_column else "")]
    for e in entries:
        fixes = [f"{c['change']}" + (f" `{' '.join(c['overrides'])}`" if not c["change"].startswith("all together") else "")
                 + f": {c['peak_bytes'] / scale:.2f}" for c in e["changes"] if c["fits"]]
        if e.get("refused"):
            lines.append(f"| {e['label']} | – | refused | – | – | {e['refused']}: sidetune train refuses this launch; "
                         f"plan it with `--shard ddp` |" + (" – |" if gpu_column else ""))
            continue
        at_one = e.get("peak_bytes_batch_1")
        needs = f" (needs {at_one / scale:.2f} {unit})" if at_one else ""
        if e["fits"]:
            advice = "–"
        elif fixes:
            advice = "; ".join(fixes)
        elif e["largest_batch"]:
            advice = f"nothing tried fits at this batch: batch {e['largest_batch']} does"
        else:
            advice = f"does not fit even at batch 1{needs}, nor with any change tried: more GPUs or memory"
            if sharding.refusal("nf4") and not e["trains_backbone"]:
                advice += ", or a 4-bit base with `--shard ddp` (FSDP2 cannot shard one)"
            if e["trains_backbone"]:
                advice += ", or a method that freezes the backbone"
        largest = str(e["largest_batch"]) if e["largest_batch"] else f"none: does not fit even at batch 1{needs}"
        gpu = ""
        if gpu_column:
            gpu = f" {e.get('smallest_gpu') or 'none: more than one ' + str(GPUS[-1][0]) + ' GiB GPU'} |"
        longest = e.get("largest_seq")
        longest = "–" if longest is None else (str(longest) if longest else "none")
        lines.append(f"| {e['label']} | {e['peak_bytes'] / scale:.2f} | {'yes' if e['fits'] else 'no'} | "
                     f"{largest} | {longest} | {advice} |{gpu}")
    if not sharding.single:
        lines += ["", "How the per-GPU peaks were derived (sidetune/profiling/shard.py):"]
        lines += [f"- {e['label']}: {e['how']}" for e in entries]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset (llama-8b, llama-70b, ...), alias or model directory")
    p.add_argument("--vram", required=True, help="memory budget, e.g. 8GiB or 24G")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--task", choices=["causal_lm", "classification"], default="causal_lm")
    p.add_argument("--objective", choices=["supervised", "dpo", "simpo"], default="supervised",
                   help="dpo / simpo: plan the preference step on --batch pairs (2 x batch rows)")
    p.add_argument("--methods", default="all", help="comma-separated METHODS keys and aliases ("
                   + ", ".join(ALIASES) + "), or all")
    p.add_argument("--target", choices=["cuda", "cpu"], default="cuda", help="the device to plan for")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="config override, as for `sidetune profile`")
    p.add_argument("--processes", type=int, default=1, help="plan for a run on N processes (GPUs): per-GPU peaks")
    p.add_argument("--shard", choices=["ddp", "fsdp"], default="ddp",
                   help="how N processes hold the model: ddp (replicated) or fsdp (fully sharded)")
    p.add_argument("--out", default=None, help="also write the plan as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.seq < 2:
        raise SidetuneError(f"--batch must be >= 1 and --seq >= 2, got {args.batch} and {args.seq}")
    vram = parse_bytes(args.vram)
    if args.out and Path(args.out).expanduser().is_dir():
        raise SidetuneError(f"--out {args.out!r} is a directory; --out names the JSON file to write")
    check_model(args.model)
    args.task, args.sets = objective_rows(args)
    sharding = Sharding(args.processes, args.shard)
    entries = plan(args.model, vram, args.batch, args.seq, args.task, args.methods, args.target, args.sets,
                   sharding=sharding)
    print(render(entries, vram, args.batch, args.seq, sharding))
    if args.out:
        Path(args.out).expanduser().write_text(json.dumps(entries, indent=1) + "\n")
    return 0
