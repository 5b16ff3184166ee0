"""Quality bench: SST-2 dev accuracy of every method on real weights, through `sidetune train` itself.

    python bench/quality.py                                   # minilm and smollm2-135m, every method, 300 steps
    python bench/quality.py --models minilm --methods full,lora,qlora --steps 150   # what a CPU allows

Each run is `python -m sidetune train RECIPE ...` in its own process with the same budget (steps, batch 32 for
minilm, data, max_length) for every method. RECIPE is the method's own recipe for that model when the repo has one
(recipes/sst2_<method>.yaml for minilm, recipes/smollm2_<method>.yaml for smollm2-135m: its tuned lr and method
settings), else the model's LoRA recipe with `method.name=<method>` (the method's defaults, the LoRA recipe's lr);
the aliases qlora / qlst add model.quantize=nf4 to the lora / lst recipe. Dev accuracy is the final eval row of
metrics.jsonl (SST-2 GLUE dev, 872 sentences, unless --eval-samples cuts it; for smollm2-135m: picking the likelier
label completion). Results go to bench/out/quality-<device>/, and with --markdown a table is appended to that file
(bench/RESULTS.md) with the command, the device and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # model -> (recipe prefix, lr for full fine-tuning without a recipe of its own)
    "minilm": ("recipes/sst2_", 5e-5),
    "smollm2-135m": ("recipes/smollm2_", 2e-5),
}


def recipe(model: str, method: str) -> tuple[Path, list[str]]:
    """The recipe a method runs from on `model`, and the overrides that make it that method."""
    own = ROOT / f"{MODELS[model][0]}{method}.yaml"
    if own.is_file():
        return own, []
    extra = [f"method.name={method}"] + ([f"train.lr={MODELS[model][1]}"] if method == "full" else [])
    return ROOT / f"{MODELS[model][0]}lora.yaml", extra


# Labels that are a method plus overrides of its recipe: the 4-bit variants and LoRA's other inits / LoRA+.
VARIANTS = {
    "qlora": ("lora", ["model.quantize=nf4"]),
    "qlst": ("lst", ["model.quantize=nf4"]),
    "lora_ga": ("lora", ["method.init=lora_ga"]),
    "lora_a_zero": ("lora", ["method.init=a_zero"]),
    "loraplus": ("lora", ["method.loraplus_lr_ratio=16"]),
    "dora": ("lora", ["method.dora=true"]),
    "pissa": ("lora", ["method.init=pissa"]),
    "olora": ("lora", ["method.init=olora"]),
    "loftq": ("lora", ["model.quantize=nf4", "method.init=loftq"]),
}
# A recipe that names another model than the bench's (PET needs an LM head: the offline MiniLM has none, so
# sst2_pet.yaml runs SmolLM2) runs at its own budget, few-shot as written and zero-shot (no step), and its rows
# say which model they ran.
ZERO_SHOT = ["train.max_steps=0"]


def recipe_model(path: Path) -> str:
    import yaml

    return (yaml.safe_load(path.read_text()).get("model") or {}).get("name", "")


def runs(models: list[str], methods: str) -> list[dict]:
    """One dict per run: model, label (the table's), name (its run directory's), overrides (recipe first),
    own_budget (keep the recipe's steps and data)."""
    from sidetune.methods import METHODS

    available = {**{m: (m, []) for m in METHODS}, **{a: v for a, v in VARIANTS.items() if v[0] in METHODS}}
    labels = list(available) if methods == "all" else [m.strip() for m in methods.split(",")]
    out = []
    for model in models:
        for label in labels:
            if label not in available:
                raise SystemExit(f"bench/quality.py: unknown method {label!r}; choose from {', '.join(available)}")
            method, extra = available[label]
            path, overrides = recipe(model, method)
            ran_on = recipe_model(path)
            if ran_on and ran_on != model:
                out.append({"model": ran_on, "label": f"{label} (few-shot, recipe budget)", "name": label,
                            "overrides": [str(path), *overrides, *extra], "own_budget": True})
                out.append({"model": ran_on, "label": f"{label} (zero-shot)", "name": f"{label}-0shot",
                            "overrides": [str(path), *overrides, *extra, *ZERO_SHOT], "own_budget": True})
            else:
                out.append({"model": model, "label": label, "name": label,
                            "overrides": [str(path), *overrides, *extra], "own_budget": False})
    return out


def train_run(overrides: list[str], run_dir: Path, env: dict) -> dict:
    """`sidetune train OVERRIDES` into `run_dir`, in its own process, evaluated once at the end: wall_s, and error
    (its last stderr line) or rows (metrics.jsonl). A rerun of the bench replaces the run it made there before
    (train.overwrite: sidetune removes only files it wrote), so the same command measures again."""
    cmd = [sys.executable, "-m", "sidetune", "train", *overrides, f"train.output_dir={run_dir}",
           "train.overwrite=true", "train.eval_every=0", "train.progress=false"]
    print(f"bench: {' '.join(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd[3:])}",
          flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    row: dict = {"wall_s": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
    else:
        row["rows"] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return row


def run_one(run: dict, args, out: Path, env: dict, device: str) -> dict:
    """One row of the table: its run, and what it measured."""
    budget = [] if run["own_budget"] else [f"train.max_steps={args.steps}",
                                           f"data.max_eval_samples={args.eval_samples or 'null'}"]
    result = train_run([*run["overrides"], *budget], out / f"{run['model']}-{run['name']}", env)
    lines = result.pop("rows", None)
    row = {"model": run["model"], "method": run["label"], **result, "overrides": run["overrides"]}
    if lines is not None:
        final = [x for x in lines if "eval_accuracy" in x][-1]
        train_rows = [x for x in lines if "loss" in x]
        peak = max((x.get("peak_allocated_gib") or x.get("peak_rss_gib") or 0 for x in train_rows), default=None)
        row.update(steps=final["step"], eval_accuracy=final["eval_accuracy"], eval_loss=final.get("eval_loss"),
                   eval_rows=final.get("eval_examples"), final_train_loss=train_rows[-1]["loss"] if train_rows else None,
                   peak_gib=peak, peak_source="peak_allocated_gib" if device == "cuda" else "peak_rss_gib")
    print(f"bench:   {run['model']} {run['label']}: {json.dumps(row)}", flush=True)
    return row


# (a, b, what the notes claim): the differences the table is read for, with the standard error of a
# difference of two accuracies on the same dev set, sqrt(2 p (1 - p) / n).
COMPARE = [("lora_ga", "lora", "LoRA-GA >= standard init"), ("lora", "lora_a_zero", "standard init >= a_zero"),
           ("ptuning_v2", "full", "P-tuning v2 >= full - 0.03"), ("lst", "lora", "LST >= LoRA - 0.03"),
           ("qlst", "qlora", "Q-LST >= QLoRA - 0.03"), ("loraplus", "lora", "LoRA+ vs LoRA"),
           # The papers' claims, on their own tasks: DoRA above LoRA (about +1-4 points on commonsense reasoning,
           # LLaMA), PiSSA above LoRA (faster convergence, higher GSM8K/MATH), OLoRA converging faster than LoRA.
           ("dora", "lora", "DoRA >= LoRA"), ("pissa", "lora", "PiSSA >= LoRA"), ("olora", "lora", "OLoRA >= LoRA"),
           # LoftQ: at 4 bits about QLoRA's level, far above it at 2-3 bits (where QLoRA can fail to train).
           ("loftq", "qlora", "LoftQ >= QLoRA")]


def comparisons(results: list[dict]) -> list[str]:
    acc = {(r["model"], r["method"]): r for r in results if "eval_accuracy" in r}
    lines = []
    for a, b, claim in COMPARE:
        for model in dict.fromkeys(r["model"] for r in results):
            ra, rb = acc.get((model, a)), acc.get((model, b))
            if ra is None or rb is None:
                continue
            p, n = (ra["eval_accuracy"] + rb["eval_accuracy"]) / 2, ra.get("eval_rows") or 0
            se = f", standard error of the difference {(2 * p * (1 - p) / n) ** 0.5:.3f}" if n else ""
            lines.append(f"- {model}: {a} {ra['eval_accuracy']:.3f} - {b} {rb['eval_accuracy']:.3f} = "
                         f"{ra['eval_accuracy'] - rb['eval_accuracy']:+.3f} ({claim}{se})")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,smollm2-135m")
    p.add_argument("--methods", default="all")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-samples", type=int, default=None, help="cut the dev set (default: all 872)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once; on CPU each gets cores / jobs threads (2 one-thread runs beat 1 two-thread run)")
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None, help="append the results table to this file (e.g. bench/RESULTS.md)")
    args = p.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or ROOT / "bench" / "out" / f"quality-{device}")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if device == "cpu" and args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))  # no oversubscription
    todo = runs(args.models.split(","), args.methods)
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda run: run_one(run, args, out, env, device), todo))
    total = time.perf_counter() - began

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    lines = [f"# Quality bench, {stamp}", "",
             f"Command: `python bench/quality.py {' '.join(sys.argv[1:])}`; device: {device} ({name}, "
             f"{os.cpu_count()} CPU cores, {args.jobs} run(s) at once, OMP_NUM_THREADS="
             f"{env.get('OMP_NUM_THREADS', 'unset')}); torch {torch.__version__}; {total / 60:.0f} min in all. "
             f"SST-2 dev accuracy after {args.steps} steps (rows marked \"recipe budget\" keep their recipe's steps "
             f"and data), batch and data as each recipe says; one seed (the recipes' 42).",
             "", "| model | method | recipe + overrides | steps | dev accuracy | eval loss | final train loss | peak GiB "
             "| wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        how = " ".join(Path(o).name if o.endswith(".yaml") else o for o in r["overrides"])
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | {how} | | error: {r['error']} | | | | {r['wall_s']} |")
        else:
            train_loss = "" if r["final_train_loss"] is None else f"{r['final_train_loss']:.4f}"
            peak = "no train step" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} ({r['peak_source']})"
            lines.append(f"| {r['model']} | {r['method']} | {how} | {r['steps']} | {r['eval_accuracy']:.3f} | "
                         f"{r['eval_loss']:.4f} | {train_loss} | {peak} | "
                         f"{r['wall_s']} |")
    compared = comparisons(results)
    if compared:
        lines += ["", "Differences the table is read for:", "", *compared]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + "\n".join(["#" + lines[0], *lines[1:]]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
