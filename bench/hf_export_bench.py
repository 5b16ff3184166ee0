"""`sidetune export --hf` against `sidetune.load`, on one run: the logits on prompts the tests do not use, and the time
per generated token (greedy, batch 1, eos ignored, interleaved repetitions, medians) of transformers' `generate` on
the exported model against sidetune's own `generate` on the loaded run.

    OMP_NUM_THREADS=1 python bench/hf_export_bench.py                       # trains a short SmolLM2 LST chat run
    OMP_NUM_THREADS=1 python bench/hf_export_bench.py --run runs/my_run     # an existing run
    python bench/hf_export_bench.py --recipe recipes/smollm2_chat_lst.yaml model.name=tiny-llama --new-tokens 8

The exported model is loaded in this process (its modeling code comes from the exported directory through
trust_remote_code; the tests check the load in a Python without sidetune).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sidetune.config import load_config
from sidetune.hf_export import export_hf
from sidetune.rundir import load_run

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "Explain why the sky is blue in one sentence."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="an existing run directory (default: train a short one from --recipe)")
    p.add_argument("--recipe", default="recipes/smollm2_chat_lst.yaml")
    p.add_argument("--steps", type=int, default=4, help="training steps of the run trained here")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the recipe")
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="hf-export-bench-"))
    run = Path(args.run) if args.run else _train(args, work)
    out, line = export_hf(run, work / "hf", args.dtype)
    print(f"sidetune: {line}")

    from transformers import AutoModelForCausalLM

    ref, tok = load_run(run)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf.generation_config.eos_token_id = None  # a fixed number of tokens, as sidetune's eos_token_id=[]

    worst = 0.0
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt").input_ids
            worst = max(worst, (ref(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max().item())
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    n = args.new_tokens
    ours = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    theirs = ref.generate(ids, max_new_tokens=n, eos_token_id=[])
    same = ours[0].tolist() == theirs[0].tolist()

    times: dict[str, list[float]] = {"sidetune.load generate": [], "exported generate": []}
    for _ in range(args.reps):
        for name, fn in (("sidetune.load generate", lambda: ref.generate(ids, max_new_tokens=n, eos_token_id=[])),
                         ("exported generate", lambda: hf.generate(ids, attention_mask=torch.ones_like(ids),
                                                                    max_new_tokens=n, do_sample=False))):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / n * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; run {run}")
    print(f"max |logit difference| on {len(PROMPTS)} prompts: {worst:.3g}; greedy tokens equal: {same}")
    print(f"| generate, batch 1, greedy | ms / token (median of {args.reps}) |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    print(f"ratio exported / sidetune.load: {med['exported generate'] / med['sidetune.load generate']:.2f}x")


def _train(args, work: Path) -> Path:
    from sidetune.train import train

    cfg = load_config(args.recipe, [f"train.output_dir={work / 'run'}", f"train.max_steps={args.steps}",
                                    "train.eval_every=0", "train.warmup_steps=0", "train.batch_size=4",
                                    *args.overrides])
    train(cfg)
    return work / "run"


if __name__ == "__main__":
    main()
