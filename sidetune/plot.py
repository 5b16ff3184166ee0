"""`sidetune plot RUN [RUN ...] [--out PNG]`: training loss (solid) and eval loss (dashed, dots) against the step for
one or more runs, read from their metrics.jsonl, overlaid in one PNG; eval accuracy gets a second panel when a run
logged it. `plot_runs` is the function (the trainer can call it at the end of a run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sidetune.errors import SidetuneError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN/curves.png for one run, curves.png "
                                               "for several)")


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
    accuracy = any("eval_accuracy" in row for rows in series.values() for row in rows)
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(11 if accuracy else 7, 4.2), squeeze=False)
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
        acc = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
        if accuracy and acc:
            axes[0][1].plot(*zip(*acc), color=color, marker="o", label=label)
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title="loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=8)
    if accuracy:
        axes[0][1].set(xlabel="optimizer step", ylabel="eval accuracy", title="eval accuracy")
        axes[0][1].grid(alpha=0.3)
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    out = args.out or (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 else "curves.png")
    print(f"sidetune: curves written to {plot_runs(args.runs, out)}")
    return 0
