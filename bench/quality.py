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
ALIASES = {"qlora": ("lora", "nf4"), "qlst": ("lst", "nf4")}


def runs(models: list[str], methods: str) -> list[tuple[str, str, list[str]]]:
    """(model, label, overrides) for every requested model and method."""
    from sidetune.methods import METHODS

    available = {**{m: (m, None) for m in METHODS}, **{a: v for a, v in ALIASES.items() if v[0] in METHODS}}
    labels = list(available) if methods == "all" else [m.strip() for m in methods.split(",")]
    out = []
    for model in models:
        for label in labels:
            if label not in available:
                raise SystemExit(f"bench/quality.py: unknown method {label!r}; choose from {', '.join(available)}")
            method, quantize = available[label]
            path, overrides = recipe(model, method)
            if quantize:
                overrides.append(f"model.quantize={quantize}")
            out.append((model, label, [str(path), *overrides]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,smollm2-135m")
    p.add_argument("--methods", default="all")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-samples", type=int, default=None, help="cut the dev set (default: all 872)")
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None, help="append the results table to this file (e.g. bench/RESULTS.md)")
    args = p.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or ROOT / "bench" / "out" / f"quality-{device}")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results = []
    for model, label, overrides in runs(args.models.split(","), args.methods):
        run_dir = out / f"{model}-{label}"
        cmd = [sys.executable, "-m", "sidetune", "train", *overrides,
               f"train.max_steps={args.steps}", f"train.output_dir={run_dir}", "train.eval_every=0",
               "train.progress=false", f"data.max_eval_samples={args.eval_samples or 'null'}"]
        print(f"bench: {model} {label}: {' '.join(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd[3:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        row = {"model": model, "method": label, "steps": args.steps, "wall_s": round(wall, 1),
               "overrides": overrides}
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
        else:
            lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            final = [x for x in lines if "eval_accuracy" in x][-1]
            train_rows = [x for x in lines if "loss" in x]
            peak = max((x.get("peak_allocated_gib") or x.get("peak_rss_gib") or 0) for x in train_rows)
            row.update(eval_accuracy=final["eval_accuracy"], eval_loss=final.get("eval_loss"),
                       final_train_loss=train_rows[-1]["loss"], peak_gib=peak,
                       peak_source="peak_allocated_gib" if device == "cuda" else "peak_rss_gib")
        print(f"bench:   {json.dumps(row)}", flush=True)
        results.append(row)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    lines = [f"# Quality bench, {stamp}", "",
             f"Command: `python bench/quality.py {' '.join(sys.argv[1:])}`; device: {device} ({name}, "
             f"{os.cpu_count()} CPU cores); torch {torch.__version__}. SST-2 dev accuracy after {args.steps} steps.",
             "", "| model | method | recipe + overrides | dev accuracy | eval loss | final train loss | peak GiB | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        how = " ".join(Path(o).name if o.endswith(".yaml") else o for o in r["overrides"])
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | {how} | error: {r['error']} | | | | {r['wall_s']} |")
        else:
            lines.append(f"| {r['model']} | {r['method']} | {how} | {r['eval_accuracy']:.3f} | {r['eval_loss']:.4f} | "
                         f"{r['final_train_loss']:.4f} | {r['peak_gib']:.2f} ({r['peak_source']}) | {r['wall_s']} |")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + "\n".join(["#" + lines[0], *lines[1:]]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
