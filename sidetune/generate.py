"""`sidetune generate RUN [--prompt TEXT | --file PROMPTS.jsonl]`: text from a finished run, with the model's own
`generate` (transformers' for LoRA, adapters and full fine-tuning; the method module's plain loop for LST and
P-tuning v2, which transformers' cannot drive).

What a prompt is, per row of --file (one JSON object a line) or for --prompt TEXT (= {"prompt": TEXT}):
- a row with the messages column (data.messages_field, else `messages`): the conversation so far, rendered with the
  run's chat template plus its assistant header;
- a chat run (data.task=chat) and a `prompt`: that text as one user message, rendered the same way;
- a run with data.format (alpaca, prompt_completion): the row's prompt in that format;
- a `prompt`: the text as it is;
- otherwise the run's data.prompt_template over the row's columns.

Decoding is greedy unless --temperature or --top-k is given (then sampled, seeded by --seed); --greedy forces greedy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sidetune.errors import SidetuneError


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: greedy)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished sidetune run (its directory or its final/ directory)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (for a chat run: the user's message)")
    source.add_argument("--file", help="a jsonl file of prompts (see sidetune generate's module docstring); prints "
                                       "one JSON object a line with the prompt and the completion")
    add_decoding_arguments(p)


class Generator:
    """A loaded run that turns prompt rows into completions."""

    def __init__(self, run_dir: str | Path, device: str | None = None) -> None:
        import torch

        from sidetune.rundir import open_run
        from sidetune.tasks import get_task

        run = open_run(run_dir)
        self.task = get_task(run.cfg.data.task)
        if not self.task.generates:
            raise SidetuneError(f"this run classifies (data.task={self.task.name}); it has no LM head to generate "
                                f"with: use sidetune eval or sidetune.load(RUN) to predict labels")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # The run's chat template (data.chat_template) comes with the tokenizer: session.build gives it.
        s = run.load(self.device)
        self.cfg, self.model, self.tokenizer = s.cfg, s.model, s.tokenizer

    # ----- prompts

    def prompt_ids(self, row: dict[str, Any], where: str = "prompt") -> list[int]:
        from sidetune import chat, formats

        d = self.cfg.data
        field = d.messages_field if d.messages_field in row else "messages" if "messages" in row else None
        if field is not None:
            return self.chat_ids(chat.normalize(row[field], where))
        if self.task.conversational and "prompt" in row:
            return self.chat_ids([{"role": "user", "content": str(row["prompt"])}])
        if d.format is not None and all(c in row for c in formats.columns(d.format)[:1]):
            text = formats.prompt(d.format, row)
        elif "prompt" in row:
            text = str(row["prompt"])
        elif d.prompt_template:
            try:
                text = d.prompt_template.format(**row)
            except KeyError as e:
                raise SidetuneError(f"{where}: data.prompt_template names column {e.args[0]!r}, which the row lacks") from None
        else:
            raise SidetuneError(f"{where} has no prompt: give it a \"prompt\" or a \"{d.messages_field}\" field")
        return self.tokenizer(text)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        from sidetune import chat

        if not self.tokenizer.chat_template:
            raise SidetuneError("this run's tokenizer has no chat template; give plain prompts, or train with "
                                "data.chat_template")
        return chat.prompt_ids(self.tokenizer, messages)

    # ----- decoding

    def complete(self, ids: list[int], max_new_tokens: int = 128, temperature: float | None = None,
                 top_k: int | None = None, greedy: bool = False) -> str:
        """The decoded continuation of one prompt (special tokens dropped): sidetune.decoding.complete, which the
        trainer's data.eval_generate also calls."""
        from sidetune.decoding import complete

        return complete(self.model, self.tokenizer, ids, self.device, seq2seq=self.task.seq2seq,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, greedy=greedy)


def check_decoding_arguments(args: argparse.Namespace) -> None:
    """One line for a decoding argument that cannot work (generate and chat), before the run is loaded."""
    import math

    import torch

    if args.max_new_tokens < 1:
        raise SidetuneError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise SidetuneError(f"--temperature must be a finite number > 0, got {args.temperature} (for the most likely "
                            f"token every time use --greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise SidetuneError(f"--top-k must be >= 1, got {args.top_k}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise SidetuneError(f"--device {args.device!r} is not a device; use cpu or cuda") from None
        if device.type not in ("cpu", "cuda"):
            raise SidetuneError(f"--device {args.device!r}: sidetune generates on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SidetuneError("--device cuda but torch sees no CUDA GPU on this machine; use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise SidetuneError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def run(args: argparse.Namespace) -> int:
    import torch

    check_decoding_arguments(args)
    torch.manual_seed(args.seed)
    g = Generator(args.run_dir, args.device)
    decoding = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    greedy=args.greedy)
    if args.prompt is not None:
        print(g.complete(g.prompt_ids({"prompt": args.prompt}), **decoding))
        return 0
    for n, row in enumerate(_read_jsonl(args.file)):
        completion = g.complete(g.prompt_ids(row, f"{args.file} line {n + 1}"), **decoding)
        print(json.dumps({**row, "completion": completion}), flush=True)
    return 0


def _read_jsonl(path: str) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SidetuneError(f"--file {path!r}: no such file")
    rows = []
    for n, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SidetuneError(f"--file {path!r} line {n + 1} is not JSON: {e.msg}") from None
        rows.append(row if isinstance(row, dict) else {"prompt": row})
    return rows
