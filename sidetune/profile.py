"""`sidetune profile`: where each method's training memory goes, measured and predicted, as JSON, Markdown and PNG.

Every row is one training step of one method through sidetune's own build-and-step path (`session.build`,
`session.train_step`) on a random token batch that pads nothing and labels every token. Two reference rows come with
every profile: `floor`, a no-grad forward of the same batch on the same base (`floor-nf4` too when a 4-bit row is
present), and `full` fine-tuning. `--recipe` profiles a run config as it is (its method, train and data settings).

The work is split by job in `sidetune.profiling`: rows (`Row` documents every field of profile.json), measure,
report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sidetune.errors import SidetuneError
from sidetune.profiling.measure import measure, profile_row, run_isolated
from sidetune.profiling.report import markdown_table, write_reports
from sidetune.profiling.rows import ALIASES, GiB, MiB, RowSpec, recipe_rows, resolve_rows
from sidetune.profiling.shard import Sharding, per_gpu_peak

__all__ = ["ALIASES", "GiB", "MiB", "RowSpec", "measure", "profile_row", "resolve_rows"]


# ---------------------------------------------------------------------------------------------------------------------
# The command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="preset (tiny-llama, llama-1b, llama-8b, llama-70b, ...), alias or "
                                                  "local model directory (required unless --recipe names one)")
    p.add_argument("--recipe", default=None, help="profile this run config YAML as it is: its method, train and "
                                                  "data settings, and its floor (--model, --batch, --seq override)")
    p.add_argument("--methods", default=None, help="comma-separated METHODS keys and aliases (qlora, qlst), or all "
                                                   "(default; with --recipe: none); without --recipe the floor and "
                                                   "full fine-tuning are always added")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8, or the recipe's)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 512, or the recipe's max_length)")
    p.add_argument("--task", choices=["causal_lm", "classification"], default="causal_lm")
    p.add_argument("--objective", choices=["supervised", "dpo", "simpo"], default="supervised",
                   help="dpo / simpo: the preference step on --batch pairs (2 x batch rows of --seq tokens, one "
                        "forward) with each method's own reference (data.task=preference)")
    p.add_argument("--device", choices=["cuda", "cpu", "meta"], default=None,
                   help="where the steps run; meta predicts only, allocating nothing (default: cuda if available)")
    p.add_argument("--target", choices=["cuda", "cpu"], default=None,
                   help="the device a --device meta prediction is for (default cuda: bf16 weights and autocast)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row after the tracked one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="config override for every row (train.loss_chunk_size=1024, model.dtype=bfloat16) or for one "
                        "method or alias (lora.r=16, qlora.targets=[all-linear], qlora.train.gradient_checkpointing=true); "
                        "repeatable")
    p.add_argument("--vram", default=None, help="memory budget the reading judges against, e.g. 24GiB (default on "
                                                "CUDA: the GPU's memory)")
    p.add_argument("--processes", type=int, default=1, help="predict the per-GPU peak of a run on N processes")
    p.add_argument("--shard", choices=["ddp", "fsdp"], default="ddp",
                   help="how N processes hold the model: ddp (replicated) or fsdp (fully sharded)")
    p.add_argument("--out", required=True, help="directory for profile.json, profile.md, profile.png")


def parse_bytes(text: str) -> int:
    """'8GiB', '8G', '7.5 GB', '512MiB', '1e9' -> bytes (G/GB/GiB all mean 2**30: GPUs are sold in GiB)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
    size = int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")) if m else 0
    if size <= 0:
        raise SidetuneError(f"memory size {text!r} is not understood; write a positive size like 8GiB, 24G or 512MiB")
    return size


def objective_rows(args: argparse.Namespace) -> tuple[str, list[str]]:
    """--objective dpo / simpo: the rows' task and overrides (data.task=preference, train.objective)."""
    if args.objective == "supervised":
        return args.task, list(args.sets)
    if args.task != "causal_lm":
        raise SidetuneError(f"--objective {args.objective} trains a causal LM on preference pairs; drop --task "
                            f"{args.task}")
    return "preference", [*args.sets, f"train.objective={args.objective}"]


def check_model(name: str) -> None:
    from sidetune.models import PRESETS, resolve_path

    if name not in PRESETS:
        resolve_path(name)  # raises the one-line error for a missing directory or an alias's missing package


def check_rows(specs: list[RowSpec], flags: bool = True) -> None:
    """The model against the task and the sequence length (sidetune.checks), once for all rows (they share model,
    task and seq): one line instead of the same error in every row. flags: the rows come from --task / --seq, so
    the line names those rather than the config keys they set."""
    from sidetune.checks import check_run
    from sidetune.config import load_config

    if not specs:
        return
    try:
        check_run(load_config(None, specs[-1].overrides), "meta", precision=False)
    except SidetuneError as e:
        if not flags:
            raise
        raise SidetuneError(str(e).replace("data.max_length=", "--seq ").replace("data.max_length", "--seq")
                            .replace("data.task=", "--task ")) from None


def run(args: argparse.Namespace) -> int:
    import torch

    from sidetune.config import load_config

    if (args.batch is not None and args.batch < 1) or (args.seq is not None and args.seq < 2):
        raise SidetuneError(f"--batch must be >= 1 and --seq >= 2, got {args.batch} and {args.seq}")
    if args.recipe is None and args.model is None:
        raise SidetuneError("sidetune profile needs --model (or --recipe RUN_CONFIG.yaml)")
    if args.steps < 0:
        raise SidetuneError(f"--steps must be >= 0, got {args.steps}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise SidetuneError(f"--out {args.out!r} is a file; --out names a directory for profile.json, profile.md and "
                            f"profile.png")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SidetuneError("--device cuda but torch sees no CUDA GPU; use --device cpu, or --device meta to predict")
    if args.target and device != "meta" and args.target != device:
        raise SidetuneError(f"--target {args.target} applies to --device meta only (a {device} run profiles {device})")
    target = args.target or (device if device != "meta" else "cuda")
    args.task, args.sets = objective_rows(args)
    vram = parse_bytes(args.vram) if args.vram else None
    if vram is None and device == "cuda":
        vram = torch.cuda.get_device_properties(0).total_memory  # judge against the GPU it runs on
    if args.recipe is not None:
        specs = recipe_rows(args.recipe, args.model, args.batch, args.seq, args.methods, args.sets)
        check_model(load_config(None, specs[0].overrides).model.name)
    else:
        check_model(args.model)
        specs = resolve_rows(args.methods or "all", args.model, args.task, args.batch or 8, args.seq or 512,
                             args.sets)
        if (args.methods or "all") == "all":
            from sidetune.methods import METHODS

            others = [m for m, cls in METHODS.items() if args.task not in cls.tasks]
            if others:
                print(f"sidetune: profile: {', '.join(others)} do(es) not train {args.task}; "
                      f"see --task {' / '.join(sorted(set().union(*(METHODS[m].tasks for m in others))))}")
    check_rows(specs, flags=args.recipe is None)
    sharding = Sharding(args.processes, args.shard)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SidetuneError(f"--out {args.out!r}: cannot create that directory ({e.strerror})") from None
    rows = []
    for i, spec in enumerate(specs, 1):
        print(f"sidetune: profile {i}/{len(specs)}: {spec.label}", flush=True)
        # A prediction allocates nothing, so meta rows share this process; real rows each get their own.
        rows.append(profile_row(spec, device, target, args.steps) if device == "meta"
                    else run_isolated(spec, device, target, args.steps))
        if rows[-1].get("error"):
            print(f"sidetune:   {spec.label}: {rows[-1]['error']}", flush=True)
        elif refused := sharding.refusal(load_config(None, spec.overrides).model.quantize):
            rows[-1].update(processes=sharding.processes, shard=sharding.kind, per_gpu_note=f"refused: {refused}")
            print(f"sidetune:   {spec.label}: {refused}; sidetune train refuses this launch (plan it with --shard "
                  f"ddp)", flush=True)
        elif not sharding.single and rows[-1].get("predicted_peak_bytes"):
            r = rows[-1]
            step = {"peak_bytes": r["predicted_peak_bytes"], "peak_phase": r["predicted_peak_phase"],
                    **{k: r[k] for k in ("weights_bytes", "grads_bytes", "optimizer_bytes", "block_bytes")}}
            r["per_gpu_peak_bytes"], r["per_gpu_note"] = per_gpu_peak(step, sharding)
            r.update(processes=sharding.processes, shard=sharding.kind)
            print(f"sidetune:   {spec.label}: {r['per_gpu_peak_bytes'] / GiB:.2f} GiB per GPU ({r['per_gpu_note']})",
                  flush=True)
    write_reports(rows, out, vram)
    print(markdown_table(rows))
    print(f"sidetune: wrote {out / 'profile.json'}, {out / 'profile.md'}, {out / 'profile.png'}")
    return 0
