"""`sidetune eval RUN --lm-eval TASKS`: a finished run scored by lm-evaluation-harness (the optional extra
`pip install 'sidetune[lm-eval]'`, imported only here), through `sidetune.harness_lm.SidetuneLM`.

TASKS: comma-separated harness task / group names, or paths to task YAML files. A local task needs no network: a
YAML with `dataset_path: json` and `dataset_kwargs: {data_files: {test: /abs/path/data.jsonl}}` (see the README).
`--include-path DIR` adds a folder of task YAMLs; when every task is found there (or given as a file), the harness's
own catalogue (thousands of YAMLs, seconds to index) is not read at all.

Everything that can be refused is refused before the model loads: the extra not installed, a task that does not
exist or whose data cannot be read, a classifier or seq2seq run, results that could not be written.
The chat template: `--apply-chat-template auto` (the default) renders the prompts with the run's template when the
run trained on conversations (data.task=chat); `yes` / `no` force it.

Results: the harness's table on stdout, and its results JSON (plus a `sidetune` block: the run, the checksum of the
trainable weights it scored, the arguments) in RUN/lm_eval/results_<UTC time>.json, a new file each time (never one
that exists), written atomically; with --log-samples, each task's per-document records beside it as jsonl. Under
`accelerate launch` every process scores its share of the documents and the main process alone prints and writes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sidetune.errors import SidetuneError, one_line

EXTRA = "pip install 'sidetune[lm-eval]'"
RESULTS_DIR = "lm_eval"
# The harness options' defaults: `sidetune eval` without --lm-eval refuses any of them set otherwise.
HARNESS_DEFAULTS = {"limit": None, "num_fewshot": None, "batch_size": 8, "apply_chat_template": "auto",
                    "include_path": [], "max_length": None, "log_samples": False, "device": None,
                    "gen_kwargs": None, "system_instruction": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The eval subcommand's harness options (cli.py defines `sidetune eval`)."""
    g = p.add_argument_group("lm-evaluation-harness (needs pip install 'sidetune[lm-eval]')")
    g.add_argument("--lm-eval", metavar="TASKS", default=None,
                   help="score the run on these harness tasks (comma-separated names or task YAML files)")
    g.add_argument("--limit", type=float, default=None,
                   help="at most this many documents per task (a number below 1: that fraction)")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    g.add_argument("--batch-size", type=int, default=HARNESS_DEFAULTS["batch_size"], help="requests per forward / generate call (default 8)")
    g.add_argument("--apply-chat-template", choices=("auto", "yes", "no"), default="auto",
                   help="render prompts with the run's chat template (auto: when the run trained with data.task=chat)")
    g.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAMLs (repeatable)")
    g.add_argument("--max-length", type=int, default=None,
                   help="longest input in tokens (default: the model's position limit; longer inputs lose their start)")
    g.add_argument("--gen-kwargs", default=None, metavar="K=V,...",
                   help="generation settings over the tasks' own, e.g. max_gen_toks=64,do_sample=true,temperature=0.7")
    g.add_argument("--system-instruction", default=None, help="a system message put before every prompt")
    g.add_argument("--log-samples", action="store_true", help="also write every document's prompt, answers and "
                                                              "scores (RUN/lm_eval/samples_*.jsonl)")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu or cuda (default: accelerate's choice for this process: its GPU when there is one)")


def require_harness():
    """lm_eval, or one line naming the extra to install."""
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM  # noqa: F401  (the base class SidetuneLM needs)
    except ImportError:
        raise SidetuneError(f"--lm-eval needs lm-evaluation-harness, which is not installed; {EXTRA}") from None
    return lm_eval


def check_unused(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> None:
    """`sidetune eval` without --lm-eval: a harness option given anyway is one line, not silently ignored."""
    given = [f"--{k.replace('_', '-')}" for k, v in parser_defaults.items() if getattr(args, k, v) != v]
    if given:
        raise SidetuneError(f"{', '.join(given)} apply to --lm-eval only; add --lm-eval TASKS, or drop them")


def _check_arguments(args: argparse.Namespace) -> None:
    if args.data is not None:
        raise SidetuneError("--data and --lm-eval do not go together: --lm-eval scores the harness tasks' own data")
    if args.limit is not None and not args.limit > 0:
        raise SidetuneError(f"--limit must be > 0 (documents per task, or a fraction below 1), got {args.limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise SidetuneError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.batch_size < 1:
        raise SidetuneError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SidetuneError("--device cuda but torch sees no CUDA GPU on this machine; use --device cpu")
    if args.max_length is not None and args.max_length < 2:
        raise SidetuneError(f"--max-length must be >= 2, got {args.max_length}")
    for d in args.include_path:
        if not Path(d).expanduser().is_dir():
            raise SidetuneError(f"--include-path {d!r} is not a directory of task YAMLs")


def task_specs(text: str) -> list[str]:
    """The --lm-eval list: names as given, YAML files as absolute paths (one line for a missing file)."""
    specs = [t.strip() for t in text.split(",") if t.strip()]
    if not specs:
        raise SidetuneError("--lm-eval needs at least one task name (e.g. --lm-eval hellaswag,my_task)")
    out = []
    for spec in specs:
        if spec.endswith((".yaml", ".yml")):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise SidetuneError(f"--lm-eval {spec!r}: no such task YAML file")
            spec = str(path.resolve())
        out.append(spec)
    return out


def task_manager(specs: list[str], include: list[str]):
    """The harness's TaskManager that knows every spec: only the --include-path folders when they (and the YAML
    files given) cover all of them, else with the harness's catalogue too. One line naming an unknown task."""
    from lm_eval.tasks import TaskManager

    include = [str(Path(d).expanduser().resolve()) for d in include]
    names = [s for s in specs if not Path(s).is_file()]
    manager = TaskManager(include_path=include or None, include_defaults=False)
    if any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=include or None, include_defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" or under --include-path {', '.join(include)}" if include else ""
        raise SidetuneError(f"--lm-eval: no harness task named {', '.join(map(repr, unknown))}{where}; give a task "
                            f"YAML file, or its folder with --include-path")
    return manager


def gen_kwargs(text: str | None) -> dict[str, Any] | None:
    """--gen-kwargs as the harness parses it (k=v pairs, values read as numbers / booleans)."""
    if text is None:
        return None
    from lm_eval.utils import simple_parse_args_string

    try:
        parsed = simple_parse_args_string(text)
    except Exception as e:
        raise SidetuneError(f"--gen-kwargs {text!r} is not k=v,k=v ({one_line(e, 80)})") from None
    if not parsed:
        raise SidetuneError(f"--gen-kwargs {text!r} sets nothing; give k=v pairs (max_gen_toks=64)")
    return parsed


def load_tasks(manager, specs: list[str], overrides: dict[str, Any] | None = None) -> list:
    """Build every task (reads its data) so that a bad YAML or a missing data file is one line before the model
    loads. Returns what simple_evaluate is then given: the built tasks (not read twice), or the specs again when
    they hold a group (its aggregate needs the group, which the harness builds from the names)."""
    try:
        loaded = manager.load(specs)
    except Exception as e:  # the harness and datasets raise many kinds; the user needs the message
        raise SidetuneError(f"--lm-eval {','.join(specs)}: a task could not be loaded ({one_line(e, 200)}); check "
                            f"its YAML and data files") from None
    if not loaded["tasks"]:
        raise SidetuneError(f"--lm-eval {','.join(specs)}: no task to run (an empty group?)")
    from sidetune.harness_lm import decoding_settings

    for name, task in loaded["tasks"].items():
        if task.get_config("output_type") == "generate_until":
            try:  # a generation keyword sidetune's decoding cannot honour: refused now, not after the model loads
                decoding_settings({**(task.get_config("generation_kwargs") or {}), **(overrides or {})}, 256)
            except SidetuneError as e:
                raise SidetuneError(f"--lm-eval task {name}: {e}") from None
    return specs if loaded["groups"] else list(loaded["tasks"].values())


def results_target(root: Path, accelerator) -> Path:
    """RUN/lm_eval/, checked on the main process before the model loads: not a file of someone else's, and
    writable (probed with a temporary directory, removed at once; the folder itself is made when the results are
    written, so a refused or failed eval leaves nothing behind). A refusal stops every process (none is left
    waiting in the harness's collectives)."""
    import tempfile

    import torch

    target, error = root / RESULTS_DIR, None
    if accelerator.is_main_process:
        if target.exists() and not target.is_dir():
            error = SidetuneError(f"{target} exists and is not a directory; sidetune writes the harness results "
                                  f"there: move it away")
        else:
            try:
                Path(tempfile.mkdtemp(prefix=".sidetune-probe-", dir=target if target.is_dir() else root)).rmdir()
            except OSError as e:
                error = SidetuneError(f"cannot write the harness results into {target} "
                                      f"({e.strerror or one_line(e, 80)}); make the run directory writable")
    if accelerator.num_processes > 1:
        votes = accelerator.reduce(torch.tensor(int(error is not None), device=accelerator.device), reduction="sum")
        if votes.item() and error is None:
            raise SidetuneError(f"the main process cannot write the harness results into {target}")
    if error is not None:
        raise error
    return target


def _new_file(directory: Path, stem: str, suffix: str) -> Path:
    """A name in `directory` that nothing held, claimed by creating it empty (O_EXCL: two evals finishing in the same
    second get -2, -3, ..., never each other's file); the atomic write then replaces that empty file."""
    n = 1
    while True:
        path = directory / (f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}")
        try:
            with path.open("x"):
                return path
        except FileExistsError:
            n += 1


def _trainable_sha256(final: Path) -> str | None:
    """The checksum of the weights scored, from final/'s manifest (open_run verified it)."""
    from sidetune import checkpoint

    try:
        return json.loads((final / checkpoint.MANIFEST).read_text())["files"][checkpoint.TRAINABLE]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def max_length_of(model, tokenizer, given: int | None) -> int:
    """--max-length, else the model's position limit less the virtual tokens a prompt method puts in front, else the
    tokenizer's, else 2048."""
    if given is not None:
        return given
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value - int(getattr(model, "num_virtual_tokens", 0) or 0)
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    require_harness()
    import torch
    from accelerate import Accelerator

    from sidetune.models import load_tokenizer
    from sidetune.rundir import open_run
    from sidetune.session import mixed_precision
    from sidetune.tasks import get_task

    run_dir = open_run(args.run_dir)  # verified once; refused while a run trains into it
    cfg = run_dir.cfg
    task = get_task(cfg.data.task)
    if not task.generates:
        raise SidetuneError(f"--lm-eval scores language models; this run is a classifier (data.task={task.name}): "
                            f"use sidetune eval RUN for its own metrics")
    chat = {"yes": True, "no": False, "auto": task.conversational}[args.apply_chat_template]
    specs = task_specs(args.lm_eval)
    manager = task_manager(specs, args.include_path)
    tasks = load_tasks(manager, specs, gen_kwargs(args.gen_kwargs))
    # No CUDA device: the processes of `accelerate launch` run on the CPU over gloo (as the trainer's do).
    accelerator = Accelerator(cpu=args.device == "cpu" or not torch.cuda.is_available(),
                              mixed_precision=mixed_precision(cfg.train, model_dtype=cfg.model.dtype))
    target = results_target(run_dir.root, accelerator)
    if chat and cfg.data.chat_template is None and not load_tokenizer(cfg.model).chat_template:
        raise SidetuneError("--apply-chat-template yes: this run's tokenizer has no chat template; train with "
                            "data.chat_template, or evaluate with --apply-chat-template no")
    s = run_dir.load(accelerator.device)
    return _evaluate(args, run_dir, s, accelerator, manager, tasks, chat, target)


def _evaluate(args, run_dir, s, accelerator, manager, tasks: list, chat: bool, target: Path) -> int:
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    from sidetune import checkpoint
    from sidetune.harness_lm import SidetuneLM

    info = {"sidetune_run": str(run_dir.root), "method": s.cfg.method.name, "base_model": s.cfg.model.name,
            "trainable_sha256": _trainable_sha256(run_dir.final)}
    lm = SidetuneLM(s.model, s.tokenizer, device=accelerator.device, batch_size=args.batch_size,
                    max_length=max_length_of(s.model, s.tokenizer, args.max_length), rank=accelerator.process_index,
                    world_size=accelerator.num_processes, accelerator=accelerator, autocast=accelerator.autocast,
                    name=f"sidetune__{run_dir.root.name}", info=info, seq2seq=s.task.seq2seq)
    limit: Any = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
                                  batch_size=args.batch_size, device=str(accelerator.device), task_manager=manager,
                                  apply_chat_template=chat, log_samples=args.log_samples,
                                  gen_kwargs=gen_kwargs(args.gen_kwargs), system_instruction=args.system_instruction)
    except (SidetuneError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # a task's template or metric failing on a document: the harness's message, one line
        raise SidetuneError(f"lm-evaluation-harness failed ({type(e).__name__}: {one_line(e, 200)}); check the "
                            f"task YAML") from None
    if results is None:  # not the main process: the main one prints and writes
        return 0
    samples = results.pop("samples", None) or {}
    arguments = {"lm_eval": args.lm_eval, **{k: getattr(args, k) for k in HARNESS_DEFAULTS}}
    results["sidetune"] = {"written_by": "sidetune", **info, "arguments": arguments,
                           "processes": accelerator.num_processes, "apply_chat_template": chat}
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime())
    try:
        target.mkdir(exist_ok=True)
    except OSError as e:
        raise checkpoint.os_error(target, e) from None
    path = _new_file(target, f"results_{stamp}", ".json")
    checkpoint.write_text(path, json.dumps(results, indent=1, default=handle_non_serializable, ensure_ascii=False))
    written = [path]
    for name, rows in samples.items():
        sample_path = _new_file(target, f"samples_{_safe(name)}_{stamp}", ".jsonl")
        checkpoint.write_text(sample_path, "".join(json.dumps(r, default=handle_non_serializable,
                                                              ensure_ascii=False) + "\n" for r in rows))
        written.append(sample_path)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(f"sidetune: harness results in {path}" + (f" (+ {len(written) - 1} samples file(s))"
                                                    if len(written) > 1 else ""))
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
