"""Do DPO's generations move the way the preferences point? For each finished run (a supervised stage and the DPO
run started from it), sample answers to the preference prompt and score them with a sentiment classifier trained by
sidetune itself (recipes/sst2_lora.yaml: MiniLM + LoRA on SST-2); report the fraction it calls positive, the mean
positive probability, and the run's last held-out reward accuracy when it has one.

    python bench/dpo_quality.py --classifier runs/sst2_lora runs/smollm2_sft_lst runs/smollm2_dpo_lst ...

Samples: --samples answers per run, temperature --temperature, --max-new-tokens tokens each, seeded (sample i uses
seed i in every run, so the runs see the same random numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = [{"role": "user", "content": "Write a positive movie review."}]


def sentiment(classifier, texts: list[str]) -> list[float]:
    """P(positive) of each text under the finished classification run `classifier` (label 1 = positive)."""
    import torch

    import sidetune

    model, tok = sidetune.load(classifier)
    probs = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
            probs += model(**enc).logits.softmax(-1)[:, 1].tolist()
    return probs


def samples(run: str, n: int, temperature: float, max_new_tokens: int) -> list[str]:
    import torch

    from sidetune.generate import Generator

    g = Generator(run, "cpu")
    ids = g.chat_ids(PROMPT)
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(g.complete(ids, max_new_tokens=max_new_tokens, temperature=temperature).strip())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--classifier", required=True)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--out", default=None, help="also write the rows (and every sample) as JSON here")
    args = p.parse_args()
    rows = []
    for run in args.runs:
        texts = samples(run, args.samples, args.temperature, args.max_new_tokens)
        probs = sentiment(args.classifier, texts)
        metrics = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        acc = [m["eval_rewards_accuracy"] for m in metrics if "eval_rewards_accuracy" in m]
        margin = [m["eval_rewards_margin"] for m in metrics if "eval_rewards_margin" in m]
        row = {"run": run, "samples": len(texts), "positive_fraction": sum(q > 0.5 for q in probs) / len(probs),
               "mean_p_positive": sum(probs) / len(probs), "eval_rewards_accuracy": acc[-1] if acc else None,
               "eval_rewards_margin": margin[-1] if margin else None, "examples": texts[:3], "all": texts}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "all"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
