"""Quality bench: SST-2 dev accuracy of every method on real weights, through `sidetune train` itself.

    python bench/quality.py                                   # minilm and smollm2-135m, every method, 300 steps
    python bench/quality.py --models minilm --methods full,lora,qlora --steps 150   # what a CPU allows

Each run is `python -m sidetune train RECIPE method.name=M ...` in its own process, starting from the recipe of
that model (recipes/sst2_lora.yaml for minilm: classification; recipes/smollm2_lora.yaml for smollm2-135m: causal LM,
accuracy = picking the likelier label completion). lora keeps the recipe's method section; any other method starts
from its own defaults (switching method.name resets the section); the aliases qlora / qlst add model.quantize=nf4. Learning rates: full fine-tuning takes the
model's full-FT rate, every other method the recipe's. Dev accuracy is the final eval row of metrics.jsonl
(SST-2 GLUE dev, 872 sentences, unless --eval-samples cuts it). Results go to bench/out/quality-<device>/.
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

MODELS = {  # model -> (recipe, lr for full fine-tuning)
    "minilm": ("recipes/sst2_lora.yaml", 5e-5),
    "smollm2-135m": ("recipes/smollm2_lora.yaml", 2e-5),
}
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
            overrides = [f"method.name={method}"]
            if method == "full":
                overrides.append(f"train.lr={MODELS[model][1]}")
            if quantize:
                overrides.append(f"model.quantize={quantize}")
            out.append((model, label, overrides))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,smollm2-135m")
    p.add_argument("--methods", default="all")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-samples", type=int, default=None, help="cut the dev set (default: all 872)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or ROOT / "bench" / "out" / f"quality-{device}")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results = []
    for model, label, overrides in runs(args.models.split(","), args.methods):
        run_dir = out / f"{model}-{label}"
        cmd = [sys.executable, "-m", "sidetune", "train", str(ROOT / MODELS[model][0]), *overrides,
               f"train.max_steps={args.steps}", f"train.output_dir={run_dir}", "train.eval_every=0",
               "train.progress=false", f"data.max_eval_samples={args.eval_samples or 'null'}"]
        print(f"bench: {model} {label}: {' '.join(cmd[3:])}", flush=True)
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
             "", "| model | method | dev accuracy | eval loss | final train loss | peak GiB | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | error: {r['error']} | | | | {r['wall_s']} |")
        else:
            lines.append(f"| {r['model']} | {r['method']} | {r['eval_accuracy']:.3f} | {r['eval_loss']:.4f} | "
                         f"{r['final_train_loss']:.4f} | {r['peak_gib']:.2f} ({r['peak_source']}) | {r['wall_s']} |")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
