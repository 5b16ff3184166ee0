"""Decoder quality at the same budget (issue 11, item 4): LoRA, QLoRA, LST and Q-LST (the old settings and the new
lean defaults) on SmolLM2-135M, SST-2 as causal LM, with the same steps, batch, data and eval; each through
`sidetune train` in its own process, one run at a time.

    python bench/lst_quality.py                                       # every row, 100 steps, 200 dev sentences
    python bench/lst_quality.py --runs lst-old,lst-new --steps 60     # what a loaded CPU allows
    python bench/lst_quality.py --runs lora,lst-new --steps 80 --seeds 1,2,3 --same-time   # issue 25's table

Rows: lora / qlora = recipes/smollm2_lora.yaml (q,v r=8, lr 5e-4; qlora adds nf4); lst-* / qlst-* =
recipes/smollm2_lst.yaml (r=8, every:2, pruned init, lr 2e-3; qlst adds nf4). "old" = no side recomputation, full
ladder inputs, fp32 AdamW (the settings before issue 11); "new" = the lean defaults, which both LST recipes now
carry (recipes/smollm2_lst.yaml, recipes/llama8b_qlst.yaml): side-only recomputation (exact), int8 ladder inputs for
dW, 8-bit AdamW. Both sets are passed as overrides, so the rows stay what they say if a recipe changes. Label
accuracy = picking the likelier label completion on the first --eval-samples dev sentences; eval loss on the
completion. Appends a section to bench/RESULTS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from quality import train_run  # noqa: E402  (the one way a bench runs `sidetune train`)

OLD = ["method.gradient_checkpointing=false", "method.ladder_grad_input=full", "train.optimizer=adamw"]
NEW = ["method.gradient_checkpointing=true", "method.ladder_grad_input=int8", "train.optimizer=adamw_8bit"]
NF4 = ["model.quantize=nf4"]
RUNS = {  # label -> (recipe, overrides)
    "lora": ("recipes/smollm2_lora.yaml", []),
    "qlora": ("recipes/smollm2_lora.yaml", NF4),
    "lst-old": ("recipes/smollm2_lst.yaml", OLD),
    "lst-new": ("recipes/smollm2_lst.yaml", NEW),
    "qlst-old": ("recipes/smollm2_lst.yaml", OLD + NF4),
    "qlst-new": ("recipes/smollm2_lst.yaml", NEW + NF4),
}


def speed(lines: list[dict]) -> float | None:
    """Median training tokens per second over the log rows after the first (warm-up)."""
    tps = sorted(x["tokens_per_s"] for x in lines if "tokens_per_s" in x)[1:]
    return tps[len(tps) // 2] if tps else None


def one(label: str, recipe: str, overrides: list[str], steps: int, seed: int, args, out: Path, env: dict) -> dict:
    model = [f"model.name={args.model}"] if args.model else []
    result = train_run([str(ROOT / recipe), *overrides, *model, f"train.max_steps={steps}", f"train.seed={seed}",
                        f"train.batch_size={args.batch}", f"data.max_eval_samples={args.eval_samples}"],
                       out / f"{label}-s{seed}-{steps}", env)
    lines = result.pop("rows", None)
    row = {"run": label, "seed": seed, "steps": steps, **result}
    if lines is not None:
        final = [x for x in lines if "eval_accuracy" in x][-1]
        train = [x for x in lines if "loss" in x]
        row.update(accuracy=final["eval_accuracy"], eval_loss=final.get("eval_loss"), train_loss=train[-1]["loss"],
                   tokens_per_s=speed(lines))
    print(f"bench:   {json.dumps(row)}", flush=True)
    return row


def mean_se(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) / math.sqrt(len(xs)):.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--seeds", default="42", help="comma-separated train.seed values; the table gives mean ± s.e.")
    p.add_argument("--model", help="model.name for every run (default: the recipes' smollm2-135m)")
    p.add_argument("--same-time", action="store_true",
                   help="also train every run for the steps it fits in the time LoRA's run trains (qlst: QLoRA's), "
                        "from the median tokens/s of the two at the same steps")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "lst-quality"))
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    labels, seeds = args.runs.split(","), [int(x) for x in args.seeds.split(",")]
    rows = [one(label, *RUNS[label], args.steps, seed, args, out, env) for seed in seeds for label in labels]
    timed = []
    if args.same_time:
        for seed in seeds:
            by = {r["run"]: r for r in rows if r["seed"] == seed and r.get("tokens_per_s")}
            for label in labels:
                ref = "qlora" if label.startswith("q") else "lora"
                if label == ref or label not in by or ref not in by:
                    continue
                steps = int(args.steps * by[label]["tokens_per_s"] / by[ref]["tokens_per_s"])
                timed.append(one(label, *RUNS[label], steps, seed, args, out, env))

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.processor() or ''}"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"### `bench/lst_quality.py`: decoder quality at the same budget ({stamp})", "",
          f"`python bench/lst_quality.py {' '.join(sys.argv[1:])}`; {device}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}. {args.model or 'smollm2-135m'}, SST-2 prompts, batch "
          f"{args.batch}, label accuracy and eval loss on the first {args.eval_samples} dev sentences; seeds "
          f"{args.seeds} (mean ± standard error over seeds). Same time: the steps a run fits in the training time "
          f"of LoRA's (Q-runs: QLoRA's) run at {args.steps} steps, from the median tokens/s of the two.", "",
          f"| run | label accuracy, {args.steps} steps | eval loss | tokens/s vs LoRA | same-time steps | "
          f"label accuracy, same time | eval loss, same time | errors |", "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        mine = [r for r in rows if r["run"] == label and "accuracy" in r]
        ref = "qlora" if label.startswith("q") else "lora"
        ratio = [r["tokens_per_s"] / q["tokens_per_s"] for r in mine for q in rows
                 if q["run"] == ref and q["seed"] == r["seed"] and q.get("tokens_per_s") and r.get("tokens_per_s")]
        same = [r for r in timed if r["run"] == label and "accuracy" in r]
        errors = [r["error"] for r in [*rows, *timed] if r["run"] == label and "error" in r]
        md.append(f"| {label} | {mean_se([r['accuracy'] for r in mine])} | {mean_se([r['eval_loss'] for r in mine])} "
                  f"| {mean_se(ratio) if label != ref else '1'} | {', '.join(str(r['steps']) for r in same) or '-'} "
                  f"| {mean_se([r['accuracy'] for r in same])} | {mean_se([r['eval_loss'] for r in same])} "
                  f"| {'; '.join(errors)[:200]} |")
    (out / "results.json").write_text(json.dumps([*rows, *timed], indent=1) + "\n")
    print("\n".join(md))
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
