"""Decoder quality at the same budget (issue 11, item 4): LoRA, QLoRA, LST and Q-LST (the old settings and the new
lean defaults) on SmolLM2-135M, SST-2 as causal LM, with the same steps, batch, data and eval; each through
`sidetune train` in its own process, one run at a time.

    python bench/lst_quality.py                                       # every row, 100 steps, 200 dev sentences
    python bench/lst_quality.py --runs lst-old,lst-new --steps 60     # what a loaded CPU allows

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
import os
import platform
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "lst-quality"))
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rows = []
    for label in args.runs.split(","):
        recipe, overrides = RUNS[label]
        result = train_run([str(ROOT / recipe), *overrides, f"train.max_steps={args.steps}",
                            f"train.batch_size={args.batch}", f"data.max_eval_samples={args.eval_samples}"],
                           out / label, env)
        lines = result.pop("rows", None)
        row = {"run": label, "steps": args.steps, **result}
        if lines is not None:
            final = [x for x in lines if "eval_accuracy" in x][-1]
            train = [x for x in lines if "loss" in x]
            row.update(accuracy=final["eval_accuracy"], eval_loss=final.get("eval_loss"), train_loss=train[-1]["loss"])
        print(f"bench:   {json.dumps(row)}", flush=True)
        rows.append(row)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.processor() or ''}"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"### `bench/lst_quality.py`: decoder quality at the same budget ({stamp})", "",
          f"`python bench/lst_quality.py {' '.join(sys.argv[1:])}`; {device}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}. SmolLM2-135M, SST-2 prompts, {args.steps} steps, batch "
          f"{args.batch}, label accuracy and eval loss on the first {args.eval_samples} dev sentences, one seed.", "",
          "| run | label accuracy | eval loss | final train loss | wall s |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['run']} | error: {r['error']} | | | {r['wall_s']} |")
        else:
            md.append(f"| {r['run']} | {r['accuracy']:.3f} | {r['eval_loss']:.4f} | {r['train_loss']:.4f} | "
                      f"{r['wall_s']} |")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(md))
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
