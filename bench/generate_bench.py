"""Tokens/s of LST's (or P-tuning v2's) generate with its KV cache against transformers' generate on the base model,
in one run on one prompt: greedy, batch 1, a fixed number of new tokens (eos ignored).

Phases, interleaved for `--reps` repetitions (medians reported): the base model's own `generate`, the method's cached
`generate` (LST: transformers' cache for the backbone and one per side block; P-tuning v2: a cache that starts as
the prefix), and (once, as the reference of what the cache saves) the uncached `generate`, which reruns the whole
forward per token. Cached and uncached tokens must be equal, and for LST at step 0 (up = 0) equal to the base's
(a P-tuning v2 prefix changes the tokens from step 0): the script checks both.

    OMP_NUM_THREADS=1 python bench/generate_bench.py                      # smollm2-135m, 128 new tokens, CPU
    OMP_NUM_THREADS=1 python bench/generate_bench.py --method ptuning_v2
    python bench/generate_bench.py --model tiny-llama --new-tokens 16     # the code path, in seconds
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sidetune.config import ModelConfig
from sidetune.methods.base import Context
from sidetune.methods.lst import LST, LSTConfig
from sidetune.methods.ptuning_v2 import PTuningV2, PTuningV2Config
from sidetune.models import load_model, load_tokenizer

PROMPT = "Review: a gripping, beautifully shot film with a story that stays with you. Sentiment:"


def _timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side-layers", default="all", help="LST's method.side_layers (the recipe: all)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--method", choices=["lst", "ptuning_v2"], default="lst")
    p.add_argument("--virtual-tokens", type=int, default=20, help="P-tuning v2's method.num_virtual_tokens")
    a = p.parse_args(argv)
    mcfg = ModelConfig(name=a.model)
    base = load_model(mcfg, "causal_lm", None, a.device).eval()
    tok = load_tokenizer(mcfg)
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(a.device)
    method = (LST(LSTConfig(r=a.r, side_layers=a.side_layers)) if a.method == "lst"
              else PTuningV2(PTuningV2Config(num_virtual_tokens=a.virtual_tokens)))
    lst = method.apply(base, Context.for_task("causal_lm")).eval()
    if a.method == "ptuning_v2":
        with torch.no_grad():  # a trained-looking prefix (the init is small): the cache must carry it exactly
            lst.prefix.embedding.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    n = a.new_tokens

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_base():
        with torch.no_grad():
            out = base.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=tok.pad_token_id or tok.eos_token_id)
        sync()
        return out

    def run_lst(use_cache=True, tokens=n):
        out = lst.generate(ids, max_new_tokens=tokens, eos_token_id=[], use_cache=use_cache)
        sync()
        return out

    run_base(), run_lst()  # warm-up
    times = {"base": [], "lst": []}
    outs = {}
    for _ in range(a.reps):
        for name, fn in (("base", run_base), ("lst", run_lst)):
            t, outs[name] = _timed(fn)
            times[name].append(t)
    t_uncached, out_uncached = _timed(lambda: run_lst(use_cache=False))
    same = torch.equal(outs["base"], outs["lst"]) if a.method == "lst" else None
    same_uncached = torch.equal(out_uncached, outs["lst"])
    tps = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'} "
          f"({a.device}, torch threads {torch.get_num_threads()}), {a.model}, prompt {ids.shape[1]} tokens, "
          f"{n} new tokens, batch 1, greedy, "
          + (f"LST r={a.r} side_layers={a.side_layers}" if a.method == "lst" else
             f"P-tuning v2 with {a.virtual_tokens} virtual tokens") + f", {a.reps} interleaved reps")
    name = {"lst": "LST", "ptuning_v2": "P-tuning v2"}[a.method]
    print(f"base.generate       {tps['base']:8.1f} tokens/s   (runs: {', '.join(f'{t:.2f}s' for t in times['base'])})")
    print(f"{name} generate cached {tps['lst']:8.1f} tokens/s   (runs: "
          f"{', '.join(f'{t:.2f}s' for t in times['lst'])})")
    print(f"{name} generate uncached {n / t_uncached:6.1f} tokens/s   (one run: {t_uncached:.2f}s)")
    print(f"ratio {name} cached / base: {tps['lst'] / tps['base']:.2f}x (target >= 0.7x); "
          f"cached / uncached: {t_uncached / statistics.median(times['lst']):.1f}x faster")
    print(f"step-0 tokens equal base.generate: {'n/a' if same is None else same}; cached equal uncached: "
          f"{same_uncached}")
    if same is False or not same_uncached:
        sys.exit(1)


if __name__ == "__main__":
    main()
