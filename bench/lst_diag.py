"""Why does LST trail LoRA on decoders? Many short LST trainings of one recipe, fast enough to sweep (issue 25).

    OMP_NUM_THREADS=1 python bench/lst_diag.py recipes/smollm2_lst.yaml --steps 80 --seeds 1,2,3 \\
        --try "base=" --try "lr1e-2=train.lr=1e-2" --try "all=method.side_layers=all"

LST's backbone is frozen and runs without grad, so what it gives the side network for a batch never changes: the
first training of the sweep runs it and keeps, per batch, its final hidden state and the output of every block; every
later training (another seed, lr, set of taps, width, init) reads them back instead of running the backbone again.
A training then costs the side network's steps and the LM head, about a tenth of a real one on SmolLM2-135M, and goes
through sidetune's own `train()` (data order, optimizer, schedule, clipping, chunked loss, eval) unchanged. The kept
block outputs are stored in bfloat16 (fp32 costs twice the memory: ~4 GB for 80 steps of batch 16 at SmolLM2's
width); --check runs the first config once more on the live backbone to show what that rounding moves.

Per try and seed it prints the eval metrics, and after training, on the eval set's label position: the RMS of the
side output up(norm(s)) against the backbone's final hidden state, the gates, and the norm of `up`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sidetune.config import load_config  # noqa: E402
from sidetune.methods import lst as lst_mod  # noqa: E402
from sidetune.methods._lst_blocks import capture  # noqa: E402
from sidetune.train import train  # noqa: E402


class BackboneCache:
    """LSTModel._backbone with a memory: the first call per batch runs the backbone and keeps every block's output."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype, self.store, self.hits, self.misses = dtype, {}, 0, 0
        self.live = lst_mod.LSTModel._backbone
        self.watch: list = []  # (final, side output) of the last eval-mode forward, for the report

    @staticmethod
    def key(inputs: dict) -> str:
        h = hashlib.sha1()
        for name in ("input_ids", "attention_mask", "position_ids"):
            t = inputs.get(name)
            if t is not None:
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def __call__(self, model, k, body, inputs, state=None):
        if state is not None or model.side_encoder is not None:  # generation and T5 take the live path
            return self.live(model, k, body, inputs, state)
        key = self.key(inputs)
        if key not in self.store:
            self.misses += 1
            layers = model.stacks[k].layers
            with torch.no_grad(), capture(layers, list(range(len(layers)))) as taps:
                out = body(**inputs, use_cache=False)
            self.store[key] = (out.last_hidden_state.float(),
                               [taps[i].to(self.dtype) for i in [-1, *range(len(layers))]])
        else:
            self.hits += 1
        final, all_taps = self.store[key]
        side = model.side
        # all_taps[0] is the embeddings, all_taps[i + 1] block i's output; the ladders project them, as
        # LSTModel._backbone's hooks do.
        taps = [all_taps[0]] + [all_taps[i + 1] for i in side.tapped]
        return final, [side.project(j, t.float()) for j, t in enumerate(taps)]


@contextlib.contextmanager
def patched(cache: BackboneCache):
    lst_mod.LSTModel._backbone = lambda self, k, body, inputs, state=None: cache(self, k, body, inputs, state)
    try:
        yield
    finally:
        lst_mod.LSTModel._backbone = cache.live


@torch.no_grad()
def probe(run_dir: Path, cfg) -> dict[str, float]:
    """Side output scale against the backbone's final hidden state at each eval prompt's last token."""
    from sidetune.rundir import open_run

    loaded = open_run(run_dir).load()
    lst = next(m for m in loaded.model.modules() if isinstance(m, lst_mod.LSTModel))
    seen = {}
    orig = lst._merge

    def merge(final, side):
        seen["final"], seen["out"] = final, lst.up(side)
        return orig(final, side)

    lst._merge = merge
    tok = loaded.tokenizer
    prompts = ["Review: a gorgeous, witty, seductive movie.\nSentiment:",
               "Review: the plot is nothing but boilerplate clichés.\nSentiment:"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    lst(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    last = enc["attention_mask"].sum(1) - 1  # right padding
    rows = torch.arange(len(prompts))
    f, o = seen["final"][rows, last], seen["out"][rows, last]
    gates = torch.sigmoid(lst.side.alpha / lst.side.temperature)
    return {"final_rms": f.pow(2).mean().sqrt().item(), "side_rms": o.pow(2).mean().sqrt().item(),
            "up_norm": lst.up.weight.norm().item(), "gate_mean": gates.mean().item(),
            "gate_min": gates.min().item(), "gate_max": gates.max().item()}


def run_one(recipe: str, overrides: list[str], seed: int, steps: int, out: Path, do_probe: bool) -> dict:
    cfg = load_config(recipe, [*overrides, f"train.seed={seed}", f"train.max_steps={steps}",
                               "train.eval_every=0", "train.save_every=0", "train.progress=false",
                               f"train.output_dir={out}", "train.overwrite=true"])
    t0 = time.time()
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        metrics = train(cfg)
    row = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    row["wall_s"] = round(time.time() - t0, 1)
    if do_probe:
        try:
            row.update(probe(out, cfg))
        except Exception as e:  # the probe is a diagnostic: never lose the sweep for it
            row["probe_error"] = str(e)[:120]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--try", dest="tries", action="append", default=[],
                    help="LABEL=override[,override...] (repeatable; 'base=' is the recipe as it is)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--set", dest="common", action="append", default=[], help="override for every try")
    ap.add_argument("--check", action="store_true", help="run the first try once more on the live backbone")
    ap.add_argument("--probe", action="store_true", help="side output scale and gates after each training")
    ap.add_argument("--json", help="append one JSON line per training here")
    args = ap.parse_args()
    tries = [t.split("=", 1) for t in (args.tries or ["base="])]
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = BackboneCache()
    tmp = Path(tempfile.mkdtemp(prefix="lst-diag-"))
    results: dict[str, list[dict]] = {}
    with patched(cache):
        for label, spec in tries:
            overrides = [*args.common, *[o for o in spec.split(",") if o]]
            for seed in seeds:
                try:
                    row = run_one(args.recipe, overrides, seed, args.steps, tmp / f"{label}-{seed}", args.probe)
                except Exception as e:  # one bad try (an override sidetune refuses) must not lose the cache
                    print(f"{label} seed {seed}: {type(e).__name__}: {e}", flush=True)
                    continue
                row.update(label=label, seed=seed, overrides=overrides)
                results.setdefault(label, []).append(row)
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    if args.check:
        label, spec = tries[0]
        row = run_one(args.recipe, [*args.common, *[o for o in spec.split(",") if o]], seeds[0], args.steps,
                      tmp / "check", False)
        print(json.dumps({"check_live_backbone": label, **row}), flush=True)
    print(f"\nbackbone cache: {cache.misses} batches run, {cache.hits} read back")
    key = "eval_accuracy" if results else None
    print(f"| try | overrides | {key} mean ± se | eval_loss mean | seeds |")
    print("|---|---|---|---|---|")
    for label, rows in results.items():
        if not key:
            break
        accs = [r.get(key, float("nan")) for r in rows]
        losses = [r.get("eval_loss", float("nan")) for r in rows]
        se = statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else float("nan")
        print(f"| {label} | {' '.join(rows[0]['overrides']) or '(recipe)'} | {statistics.mean(accs):.4f} ± "
              f"{se:.4f} | {statistics.mean(losses):.4f} | {len(rows)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
