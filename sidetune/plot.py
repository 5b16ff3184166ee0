"""`sidetune plot RUN [RUN ...] [--out PNG]`: training loss (solid) and eval loss (dashed, dots) against the step for
one or more runs, read from their metrics.jsonl, overlaid in one PNG; eval scores (accuracy, and the exact match /
token F1 of data.eval_generate) get a second panel when a run logged them. `plot_runs` is the function; the trainer
calls it at the end of every run to write RUN/curves.png.

Without --out the PNG is RUN/curves.png for one run and ./curves.png for several, and it never replaces a file
sidetune did not write: an existing RUN/curves.png is replaced only when the run's manifest lists it (the trainer
wrote it), an existing ./curves.png never; otherwise the command refuses in one line and asks for --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sidetune.errors import SidetuneError

CURVES = "curves.png"  # the PNG's name in a run directory
# Eval scores in [0, 1] that share the second panel: metrics.jsonl key -> (line style, marker).
SCORES = {"eval_accuracy": ("-", "o"), "eval_exact_match": ("--", "s"), "eval_token_f1": (":", "^")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", default=None, help=f"the PNG to write (default: RUN/{CURVES} for one run, {CURVES} for "
                                               f"several; an existing file there that sidetune did not write is "
                                               f"refused, never replaced)")


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise SidetuneError(f"{str(run)!r} has no metrics.jsonl; pass a sidetune run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """Write the loss / eval curves of `runs` to `out` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    series = {str(r): read_metrics(r) for r in runs}
    scores = [k for k in SCORES if any(k in row for rows in series.values() for row in rows)]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(11 if scores else 7, 4.2), squeeze=False)
    loss_ax = axes[0][0]
    for i, (name, rows) in enumerate(series.items()):
        color = f"C{i % 10}"
        label = Path(name).name or name
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if train:
            loss_ax.plot(*zip(*train), color=color, label=f"{label} train")
        if evals:
            loss_ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", label=f"{label} eval")
        for key in scores:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                style, marker = SCORES[key]
                axes[0][1].plot(*zip(*points), color=color, linestyle=style, marker=marker,
                                label=f"{label} {key.removeprefix('eval_')}")
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    if scores:
        axes[0][1].set(xlabel="optimizer step", ylabel="score", title="eval scores")
        axes[0][1].grid(alpha=0.3)
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside it, then renamed: a kill mid-write leaves the old picture (or none), never a truncated PNG.
    tmp = out.with_name(f".tmp-{out.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def default_out(runs: list[str]) -> Path:
    """Where `sidetune plot` writes without --out (see the module docstring); one line if that would replace a file
    sidetune did not write."""
    from sidetune import checkpoint

    if len(runs) == 1:
        out = Path(runs[0]) / CURVES
        if out.exists() and CURVES not in checkpoint.run_files(runs[0]):
            raise SidetuneError(f"{out} exists and sidetune did not write it (no {checkpoint.RUN_MANIFEST} in "
                                f"{runs[0]} lists it); pass --out PNG to write the curves elsewhere or to replace it")
        return out
    out = Path(CURVES)
    if out.exists():
        raise SidetuneError(f"{out.resolve()} exists; pass --out PNG to write the curves of several runs elsewhere "
                            f"or to replace it")
    return out


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else default_out(args.runs)
    print(f"sidetune: curves written to {plot_runs(args.runs, out)}")
    return 0
