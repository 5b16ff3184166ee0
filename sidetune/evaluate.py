"""Evaluation: the eval metrics of a model on a run's eval data (the trainer calls `evaluate` between steps and at
the end), and `sidetune eval RUN [--data FILE]`, which reloads a finished run through `sidetune.rundir` and
evaluates it on a copy of its config.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from sidetune.decoding import GenerationEval
from sidetune.errors import SidetuneError
from sidetune.losses import ChunkedLMLoss
from sidetune.preference import PairMeter, PreferenceModule, pair_metrics
from sidetune.session import Setup, forward_module, mixed_precision
from sidetune.tasks import Task

if TYPE_CHECKING:
    from sidetune.rundir import FinishedRun


def evaluate_run(run_dir: str | Path | FinishedRun, data_path: str | None = None) -> dict[str, float]:
    """Evaluate a finished run (its directory, or the `FinishedRun` already opened) on its eval data (recorded as
    an absolute path when the run started), or on `data_path` (the `--data` of `sidetune eval`, named so in every
    error about it)."""
    from sidetune.data import resolve_data
    from sidetune.rundir import FinishedRun, open_run

    run = run_dir if isinstance(run_dir, FinishedRun) else open_run(run_dir)
    cfg = copy.deepcopy(run.cfg)
    if data_path is not None:
        if resolve_data(data_path) is None:
            raise SidetuneError(f"--data {data_path!r}: no such data file; give a csv/tsv/json/jsonl/parquet path")
        cfg.data.eval = data_path
    if cfg.data.eval is None:
        raise SidetuneError("this run has no data.eval; pass --data PATH")
    # Only the eval file is read: the training file (maybe moved since) is not needed to evaluate; the label names
    # the run resolved from it are in its config.
    cfg.data.train, cfg.data.max_train_samples = cfg.data.eval, 1
    cfg.data.packing = False  # packing shapes the training rows only, which evaluation never reads
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.train, model_dtype=cfg.model.dtype))
    try:
        s = run.load(accelerator.device, cfg=cfg, with_data=True)
    except SidetuneError as e:
        if data_path is None:
            raise
        # data.build names the file by its config key; here the user gave it as --data.
        named = re.sub(r"\bdata\.(train|eval)\b=?", "--data ", str(e)).replace("--data  ", "--data ")
        raise SidetuneError(named) from None
    module = forward_module(s.model, s.cfg, s.method)
    if isinstance(module, PreferenceModule) and module.needs_table:
        raise SidetuneError(f"this run's DPO reference log-probabilities were precomputed for its own pairs "
                            f"(method {s.cfg.method.name} has no reference of its own); its eval rewards are in "
                            f"{run.root / 'metrics.jsonl'}")
    module = accelerator.prepare(module)
    loaders = eval_loaders(s, s.cfg.train.eval_batch_size, s.task.collator(s.tokenizer), accelerator)
    return evaluate(module, loaders, s.task, accelerator)


def eval_loaders(s: Setup, batch_size: int, collate,
                  accelerator: Accelerator) -> dict[str, DataLoader | GenerationEval]:
    """The eval data, sharded over the processes: "eval" (loss, accuracy), "choices" (label scoring of a causal
    LM), "generate" (data.eval_generate: this process's share of the prompts, decoded with the model's generate)."""
    loaders: dict[str, DataLoader | GenerationEval] = {}
    for key, ds in (("eval", s.data.eval), ("choices", s.data.eval_choices)):
        if ds is not None:
            # A generator of its own: every pass over a DataLoader draws a seed from its generator, which by default
            # is torch's global one, so an eval would shift the dropout masks of every later training step, and the
            # trained weights would depend on train.eval_every.
            loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate, generator=torch.Generator())
            loaders[key] = accelerator.prepare(loader)
    if s.cfg.data.eval_generate and s.data.eval is not None:
        # s.model, not the prepared module: decoding calls the model's own generate, on each process alone (no DDP
        # collective in it); it shares its parameters with what trains.
        loaders["generate"] = GenerationEval(s.model, s.tokenizer, s.task, s.data.eval,
                                             s.cfg.data.eval_generate_max_new_tokens, accelerator.process_index,
                                             accelerator.num_processes)
    return loaders


@torch.no_grad()
def evaluate(module: nn.Module, loaders: dict[str, DataLoader | GenerationEval], task: Task,
             accelerator: Accelerator | None = None) -> dict[str, float]:
    """eval_loss for every task; eval_accuracy for classification, and for causal LM with label choices;
    eval_perplexity for LM tasks; eval_exact_match and eval_token_f1 with data.eval_generate. Losses are averaged
    per example (classification) or per target token (LM). eval_examples: how many examples eval_accuracy scored
    (for a standard error)."""
    module.eval()
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
    loss_sum, count, correct, seen = 0.0, 0, 0, 0
    pair_meter = PairMeter()
    for batch in loaders.get("eval", ()):
        out = module(**batch)
        labels = batch["labels"]
        if task.pairs:  # per-pair rewards of the preference objective (sidetune.preference)
            p = out.pairs
            pair_meter.add(*gather((p["chosen_rewards"], p["rejected_rewards"], p["chosen_logps"],
                                    p["rejected_logps"])))
        # Mean losses (per example, or per target token for LM tasks): weight each batch by its count.
        n = task.loss_weight(labels)
        if task.classifies:
            preds, golds = gather((out.logits.argmax(-1), labels))
            correct += (preds == golds).sum().item()
            seen += golds.numel()
        loss_sum += gather(out.loss.detach().float() * n).sum().item()
        count += gather(torch.as_tensor(n, device=out.loss.device)).sum().item()
    metrics: dict[str, float] = {}
    if count:
        metrics["eval_loss"] = loss_sum / count
        if task.generates:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if seen:
        metrics["eval_accuracy"], metrics["eval_examples"] = correct / seen, seen
    if pair_meter.sums:
        metrics.update(pair_metrics(pair_meter.sums))
        metrics["eval_pairs"] = int(pair_meter.sums["pairs"])
        metrics.pop("eval_perplexity", None)  # the eval loss is the preference loss, not a per-token NLL
    if "choices" in loaders:
        metrics["eval_accuracy"], metrics["eval_examples"] = _choice_accuracy(module, loaders["choices"], gather)
    if "generate" in loaders:
        if accelerator is None:
            metrics.update(loaders["generate"].score(next(module.parameters()).device))
        else:
            # Each process decodes its share; the sums are reduced (a collective: every process gets here).
            with accelerator.autocast():
                metrics.update(loaders["generate"].score(
                    accelerator.device, lambda x: accelerator.reduce(x, reduction="sum")))
    return metrics


def _choice_accuracy(module: nn.Module, loader: DataLoader, gather) -> tuple[float, int]:
    """Accuracy of picking, per example, the label completion with the highest log-likelihood, and how many
    examples it scored."""
    scores: dict[int, dict[int, float]] = {}
    golds: dict[int, int] = {}
    # The chunked LM loss scores the labelled positions only (a completion is a few tokens of a long prompt), through
    # its own forward so that a DDP or FSDP wrapper sees the call; any other module computes every position's logits.
    inner = getattr(module, "module", module)  # under DDP
    for batch in loader:
        labels = batch.pop("labels")
        example, choice, gold = batch.pop("example"), batch.pop("choice"), batch.pop("gold")
        if isinstance(inner, ChunkedLMLoss):
            nll = module(**batch, labels=labels, per_sequence=True).loss
        else:
            logits = module(**batch).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none").sum(1)
        for e, c, g, v in zip(*(gather(x).tolist() for x in (example, choice, gold, -nll))):
            scores.setdefault(e, {})[c] = v
            golds[e] = g
    correct = sum(max(s, key=s.get) == golds[e] for e, s in scores.items())
    return correct / max(len(scores), 1), len(scores)
