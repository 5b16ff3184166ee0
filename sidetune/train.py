"""The one training loop, on accelerate. Every method runs through it unchanged.

Reading order: `train` is the loop (it builds everything through `session.build`, where all input errors surface
before the run directory is touched, and steps with `session.train_step`); `evaluate` computes the eval metrics;
`save_trainable` / `load_run` write and read the trainable set.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sidetune.config import Config, load_config, save_config
from sidetune.errors import SidetuneError
from sidetune.memory import peak_memory, short
from sidetune.methods import trainable_parameters
from sidetune.session import Setup, build, forward_module, mixed_precision, train_step
from sidetune.tasks import Task

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "logs")


def _prepare_output_dir(out: Path, resuming: bool) -> None:
    if out.exists() and not resuming:
        stale = [out / name for name in RUN_FILES if (out / name).exists()]
        if stale:
            print(f"sidetune: starting a new run in {out}; replacing the previous run's files there")
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


class _Counter:
    """The optimizer-step counter, checkpointed by accelerate with the optimizer and RNG states."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]


def train(cfg: Config) -> dict[str, float]:
    """Train with `cfg`; write config.yaml, metrics.jsonl, checkpoints and final/ to train.output_dir. Returns the
    final eval metrics (empty without eval data)."""
    t = cfg.train
    out = Path(t.output_dir)
    accelerator = Accelerator(
        mixed_precision=mixed_precision(t),
        gradient_accumulation_steps=t.grad_accum,
        log_with=t.tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Shuffling seeded by (seed, epoch): a resumed run sees the same batches as an uninterrupted one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(t.seed)
    s = build(cfg, accelerator.device, with_optimizer=True)
    model, task = s.model, s.task

    collate = task.collator(s.tokenizer)
    # The loader's own generator: starting an epoch's iterator then draws no number from the global RNG, which
    # feeds dropout; otherwise a resumed run's dropout masks would be shifted by one draw.
    train_loader = DataLoader(s.data.train, batch_size=t.batch_size, shuffle=True, collate_fn=collate,
                              num_workers=t.num_workers, generator=torch.Generator().manual_seed(t.seed))
    module, optimizer, train_loader = accelerator.prepare(s.module, s.optimizer, train_loader)
    # Counted on the prepared loader: under `accelerate launch` each process sees only its shard of the batches.
    steps_per_epoch = max(1, math.ceil(len(train_loader) / t.grad_accum))
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)
    # Imported here: transformers.optimization pulls in peft when it is installed (seconds of import for every
    # command that only needs the model-building half of this module, e.g. `sidetune profile`'s workers).
    from transformers import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler({"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler],
                              optimizer, num_warmup_steps=warmup * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    eval_loaders = _eval_loaders(s, cfg.train.eval_batch_size, collate, accelerator)
    counter = _Counter()
    accelerator.register_for_checkpointing(counter)
    _register_trainable_checkpointing(accelerator, model)

    resume_dir = _resolve_resume(t.resume, out) if t.resume else None
    _prepare_output_dir(out, resuming=resume_dir is not None)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
    if t.tracker:
        accelerator.init_trackers("sidetune", config=_flat(cfg.to_dict()))
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        accelerator.print(f"sidetune: resumed from {resume_dir} at step {counter.step}")

    log = _MetricsLog(out / "metrics.jsonl", accelerator)
    n_trainable = sum(p.numel() for p in trainable_parameters(model).values())
    n_total = sum(p.numel() for p in model.parameters())
    accelerator.print(f"sidetune: {cfg.method.name} on {cfg.model.name}: {n_trainable:,} trainable of {n_total:,} "
                      f"parameters ({100 * n_trainable / n_total:.2f}%), {total_steps} steps; global batch "
                      f"{t.batch_size * t.grad_accum * accelerator.num_processes} = batch_size {t.batch_size} x "
                      f"grad_accum {t.grad_accum} x {accelerator.num_processes} process(es)")

    bar = tqdm(total=total_steps, initial=counter.step, disable=not (t.progress and accelerator.is_main_process),
               desc="train", dynamic_ncols=True)
    # Loss and token counts stay on the device between log rows: reading them every micro-batch would force a
    # host-device sync per step and stall the GPU queue.
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
    micro_batches, last_log = 0, time.perf_counter()
    step = counter.step
    eval_metrics: dict[str, float] = {}
    module.train()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        train_loader.set_epoch(epoch)
        batches = train_loader
        if done_in_epoch:
            batches = accelerator.skip_first_batches(train_loader, done_in_epoch * t.grad_accum)
        for batch in batches:
            with accelerator.accumulate(module):
                # Gradients are clipped only once they are synchronised (the last micro-batch of an accumulation).
                loss = train_step(module, batch, optimizer, s.trainable, t.max_grad_norm, scheduler=scheduler,
                                  backward=accelerator.backward,
                                  clip=accelerator.clip_grad_norm_ if accelerator.sync_gradients else None)
            loss_sum += loss
            tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            counter.step = step
            bar.update(1)
            if step % t.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - last_log
                # Every process logs the same steps, so these collectives line up; the row is the mean loss over
                # all processes and the tokens of all of them.
                mean_loss = accelerator.reduce(loss_sum / micro_batches, reduction="mean")
                all_tokens = accelerator.reduce(tokens, reduction="sum")
                row = {"step": step, "loss": mean_loss.item(), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": all_tokens.item() / elapsed, **peak_memory(accelerator.device)}
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                mem=short(peak_memory(accelerator.device)))
                loss_sum.zero_()
                tokens.zero_()
                micro_batches, last_log = 0, time.perf_counter()
            if eval_loaders and t.eval_every and step % t.eval_every == 0 and step < total_steps:
                eval_metrics = evaluate(module, eval_loaders, task, accelerator)
                log.write({"step": step, **eval_metrics})
                module.train()
                last_log = time.perf_counter()  # eval time is not training throughput
            if t.save_every and step % t.save_every == 0:
                accelerator.save_state(str(out / "checkpoints" / f"step-{step:07d}"))
            if step >= total_steps:
                break
    bar.close()

    if eval_loaders:
        eval_metrics = evaluate(module, eval_loaders, task, accelerator)
        log.write({"step": step, **eval_metrics})
    if accelerator.is_main_process:
        save_trainable(model, cfg, out / "final")
    accelerator.end_training()
    accelerator.print(f"sidetune: done; final weights in {out / 'final'}")
    if eval_metrics:
        accelerator.print(json.dumps({"step": step, **eval_metrics}))
    return eval_metrics


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def _eval_loaders(s: Setup, batch_size: int, collate, accelerator: Accelerator) -> dict[str, DataLoader]:
    loaders = {}
    for key, ds in (("eval", s.data.eval), ("choices", s.data.eval_choices)):
        if ds is not None:
            loaders[key] = accelerator.prepare(DataLoader(ds, batch_size=batch_size, collate_fn=collate))
    return loaders


@torch.no_grad()
def evaluate(module: nn.Module, loaders: dict[str, DataLoader], task: Task,
             accelerator: Accelerator | None = None) -> dict[str, float]:
    """eval_loss for every task; eval_accuracy for classification, and for causal LM with label choices;
    eval_perplexity for LM tasks. Losses are averaged per example (classification) or per target token (LM)."""
    module.eval()
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
    loss_sum, count, correct, seen = 0.0, 0, 0, 0
    for batch in loaders.get("eval", ()):
        out = module(**batch)
        labels = batch["labels"]
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
        metrics["eval_accuracy"] = correct / seen
    if "choices" in loaders:
        metrics["eval_accuracy"] = _choice_accuracy(module, loaders["choices"], gather)
    return metrics


def _choice_accuracy(module: nn.Module, loader: DataLoader, gather) -> float:
    """Accuracy of picking, per example, the label completion with the highest log-likelihood."""
    scores: dict[int, dict[int, float]] = {}
    golds: dict[int, int] = {}
    for batch in loader:
        labels = batch.pop("labels")
        example, choice, gold = batch.pop("example"), batch.pop("choice"), batch.pop("gold")
        logits = module(**batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none").sum(1)
        for e, c, g, v in zip(*(gather(x).tolist() for x in (example, choice, gold, -nll))):
            scores.setdefault(e, {})[c] = v
            golds[e] = g
    correct = sum(max(s, key=s.get) == golds[e] for e, s in scores.items())
    return correct / max(len(scores), 1)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and saved runs


def save_trainable(model: nn.Module, cfg: Config, out: Path) -> None:
    """The trainable set as safetensors plus the full resolved config: enough to rebuild the model with `load_run`."""
    out.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().contiguous().cpu() for n, p in trainable_parameters(model).items()}
    save_file(state, str(out / "trainable.safetensors"), metadata={"method": cfg.method.name})
    save_config(cfg, out / "config.yaml")


def load_trainable(model: nn.Module, path: Path) -> None:
    state = load_file(str(path))
    expected = set(trainable_parameters(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise SidetuneError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                            f"was it saved with a different method config?")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def _register_trainable_checkpointing(accelerator: Accelerator, model: nn.Module) -> None:
    """Make accelerate's save_state/load_state store only the trainable set (the frozen base is on disk already)."""

    def save_hook(models, weights, output_dir):
        weights.clear()  # accelerate would otherwise write the whole model
        if accelerator.is_main_process:
            state = {n: p.detach().contiguous().cpu() for n, p in trainable_parameters(model).items()}
            save_file(state, str(Path(output_dir) / "trainable.safetensors"))

    def load_hook(models, input_dir):
        models.clear()
        load_trainable(model, Path(input_dir) / "trainable.safetensors")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _resolve_resume(resume: str, out: Path) -> Path:
    if resume == "latest":
        found = sorted((out / "checkpoints").glob("step-*"))
        if not found:
            raise SidetuneError(f"train.resume=latest but {out / 'checkpoints'} holds no checkpoint; set "
                                f"train.save_every to write some")
        return found[-1]
    path = Path(resume)
    if not (path / "trainable.safetensors").is_file():
        raise SidetuneError(f"train.resume={resume!r} is not a checkpoint directory (no trainable.safetensors)")
    return path


def run_config(run_dir: str | Path) -> tuple[Config, Path]:
    """The config and trainable weights of a finished run (its directory or its final/ directory)."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "final", run_dir):
        if (candidate / "trainable.safetensors").is_file() and (candidate / "config.yaml").is_file():
            return load_config(candidate / "config.yaml"), candidate / "trainable.safetensors"
    raise SidetuneError(f"{str(run_dir)!r} is not a finished sidetune run (no final/trainable.safetensors)")


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Rebuild a trained model from its run directory: base model + method + trained weights, in eval mode."""
    cfg, weights = run_config(run_dir)
    s = build(cfg, torch.device(device), with_data=False)
    load_trainable(s.model, weights)
    s.model.eval()
    return s.model, s.tokenizer


def evaluate_run(run_dir: str | Path, data_path: str | None = None) -> dict[str, float]:
    """Evaluate a finished run on its eval data, or on `data_path`."""
    cfg, weights = run_config(run_dir)
    if data_path is not None:
        # Only X is read: the training file (maybe relative to another directory) is not needed to evaluate.
        cfg.data.eval = cfg.data.train = data_path
        cfg.data.max_train_samples = 1
    if cfg.data.eval is None:
        raise SidetuneError("this run has no data.eval; pass --data PATH")
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.train))
    s = build(cfg, accelerator.device)
    load_trainable(s.model, weights)
    module = accelerator.prepare(forward_module(s.model, cfg))
    loaders = _eval_loaders(s, cfg.train.eval_batch_size, s.task.collator(s.tokenizer), accelerator)
    return evaluate(module, loaders, s.task, accelerator)


class _MetricsLog:
    """metrics.jsonl (one JSON object per event) plus accelerate's trackers, main process only."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def write(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
