"""Named instruction formats (`data.format`): a row -> (prompt, completion), the loss on the completion only.

- `alpaca` (Taori et al., 2023, Stanford Alpaca): columns `instruction`, `input`, `output`, rendered with Alpaca's
  own two prompts. The "### Input:" section appears only when `input` is non-empty (a blank `input` must not
  print an empty header, which a plain `prompt_template` cannot avoid).
- `prompt_completion`: columns `prompt` and `completion`, used as they are (the completion usually starts with a
  space or a newline).
"""

from __future__ import annotations

from typing import Any

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

COLUMNS = {"alpaca": ["instruction", "output"], "prompt_completion": ["prompt", "completion"]}


def columns(name: str) -> list[str]:
    """The columns a format needs (alpaca's `input` is optional)."""
    return COLUMNS[name]


def prompt(name: str, row: dict[str, Any]) -> str:
    """The prompt of one row (no completion): what `sidetune generate` continues."""
    if name == "alpaca":
        extra = row.get("input")
        if extra is not None and str(extra).strip():
            return ALPACA_WITH_INPUT.format(instruction=row["instruction"], input=extra)
        return ALPACA_NO_INPUT.format(instruction=row["instruction"])
    return str(row["prompt"])


def completion(name: str, row: dict[str, Any]) -> str:
    return str(row["output"] if name == "alpaca" else row["completion"])


def pairs(name: str, rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    return [prompt(name, r) for r in rows], [completion(name, r) for r in rows]
