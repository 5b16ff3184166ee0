"""`sidetune train|eval|...`: the command line. Input errors print one `sidetune: error: ...` line and exit 2.

train and eval live here; every other subcommand is a module listed in SUBCOMMANDS that defines
`add_arguments(parser)` and `run(args) -> int`, imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from sidetune.compat import check_versions
from sidetune.errors import SidetuneError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidetune", description="Memory-efficient fine-tuning of pretrained transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with a YAML run config and section.key=value overrides")
    t.add_argument("config", nargs="?", help="run config YAML (see recipes/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 method.r=16")
    t.add_argument("--help-config", action="store_true",
                   help="list every config key (model, data, train and each method's) with its type, default and "
                        "meaning, then exit")

    e = sub.add_parser("eval", help="evaluate a finished run: its own metrics as JSON, or lm-evaluation-harness "
                                    "tasks (--lm-eval) as the harness's table")
    e.add_argument("run_dir")
    e.add_argument("--data", help="evaluate on this data file instead of the run's data.eval")
    _add_arguments("sidetune.harness")(e)

    for name, (module, help_text) in SUBCOMMANDS.items():
        _add_arguments(module)(sub.add_parser(name, help=help_text, description=help_text))
    return p


# name -> (module, help). The module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("sidetune.export", "merge a LoRA/QLoRA run into its base weights (--merge) or write it as a PEFT adapter (--peft)"),
    "profile": ("sidetune.profile", "memory profile of every method: measured, predicted, as JSON, Markdown and PNG"),
    "plan": ("sidetune.plan", "which methods fit a memory budget, the largest batch each takes, what to change"),
    "generate": ("sidetune.generate", "generate text from a finished run (a prompt, or a jsonl of prompts)"),
    "chat": ("sidetune.chat_repl", "talk to a finished run through its chat template (stdin, one message a line)"),
    "plot": ("sidetune.plot", "loss and eval curves of one or more runs (metrics.jsonl) as a PNG"),
}


def _add_arguments(module: str):
    # Argument definitions are cheap to import; keep heavy imports (torch) inside each module's run().
    return importlib.import_module(module).add_arguments


def _train(args: argparse.Namespace) -> int:
    from sidetune.config import load_config

    if args.help_config:
        from sidetune.config import SECTIONS
        from sidetune.fields import describe
        from sidetune.methods import METHODS

        print(describe({**SECTIONS, **{f"method (name: {n})": m.Config for n, m in METHODS.items()}}), end="")
        return 0
    if args.config is None:
        raise SidetuneError("sidetune train needs a run config YAML (e.g. recipes/sst2_lora.yaml); "
                            "see sidetune train --help-config for every key")
    from sidetune.train import train

    train(load_config(args.config, args.overrides))
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.lm_eval is not None:
        from sidetune.harness import run

        return run(args)
    from sidetune.harness import HARNESS_DEFAULTS, check_unused

    check_unused(args, HARNESS_DEFAULTS)
    from sidetune.evaluate import evaluate_run
    from sidetune.rundir import open_run

    run = open_run(args.run_dir)  # verified once
    names = run.cfg.data.label_names
    metrics: dict = evaluate_run(run, args.data)
    print(json.dumps({**metrics, **({"label_names": names} if names else {})}))
    return 0


COMMANDS = {"train": _train, "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A worker of an `accelerate launch` run leaves without destroying its process group or finalizing the
        # interpreter: gloo's destructor can deadlock against the GIL (py-spy on a hung CI worker: the main thread
        # joins gloo's worker thread while holding the GIL, the worker waits for the GIL to free a finished barrier's
        # tensors; pytorch/pytorch#75097 and #190489, open). Every file sidetune writes is closed and fsynced before
        # this point, and train() ends with a barrier, so no process leaves while another still needs it; only the
        # standard streams need flushing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    # Offline unless the user says otherwise: every model sidetune loads is local, and a hub lookup without network
    # hangs for ~20 s before failing. Set before transformers/datasets are imported: they read these at import.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sidetune import bnb_log

    bnb_log.hold()  # bitsandbytes' import-time warnings print only for a run that uses it (session.build)
    try:
        # Before any dependency is imported: a release outside pyproject.toml's ranges is one line, not an error
        # deep inside a step.
        check_versions()
        import datasets

        datasets.disable_progress_bars()
        if args.command in SUBCOMMANDS:
            return importlib.import_module(SUBCOMMANDS[args.command][0]).run(args)
        return COMMANDS[args.command](args)
    except SidetuneError as e:
        print(f"sidetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from sidetune.checkpoint import Stopped

        if isinstance(e, Stopped):  # SIGTERM / Ctrl-C after a checkpoint was saved (the trainer said where)
            return e.exit_code
        print("sidetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
