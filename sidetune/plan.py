"""`sidetune plan`: which methods fit a memory budget, the largest batch each can take, and what to change.

Every number is a prediction from `sidetune profile`'s accounting on fake tensors (the live storages of one
steady-state training step; nothing is allocated), so a 70B plan runs on a laptop. For each method (and the aliases
qlora / qlst) the planner predicts the peak at the requested batch; fits a line to the peaks at two batch sizes (at a
fixed sequence length the step's memory is affine in the batch) to find the largest batch that fits, and checks that
batch with one more prediction; and, for a method that does not fit, tries the changes that cut memory:

- quantize the frozen base to 4-bit (model.quantize=nf4),
- the chunked LM loss (train.loss_chunk_size), which never holds the B x T x V logits,
- gradient checkpointing (train.gradient_checkpointing), for methods that backpropagate through the backbone,
- a method's own options: a method class may declare `plan_options: dict[str, dict]`, a description mapped to
  method-config overrides (e.g. LST: {"a side layer on every 2nd layer": {...}}),
- all of these together.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sidetune.errors import SidetuneError
from sidetune.profile import ALIASES, GiB, RowSpec, check_model, measure, parse_bytes, resolve_rows

CHUNK = 1024  # loss chunk the planner proposes: 1024 positions of logits at a time


def _peak(spec: RowSpec, target: str, extra: list[str] = (), batch: int | None = None) -> int:
    from sidetune.config import load_config

    overrides = [*spec.overrides, *extra, *([f"train.batch_size={batch}"] if batch else [])]
    return measure(load_config(None, overrides), spec.method is not None, target, fake=True)["peak_bytes"]


def largest_batch(spec: RowSpec, target: str, vram: int, batch: int, peak_at_batch: int,
                  extra: list[str] = ()) -> int:
    """The largest batch whose predicted peak fits `vram` (0 if not even batch 1 fits)."""
    other = batch * 2 if batch == 1 or peak_at_batch <= vram else max(1, batch // 2)
    p_other = _peak(spec, target, extra, other)
    slope = (peak_at_batch - p_other) / (batch - other)
    if slope <= 0:
        return batch if peak_at_batch <= vram else 0
    guess = int((vram - (peak_at_batch - slope * batch)) // slope)
    known = {batch: peak_at_batch, other: p_other}
    # Walk from the affine guess to the exact boundary with a few more predictions (allocator rounding, chunking).
    for _ in range(6):
        if guess < 1:
            return 0 if known.get(1, _peak(spec, target, extra, 1)) > vram else 1
        p = known.get(guess) or _peak(spec, target, extra, guess)
        known[guess] = p
        if p <= vram:
            q = known.get(guess + 1) or _peak(spec, target, extra, guess + 1)
            known[guess + 1] = q
            if q > vram:
                return guess
            guess += max(1, int((vram - q) // slope))
        else:
            guess -= max(1, int((p - vram) // slope))
    return max((b for b, p in known.items() if p <= vram), default=0)


def changes(spec: RowSpec, task: str) -> list[tuple[str, list[str]]]:
    """The memory-cutting changes that apply to a row: (description, config overrides)."""
    from sidetune.config import load_config
    from sidetune.methods import METHODS

    cfg = load_config(None, spec.overrides)
    cls = METHODS[spec.method]
    out = []
    if cfg.model.quantize is None:
        out.append(("quantize the base to 4-bit (model.quantize=nf4)", ["model.quantize=nf4"]))
    if task == "causal_lm" and not cfg.train.loss_chunk_size:
        out.append((f"chunked LM loss (train.loss_chunk_size={CHUNK})", [f"train.loss_chunk_size={CHUNK}"]))
    if getattr(cls, "backbone_trains", True) and not cfg.train.gradient_checkpointing:
        out.append(("gradient checkpointing (train.gradient_checkpointing=true)", ["train.gradient_checkpointing=true"]))
    for description, fields in getattr(cls, "plan_options", {}).items():
        out.append((description, [f"method.{k}={json.dumps(v)}" for k, v in fields.items()]))
    if len(out) > 1:
        out.append(("all of the above", [o for _, overrides in out for o in overrides]))
    return out


def plan(model: str, vram: int, batch: int, seq: int, task: str = "causal_lm", methods: str = "all",
         target: str = "cuda", sets: list[str] = (), log=print) -> list[dict[str, Any]]:
    """One entry per method: peak at `batch`, whether it fits, its largest batch, and the changes that make it fit."""
    specs = [s for s in resolve_rows(methods, model, task, batch, seq, list(sets)) if s.method is not None]
    result = []
    for spec in specs:
        log(f"sidetune: plan: {spec.label}")
        peak = _peak(spec, target)
        entry: dict[str, Any] = {"label": spec.label, "method": spec.method, "peak_bytes": peak, "fits": peak <= vram,
                                 "largest_batch": largest_batch(spec, target, vram, batch, peak), "changes": []}
        if not entry["fits"]:
            for description, extra in changes(spec, task):
                p = _peak(spec, target, extra)
                fix = {"change": description, "overrides": extra, "peak_bytes": p, "fits": p <= vram}
                if p <= vram:
                    fix["largest_batch"] = largest_batch(spec, target, vram, batch, p, extra)
                entry["changes"].append(fix)
        result.append(entry)
    return result


def render(entries: list[dict], vram: int, batch: int, seq: int) -> str:
    lines = [f"Budget {vram / GiB:.2f} GiB, batch {batch} x seq {seq} (predicted peaks):", "",
             "| method | peak GiB | fits | largest batch | what makes it fit (peak GiB, largest batch) |",
             "|---|---|---|---|---|"]
    for e in entries:
        fixes = [f"{c['change']} ({c['peak_bytes'] / GiB:.2f}, {c['largest_batch']})" for c in e["changes"]
                 if c["fits"]]
        advice = "–" if e["fits"] else ("; ".join(fixes) if fixes else "nothing tried fits: a smaller batch or seq")
        lines.append(f"| {e['label']} | {e['peak_bytes'] / GiB:.2f} | {'yes' if e['fits'] else 'no'} | "
                     f"{e['largest_batch']} | {advice} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset (llama-8b, llama-70b, ...), alias or model directory")
    p.add_argument("--vram", required=True, help="memory budget, e.g. 8GiB or 24G")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--task", choices=["causal_lm", "classification"], default="causal_lm")
    p.add_argument("--methods", default="all", help="comma-separated METHODS keys and aliases ("
                   + ", ".join(ALIASES) + "), or all")
    p.add_argument("--target", choices=["cuda", "cpu"], default="cuda", help="the device to plan for")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="config override, as for `sidetune profile`")
    p.add_argument("--out", default=None, help="also write the plan as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.seq < 2:
        raise SidetuneError(f"--batch must be >= 1 and --seq >= 2, got {args.batch} and {args.seq}")
    vram = parse_bytes(args.vram)
    check_model(args.model)
    entries = plan(args.model, vram, args.batch, args.seq, args.task, args.methods, args.target, args.sets)
    print(render(entries, vram, args.batch, args.seq))
    if args.out:
        Path(args.out).write_text(json.dumps(entries, indent=1) + "\n")
    return 0
