"""`sidetune chat RUN`: talk to a finished run. Each line read from stdin is a user message; the conversation so far is
rendered with the run's chat template and the model's reply is printed and kept. `/reset` starts over, `/exit`
(or end of input) ends. Runs whose tokenizer has no chat template are refused in one line.
"""

from __future__ import annotations

import argparse
import sys

from sidetune.generate import Generator, add_decoding_arguments, check_decoding_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished sidetune run (its directory or its final/ directory)")
    p.add_argument("--system", default=None, help="a system prompt that opens the conversation")
    add_decoding_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    check_decoding_arguments(args)
    torch.manual_seed(args.seed)
    g = Generator(args.run_dir, args.device)
    g.chat_ids([{"role": "user", "content": ""}])  # one line now, not after the first message, if there is no template
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        print("sidetune chat: type a message; /reset starts over, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = list(start)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        reply = g.complete(g.chat_ids(messages), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, greedy=args.greedy).strip()
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
    return 0
