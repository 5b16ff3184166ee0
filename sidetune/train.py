"""The one training loop, on accelerate. Every method runs through it unchanged.

Reading order: `setup` builds tokenizer, data, model and method (all input errors surface here, before the run
directory is touched); `train` is the loop; `evaluate` computes the eval metrics; `save_trainable` / `load_run`
write and read the trainable set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
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

from sidetune import data as data_lib
from sidetune.config import Config, TrainConfig, load_config, save_config
from sidetune.errors import SidetuneError
from sidetune.losses import ChunkedLMLoss
from sidetune.memory import peak_memory, short
from sidetune.methods import build_method, trainable_parameters
from sidetune.models import load_model, load_tokenizer

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "logs")


@dataclass
class Setup:
    """Everything a run needs, built and validated before any file is written."""

    cfg: Config
    tokenizer: PreTrainedTokenizerBase
    data: data_lib.TaskData
    model: nn.Module  # the module the method returned; its trainable set is what gets saved
    method: Any


def setup(cfg: Config, device: torch.device, with_data: bool = True) -> Setup:
    tokenizer = load_tokenizer(cfg.model)
    data = data_lib.build(cfg.data, tokenizer, cfg.train.seed) if with_data else None
    if data is not None and data.num_labels is not None:
        cfg.data.num_labels = data.num_labels  # resolved into the saved config, so a reload needs no data
    model = load_model(cfg.model, cfg.data.task, cfg.data.num_labels, device, tokenizer.pad_token_id)
    method = build_method(cfg.method)
    model = method.apply(model)
    if not trainable_parameters(model):
        raise SidetuneError(f"method {cfg.method.name!r} left no trainable parameter on this model")
    return Setup(cfg, tokenizer, data, model, method)


def forward_module(model: nn.Module, cfg: Config) -> nn.Module:
    """The module the loop calls: the model itself, or wrapped so that the LM loss is computed in chunks."""
    return ChunkedLMLoss(model, cfg.train.loss_chunk_size) if cfg.train.loss_chunk_size else model


def training_module(model: nn.Module, cfg: Config) -> nn.Module:
    """The module a training step calls: gradient checkpointing switched on and the chunked LM loss wrapped around
    when the config asks (shared with `sidetune profile`, whose steps must cost what the loop's steps cost)."""
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing keeps gradients flowing to adapters inside frozen blocks without forcing
        # requires_grad on the embeddings' output (the enable_input_require_grads trap, peft #137).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed the HF method
            model.activation_checkpointing_enable(kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):  # older transformers, and our own wrapper modules
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise SidetuneError(f"method {cfg.method.name!r} does not support train.gradient_checkpointing")
    return forward_module(model, cfg)


def make_optimizer(model: nn.Module, method: Any, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # A method may split its parameters into groups (LoRA+); by default all trainable parameters share one lr.
    groups_fn = getattr(method, "param_groups", None)
    groups = groups_fn(model, t.lr) if groups_fn else [{"params": list(trainable_parameters(model).values()), "lr": t.lr}]
    # No weight decay on biases and norm gains (1-D tensors): decaying them hurts and saves nothing.
    split = []
    for g in groups:
        for decay in (True, False):
            params = [p for p in g["params"] if (p.ndim >= 2) == decay]
            if params:
                split.append({**g, "params": params, "weight_decay": t.weight_decay if decay else 0.0})
    kwargs = {"lr": t.lr, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_eps}
    name = t.optimizer
    if name.startswith("paged_") and device.type != "cuda":
        # Paged optimizers page state to host memory via CUDA unified memory; on CPU there is nothing to page.
        name = {"paged_adamw_32bit": "adamw", "paged_adamw_8bit": "adamw_8bit"}[name]
        print(f"sidetune: train.optimizer={t.optimizer} needs CUDA; using {name} on CPU")
    if name == "adamw":
        return torch.optim.AdamW(split, fused=device.type == "cuda", **kwargs)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(split, **kwargs)


def _mixed_precision(t: TrainConfig) -> str | None:
    if t.mixed_precision != "auto":
        return t.mixed_precision
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None  # under `accelerate launch`: its config decides
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


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
        mixed_precision=_mixed_precision(t),
        gradient_accumulation_steps=t.grad_accum,
        log_with=t.tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Shuffling seeded by (seed, epoch): a resumed run sees the same batches as an uninterrupted one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(t.seed)
    s = setup(cfg, accelerator.device)
    model, method = s.model, s.method
    module = training_module(model, cfg)

    collate = data_lib.collator(cfg.data.task, s.tokenizer)
    # The loader's own generator: starting an epoch's iterator then draws no number from the global RNG, which
    # feeds dropout; otherwise a resumed run's dropout masks would be shifted by one draw.
    train_loader = DataLoader(s.data.train, batch_size=t.batch_size, shuffle=True, collate_fn=collate,
                              num_workers=t.num_workers, generator=torch.Generator().manual_seed(t.seed))
    steps_per_epoch = math.ceil(len(train_loader) / t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    optimizer = make_optimizer(model, method, t, accelerator.device)
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)
    # Imported here: transformers.optimization pulls in peft when it is installed (seconds of import for every
    # command that only needs the model-building half of this module, e.g. `sidetune profile`'s workers).
    from transformers import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler({"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler],
                              optimizer, num_warmup_steps=warmup * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    module, optimizer, train_loader, scheduler = accelerator.prepare(module, optimizer, train_loader, scheduler)
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
                      f"parameters ({100 * n_trainable / n_total:.2f}%), {total_steps} steps")

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
                loss = module(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            tokens += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            counter.step = step
            bar.update(1)
            if step % t.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - last_log
                row = {"step": step, "loss": (loss_sum / micro_batches).item(), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": tokens.item() * accelerator.num_processes / elapsed,
                       **peak_memory(accelerator.device)}
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                mem=short(peak_memory(accelerator.device)))
                loss_sum.zero_()
                tokens.zero_()
                micro_batches, last_log = 0, time.perf_counter()
            if eval_loaders and t.eval_every and step % t.eval_every == 0 and step < total_steps:
                eval_metrics = evaluate(module, eval_loaders, cfg.data.task, accelerator)
                log.write({"step": step, **eval_metrics})
                module.train()
                last_log = time.perf_counter()  # eval time is not training throughput
            if t.save_every and step % t.save_every == 0:
                accelerator.save_state(str(out / "checkpoints" / f"step-{step:07d}"))
            if step >= total_steps:
                break
    bar.close()

    if eval_loaders:
        eval_metrics = evaluate(module, eval_loaders, cfg.data.task, accelerator)
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
def evaluate(module: nn.Module, loaders: dict[str, DataLoader], task: str,
             accelerator: Accelerator | None = None) -> dict[str, float]:
    """eval_loss for every task; eval_accuracy for classification, and for causal LM with label choices;
    eval_perplexity for LM tasks. Losses are averaged per example (classification) or per target token (LM)."""
    module.eval()
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
    loss_sum, count, correct, seen = 0.0, 0, 0, 0
    for batch in loaders.get("eval", ()):
        out = module(**batch)
        labels = batch["labels"]
        if task == "classification":
            n = labels.shape[0]
            preds, golds = gather((out.logits.argmax(-1), labels))
            correct += (preds == golds).sum().item()
            seen += golds.numel()
        else:
            # transformers' LM losses are means over target tokens; weight each batch by its count.
            targets = labels[:, 1:] if task == "causal_lm" else labels
            n = (targets != -100).sum()
        loss_sum += gather(out.loss.detach().float() * n).sum().item()
        count += gather(torch.as_tensor(n, device=out.loss.device)).sum().item()
    metrics: dict[str, float] = {}
    if count:
        metrics["eval_loss"] = loss_sum / count
        if task != "classification":
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
    s = setup(cfg, torch.device(device), with_data=False)
    load_trainable(s.model, weights)
    s.model.eval()
    return s.model, s.tokenizer


def evaluate_run(run_dir: str | Path, data_path: str | None = None) -> dict[str, float]:
    """Evaluate a finished run on its eval data, or on `data_path`."""
    cfg, weights = run_config(run_dir)
    if data_path is not None:
        cfg.data.eval = data_path
    if cfg.data.eval is None:
        raise SidetuneError("this run has no data.eval; pass --data PATH")
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.train))
    s = setup(cfg, accelerator.device)
    load_trainable(s.model, weights)
    module = accelerator.prepare(forward_module(s.model, cfg))
    loaders = _eval_loaders(s, cfg.train.eval_batch_size, data_lib.collator(cfg.data.task, s.tokenizer), accelerator)
    return evaluate(module, loaders, cfg.data.task, accelerator)


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
