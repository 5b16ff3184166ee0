"""Writes train.jsonl, eval.jsonl and sft.jsonl in this directory from the bundled SST-2 (../sst2): preference
pairs for `data.task: preference` and reviews for the supervised stage before them (see README.md).

    python sidetune/assets/sst2_pref/make_pairs.py

Deterministic (seeded). Only whole-sentence-like rows of 8 to 30 words are used; SST's tokenisation is undone a
little (" , " -> ", ", " n't" -> "n't", ...).
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
PROMPT = "Write a positive movie review."
FIXES = [(r" ([,.!?;:%])", r"\1"), (r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1"), (r"-lrb- ?", "("), (r" ?-rrb-", ")"),
         (r"`` ?", '"'), (r" ?''", '"'), (r"\s+", " ")]


def _clean(text: str) -> str:
    for pattern, repl in FIXES:
        text = re.sub(pattern, repl, text)
    text = text.strip()
    return text[:1].upper() + text[1:]


def _reviews(path: Path) -> tuple[list[str], list[str]]:
    pos, neg, seen = [], [], set()
    with path.open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            words = row["sentence"].split()
            text = _clean(row["sentence"])
            if not 8 <= len(words) <= 30 or text.lower() in seen:
                continue
            seen.add(text.lower())
            (pos if row["label"] == "1" else neg).append(text)
    return pos, neg


def _pair(chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": PROMPT}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def _write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(0)
    pos, neg = _reviews(HERE.parent / "sst2" / "train.tsv")
    rng.shuffle(pos)
    rng.shuffle(neg)
    _write("train.jsonl", [_pair(c, r) for c, r in zip(pos[:1000], neg[:1000])])
    # The supervised stage: the same prompt answered by positive and negative reviews alike (half each), none of
    # them in a pair: a model that writes reviews but has not learnt which kind the prompt asks for.
    sft = [{"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": t}]}
           for t in pos[1000:1500] + neg[1000:1500]]
    rng.shuffle(sft)
    _write("sft.jsonl", sft)
    dpos, dneg = _reviews(HERE.parent / "sst2" / "dev.tsv")  # held out: GLUE's dev sentences
    rng.shuffle(dpos)
    rng.shuffle(dneg)
    _write("eval.jsonl", [_pair(c, r) for c, r in zip(dpos[:200], dneg[:200])])


if __name__ == "__main__":
    main()
