"""The one training loop, on accelerate. Every method runs through it unchanged.

Reading order: `train` is the loop (it builds everything through `session.build`, where all input errors surface
before the run directory is touched, and steps with `session.train_step`); `evaluate` computes the eval metrics;
`save_trainable` / `load_run` write and read the trainable set.
"""

from __future__ import annotations

import fcntl
import json
import math
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sidetune import checkpoint
from sidetune.config import Config, load_config, save_config
from sidetune.decoding import GenerationEval
from sidetune.distributed import agree, announce_failure, clip_grad_norm, peer_failure, total_grad_norm
from sidetune.errors import SidetuneError, one_line
from sidetune.memory import TrainingPeak, short
from sidetune.methods import trainable_parameters
from sidetune.plot import CURVES, plot_runs
from sidetune.profiling.shard import fsdp_optimizer_refusal, fsdp_refusal
from sidetune.session import Setup, build, forward_module, mixed_precision, rebuild, train_step
from sidetune.tasks import Task, batch_tokens

# What marks a directory as holding a run (the lock file does not: it stays behind, harmless, after every run).
RUN_NAMES = (checkpoint.RUN_MANIFEST, "config.yaml", "metrics.jsonl", "checkpoints", "final", "logs")
# The top-level files sidetune writes, listed in the run manifest (curves.png: `sidetune plot`'s PNG, at the end).
_RUN_FILES = ("config.yaml", "metrics.jsonl", CURVES)


def train(cfg: Config) -> dict[str, float]:
    """Train with `cfg`; write config.yaml, metrics.jsonl, checkpoints and final/ to train.output_dir. Returns the
    final eval metrics (empty without eval data).

    Every check that can refuse the run (config, data, model, the checkpoint to resume from, the output directory
    and its lock) runs before the first file is written."""
    t = cfg.train
    out = Path(t.output_dir)
    _check_launch(cfg)
    accelerator = Accelerator(
        # No CUDA device: the processes of `accelerate launch --multi_gpu` / torchrun run on the CPU over gloo
        # (accelerate's own MULTI_CPU mode would need mpirun).
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision(t, model_dtype=cfg.model.dtype),
        gradient_accumulation_steps=t.grad_accum,
        log_with=t.tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # Shuffling seeded by (seed, epoch): a resumed run sees the same batches as an uninterrupted one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise SidetuneError("FSDP1 (fsdp_version: 1) is not supported: sidetune's checkpoints gather FSDP2's sharded "
                            "trainable tensors; launch with recipes/accelerate/fsdp.yaml (fsdp_version: 2)")
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
    # max_steps=0 is a run with no optimizer step (the loop below never starts): evaluate, save final/.
    total_steps = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
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

    # The checkpoint is verified, checked against this config and loaded before anything is written.
    step, resume_state, resume_dir, fresh_start = 0, None, None, False
    if t.resume:
        resume_dir, skipped = _resolve_resume(t.resume, out)
        skipped_note = (f"skipped incomplete checkpoint(s) {', '.join(p.name for p in skipped)} (saves that never "
                        f"finished)") if skipped else ""
        if resume_dir is None:
            # Killed before its first checkpoint: the same run starts over (its own files are replaced).
            fresh_start = (out / checkpoint.RUN_MANIFEST).is_file()
            if fresh_start and (out / "final" / checkpoint.MANIFEST).is_file():
                raise SidetuneError(f"train.resume=latest: the run in {out} has finished (final/ is written) and has "
                                    f"no checkpoint to continue from; train it again with train.overwrite=true")
            accelerator.print(f"sidetune: train.resume=latest found no complete checkpoint in {out / 'checkpoints'}"
                              f"{'; ' + skipped_note if skipped_note else ''}; starting from step 0")
        else:
            if skipped_note:
                accelerator.print(f"sidetune: train.resume=latest {skipped_note}; using {resume_dir.name}")
            resume_state = checkpoint.read_state(resume_dir)
            _check_compatible(resume_state, cfg, resume_dir, accelerator.num_processes)
            step = resume_state["step"]
            if step > total_steps:
                raise SidetuneError(f"train.resume: {resume_dir} is at step {step}, past this run's {total_steps} "
                                    f"steps (train.max_steps={t.max_steps}); raise train.max_steps above {step} to "
                                    f"train on")
            _load_checkpoint(resume_dir, model, optimizer, scheduler, accelerator.process_index)
    continuing = fresh_start or (resume_dir is not None
                                 and resume_dir.resolve().parent == (out / "checkpoints").resolve())
    lock = _claim_output_dir(out, continuing, t.overwrite, accelerator)  # held until the run ends
    global_batch = t.batch_size * t.grad_accum * accelerator.num_processes

    try:
        # First writes.
        kept_rows = 0
        if accelerator.is_main_process:
            # The global batch is a property of the launch, not of config.yaml: recorded here beside it.
            checkpoint.write_json(out / checkpoint.RUN_MANIFEST, {
                "written_by": "sidetune", "files": list(_RUN_FILES), "num_processes": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type.value), "batch_size": t.batch_size,
                "grad_accum": t.grad_accum, "global_batch": global_batch})
            checkpoint.write_text(out / "config.yaml", yaml_config(cfg))
            if continuing:
                rows = resume_state.get("metrics_rows") if resume_state is not None else 0
                kept_rows = _truncate_metrics(out / "metrics.jsonl", rows, step)
        if t.tracker:
            accelerator.init_trackers("sidetune", config=_flat(cfg.to_dict()))
        if resume_dir is not None:
            accelerator.print(f"sidetune: resumed from {resume_dir} at step {step}")

        log = _MetricsLog(out / "metrics.jsonl", accelerator, kept_rows)
        n_trainable = sum(p.numel() for p in trainable_parameters(model).values())
        n_total = sum(p.numel() for p in model.parameters())
        accelerator.print(f"sidetune: {cfg.method.name} on {cfg.model.name}: {n_trainable:,} trainable of {n_total:,} "
                          f"parameters ({100 * n_trainable / n_total:.2f}%), {total_steps} steps; global batch "
                          f"{global_batch} = batch_size {t.batch_size} x "
                          f"grad_accum {t.grad_accum} x {accelerator.num_processes} process(es)")

        def save(at: int) -> Path:
            return _save_checkpoint(out / "checkpoints", at, accelerator, model, optimizer, scheduler, cfg, log)

        bar = tqdm(total=total_steps, initial=step, disable=not (t.progress and accelerator.is_main_process),
                   desc="train", dynamic_ncols=True)
        # Loss and token counts stay on the device between log rows: reading them every micro-batch would force a
        # host-device sync per step and stall the GPU queue. The one read per optimizer step is the finiteness check.
        loss_sum = torch.zeros((), device=accelerator.device)
        tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
        micro_batches, last_log = 0, time.perf_counter()
        guard = _FiniteGuard(s.trainable, t, accelerator)
        peak = TrainingPeak(accelerator.device)  # the logged peak: the training steps', not the build's or an eval's
        accelerator.print(f"sidetune: the logged peak memory covers {peak.covers}")
        peak.start()
        eval_metrics: dict[str, float] = {}
        module.train()
        with _StopSignals() as stop:
            try:
                while step < total_steps:
                    epoch, done_in_epoch = divmod(step, steps_per_epoch)
                    train_loader.set_epoch(epoch)
                    batches = train_loader
                    if done_in_epoch:
                        batches = accelerator.skip_first_batches(train_loader, done_in_epoch * t.grad_accum)
                    for batch in batches:
                        with accelerator.accumulate(module):
                            # The guard clips the synchronised gradients (last micro-batch of an accumulation) and
                            # checks loss and gradient norm before the optimizer step.
                            train_step(module, batch, optimizer, s.trainable, t.max_grad_norm,
                                       scheduler=scheduler, backward=guard.backward(step + 1), clip=None)
                        tokens += batch_tokens(batch)  # real tokens: padding, also of packed rows, left out
                        if not accelerator.sync_gradients:
                            continue
                        step += 1
                        window, n = guard.take_window()
                        if window is not None:
                            loss_sum += window
                            micro_batches += n
                        bar.update(1)
                        if step % t.log_every == 0 or step == total_steps:
                            elapsed = time.perf_counter() - last_log
                            # Every process logs the same steps, so these collectives line up; the row is the mean loss
                            # over all processes and the tokens of all of them.
                            mean_loss = agree(loss_sum / max(micro_batches, 1)) / accelerator.num_processes
                            all_tokens = agree(tokens.clone())  # agree: sums, and stops if a process failed
                            row = {"step": step, "loss": mean_loss.item(), "lr": scheduler.get_last_lr()[0],
                                   "tokens_per_s": all_tokens.item() / elapsed, **peak.row()}
                            if t.skip_nonfinite:
                                row["skipped_nonfinite"] = guard.skipped
                            log.write(row)
                            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                            mem=short(row))
                            loss_sum.zero_()
                            tokens.zero_()
                            micro_batches, last_log = 0, time.perf_counter()
                        if eval_loaders and t.eval_every and step % t.eval_every == 0 and step < total_steps:
                            peak.pause()
                            eval_metrics = evaluate(module, eval_loaders, task, accelerator)
                            peak.resume()
                            log.write({"step": step, **eval_metrics})
                            module.train()
                            last_log = time.perf_counter()  # eval time is not training throughput
                        saved = bool(t.save_every and step % t.save_every == 0)
                        if saved:
                            save(step)
                        if stop.requested(accelerator):
                            where = checkpoint.step_dir(out / "checkpoints", step) if saved else save(step)
                            bar.close()
                            accelerator.print(f"sidetune: stopped by {stop.name} at step {step}; checkpoint {where}; "
                                              f"continue with train.resume=latest")
                            raise checkpoint.Stopped(stop.signum)
                        if step >= total_steps:
                            break
            except torch.OutOfMemoryError as e:
                # Left for the other processes too, which stop with it instead of waiting in a collective.
                raise SidetuneError(announce_failure(_oom_message(e, cfg, step + 1, accelerator.device))) from None
            except Exception as e:
                peer_failure(e)  # a collective broke because another process stopped: its one line instead
                raise
        bar.close()

        if eval_loaders:
            eval_metrics = evaluate(module, eval_loaders, task, accelerator)
            log.write({"step": step, **eval_metrics})
        state = trainable_state(model)  # every process: under FSDP gathering the shards is a collective
        curves = ""
        if accelerator.is_main_process:
            save_trainable(model, cfg, out / "final", state)
            if log.rows:  # a run with no step and no eval (max_steps=0, data.eval=null) has nothing to plot
                try:
                    curves = f", curves in {plot_runs([out], out / CURVES)}"
                except Exception as e:  # the weights are saved; a failed picture must not fail (or hang) the run
                    print(f"sidetune: could not write {out / CURVES} ({one_line(e, 100)}); the run is complete")
        accelerator.wait_for_everyone()
        # accelerate's end_training() would also destroy the process group. That leaves DDP's Reducer its last
        # owner, and freeing the Reducer when this frame ends then deadlocks in gloo's destructor (py-spy: the main
        # thread joins gloo's worker thread holding the GIL; the worker waits for the GIL to free a barrier's
        # tensors), so CI saw 2-process runs print "done" and hang. The trackers are finished; the group lives
        # until `sidetune train`'s workers leave with os._exit (cli.main).
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.print(f"sidetune: done; final weights in {out / 'final'}{curves}")
        if eval_metrics:
            accelerator.print(json.dumps({"step": step, **eval_metrics}))
        return eval_metrics
    finally:
        if lock is not None:
            lock.close()  # releases the flock
        # Nor is the process group destroyed here (see the trackers above): `sidetune train`'s workers leave with
        # os._exit (cli.main), which never runs gloo's destructor.


# ---------------------------------------------------------------------------------------------------------------------
# Faults during the run: non-finite numbers, signals, out of memory


class _FiniteGuard:
    """Clips the synchronised gradients and checks the accumulation window's loss and the gradient norm before the
    optimizer step: a non-finite one stops the run (one line), or with train.skip_nonfinite drops that step's
    gradients (the optimizer then leaves every parameter as it was) and counts it."""

    def __init__(self, params: list[nn.Parameter], t, accelerator: Accelerator) -> None:
        self.params, self.t, self.accelerator = params, t, accelerator
        self.window: torch.Tensor | None = None
        self.n = 0
        self.skipped = 0
        self.dropped = False

    def backward(self, step: int):
        def backward(loss: torch.Tensor) -> None:
            self.accelerator.backward(loss)
            detached = loss.detach().float()
            self.window = detached if self.window is None else self.window + detached
            self.n += 1
            if self.accelerator.sync_gradients:
                self._check(step)
        return backward

    def _check(self, step: int) -> None:
        acc = self.accelerator
        # sidetune.distributed: one unscale under fp16, and FSDP2's DTensor norm made a plain (global) tensor.
        if self.t.max_grad_norm > 0:
            norm = clip_grad_norm(acc, self.params, self.t.max_grad_norm)
        elif acc.scaler is None:
            norm = total_grad_norm(self.params)
        else:
            norm = None
        # Under fp16 the gradient scaler meets inf gradients by design (it skips the step and lowers its scale).
        check = self.window if norm is None or acc.scaler is not None else self.window + norm.to(self.window.device)
        bad = ~torch.isfinite(check)
        if acc.num_processes > 1:
            bad = agree(bad.long()) > 0  # watches for a process that stopped (sidetune.distributed)
        self.dropped = bool(bad.item())
        if not self.dropped:
            return
        what = "loss" if not torch.isfinite(self.window) else "gradient norm"
        if not self.t.skip_nonfinite:
            last = checkpoint.list_checkpoints(Path(self.t.output_dir) / "checkpoints").complete
            keep = f"the last good checkpoint is {last[-1][1]} (train.resume=latest)" if last else "no checkpoint yet"
            raise SidetuneError(f"non-finite {what} at step {step}: stopped; {keep}. Try a lower train.lr (now "
                                f"{self.t.lr:g}), train.max_grad_norm=1.0, train.mixed_precision=bf16 rather than "
                                f"fp16, or train.skip_nonfinite=true to skip such steps")
        self.skipped += 1
        for p in self.params:
            p.grad = None  # the optimizer skips parameters without gradients: this step changes nothing

    def take_window(self) -> tuple[torch.Tensor | None, int]:
        """The window's summed loss and micro-batch count (None when the step was skipped), then reset."""
        window, n = (None, 0) if self.dropped else (self.window, self.n)
        self.window, self.n, self.dropped = None, 0, False
        return window, n


class _StopSignals:
    """SIGTERM and Ctrl-C ask the loop to save a checkpoint and stop after the current optimizer step; a second one
    interrupts at once (checkpoints are atomic, so nothing is left half-written)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, accelerator: Accelerator) -> bool:
        flag = self.signum is not None
        if accelerator.num_processes > 1:  # every process stops at the same step, or the collectives would hang
            votes = agree(torch.tensor(int(flag), device=accelerator.device))
            flag = votes.item() > 0
            if flag and self.signum is None:
                self.signum = signal.SIGTERM
        return flag

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _check_launch(cfg: Config) -> None:
    """Refuse, in one line and before any work, the `accelerate launch` setups sidetune cannot run correctly.
    accelerate itself would, on a machine without CUDA, silently ignore an FSDP or DeepSpeed config and run DDP."""
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise SidetuneError("DeepSpeed launches are not supported (sidetune's loop, checkpoints and 4-bit bases are "
                            "untested with ZeRO); use recipes/accelerate/multi_gpu.yaml (DDP) or fsdp.yaml")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if not torch.cuda.is_available():
            raise SidetuneError("FSDP needs CUDA GPUs: accelerate runs FSDP only on accelerators (without one it "
                                "would quietly fall back to DDP); on CPU use recipes/accelerate/cpu_ddp.yaml")
        if cfg.data.eval_generate:
            raise SidetuneError("data.eval_generate=true with FSDP is not supported: each process decodes its own "
                                "examples, for a different number of forward passes, and FSDP's all-gathers need the "
                                "same number on every process; launch with DDP (multi_gpu.yaml), or score the "
                                "finished run with `sidetune eval RUN` (one process)")
        refused = fsdp_refusal(cfg.model.quantize)
        if refused:
            raise SidetuneError(f"{refused}; shard a 16-bit base (model.quantize=null) or train the 4-bit base with "
                                f"DDP (multi_gpu.yaml)")
        if fsdp_optimizer_refusal(cfg.train.optimizer):
            raise SidetuneError(fsdp_optimizer_refusal(cfg.train.optimizer))


def _oom_message(e: BaseException, cfg: Config, step: int, device: torch.device) -> str:
    tried = re.search(r"Tried to allocate ([\d.]+ \w+)", str(e))
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        more = f" and {tried.group(1)} more was needed" if tried else ""
        where = f"{peak:.2f} GiB were allocated at the peak{more}, on a {total:.1f} GiB GPU"
        vram = f"{total:.0f}GiB"
    else:
        where, vram = "the host ran out of memory", "<GiB>"
    return (f"out of memory at step {step}: {where}; see what fits with `sidetune plan --model {cfg.model.name} "
            f"--vram {vram} --batch {cfg.train.batch_size} --seq {cfg.data.max_length} --methods {cfg.method.name}` "
            f"(or lower train.batch_size, raise train.grad_accum, set train.gradient_checkpointing=true)")


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def _eval_loaders(s: Setup, batch_size: int, collate,
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
        metrics["eval_accuracy"], metrics["eval_examples"] = correct / seen, seen
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
    for batch in loader:
        labels = batch.pop("labels")
        example, choice, gold = batch.pop("example"), batch.pop("choice"), batch.pop("gold")
        logits = module(**batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none").sum(1)
        for e, c, g, v in zip(*(gather(x).tolist() for x in (example, choice, gold, -nll))):
            scores.setdefault(e, {})[c] = v
            golds[e] = g
    correct = sum(max(s, key=s.get) == golds[e] for e, s in scores.items())
    return correct / max(len(scores), 1), len(scores)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and saved runs


def _is_sharded(t: torch.Tensor) -> bool:
    """An FSDP2-sharded tensor (DTensor): reading or writing it whole is a collective on every process."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable set, whole, on the CPU. Under FSDP every process must call it: each sharded tensor is gathered
    (`full_tensor`, an all-gather). The trainable set is small, so holding it whole once is cheap."""
    return {n: (p.detach().full_tensor() if _is_sharded(p) else p.detach()).contiguous().cpu()
            for n, p in trainable_parameters(model).items()}


def save_trainable(model: nn.Module, cfg: Config, out: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The trainable set as safetensors plus the full resolved config: enough to rebuild the model with `load_run`.
    Written like a checkpoint: into a temporary directory beside `out`, with a manifest, then renamed. `state`: the
    `trainable_state` already gathered by every process (FSDP)."""
    state = trainable_state(model) if state is None else state
    tmp = checkpoint.begin(out)
    checkpoint.write_files(tmp, {
        checkpoint.TRAINABLE: lambda p: save_file(state, str(p), metadata={"method": cfg.method.name}),
        "config.yaml": lambda p: save_config(cfg, p)})
    checkpoint.commit(tmp, out, None)


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy a trainable set from safetensors into `model`; one line if the file is missing, unreadable or does not
    fit this model's trainable set."""
    if not path.is_file():
        raise SidetuneError(f"{path} is missing; the run or checkpoint is incomplete (pass another one)")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise SidetuneError(f"{path} is not a readable safetensors file, truncated or damaged ({one_line(e, 100)})") \
            from None
    params = trainable_parameters(model)
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise SidetuneError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                            f"was it saved with a different method config?")
    for name, tensor in state.items():
        if tensor.shape != params[name].shape:
            raise SidetuneError(f"{path}: {name} has shape {list(tensor.shape)} but this model's is "
                                f"{list(params[name].shape)}; was it saved with a different method config (e.g. "
                                f"method.r)?")
    with torch.no_grad():
        for name, tensor in state.items():
            p = params[name]
            if _is_sharded(p):  # FSDP: every process holds the whole file and keeps its own shard of it
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(tensor.to(p.device, p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(tensor)


def _save_checkpoint(root: Path, step: int, accelerator: Accelerator, model: nn.Module, optimizer, scheduler,
                     cfg: Config, log: _MetricsLog) -> Path:
    """An atomic checkpoint: every process writes its RNG state into the temporary directory, then the main process
    writes weights, optimizer and scheduler state, the manifest, and renames it into place; all processes wait."""
    final = checkpoint.step_dir(root, step)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        checkpoint.begin(final)
    accelerator.wait_for_everyone()
    checkpoint.write_files(tmp, checkpoint.rng_writers(accelerator.process_index))
    # Gathered by every process (collectives under FSDP), written by the main one.
    weights, optim = trainable_state(model), optimizer_state(model, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.write_files(tmp, {
            checkpoint.TRAINABLE: lambda p: save_file(weights, str(p)),
            checkpoint.OPTIMIZER: lambda p: torch.save(optim, p),
            checkpoint.SCHEDULER: lambda p: torch.save(scheduler.state_dict(), p)})
        checkpoint.commit(tmp, final, {"step": step, "metrics_rows": log.rows,
                                       "num_processes": accelerator.num_processes, "config": cfg.to_dict()})
        if cfg.train.save_total_limit:
            checkpoint.prune(root, cfg.train.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, rank: int) -> None:
    """Weights, optimizer, scheduler and this process's RNG state from a verified checkpoint."""
    load_trainable(model, path / checkpoint.TRAINABLE)
    for name, target in ((checkpoint.OPTIMIZER, optimizer), (checkpoint.SCHEDULER, scheduler)):
        state = checkpoint.load_tensors(path / name)
        try:
            if target is optimizer:
                load_optimizer_state(model, optimizer, state)
            else:
                target.load_state_dict(state)
        except Exception as e:
            raise SidetuneError(f"train.resume: {path / name} does not fit this run's {name.split('.')[0]} "
                                f"({one_line(e, 100)}); resume with the checkpoint's config") from None
    checkpoint.restore_rng(path, rank)


def _sharded_optimizer(model: nn.Module) -> bool:
    return any(_is_sharded(p) for p in trainable_parameters(model).values())


def optimizer_state(model: nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer state to save. Under FSDP its tensors are shards: every process calls this, and gets the whole
    state (torch.distributed.checkpoint's full_state_dict, keyed by parameter name), as small as the trainable set."""
    if not _sharded_optimizer(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    return get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """`optimizer_state` back: under FSDP every process reads the whole state and keeps its own shards."""
    if not _sharded_optimizer(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))


# Keys that may change between a checkpoint and its resumed run without changing what the checkpoint holds.
_RESUME_FREE = {"model.attn_implementation", "model.tokenizer"}


def _check_compatible(state: dict[str, Any], cfg: Config, path: Path, num_processes: int) -> None:
    """The checkpoint's model, method and label set must be this run's: anything else would load wrong shapes, or
    the right shapes with the wrong meaning."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise SidetuneError(f"train.resume: {path / checkpoint.STATE} has no config; was it written by sidetune?")
    now = cfg.to_dict()
    pairs = [(f"{sec}.{k}", v, (saved.get(sec) or {}).get(k, "<unset>")) for sec in ("model", "method")
             for k, v in now[sec].items()]
    pairs += [(f"data.{k}", now["data"][k], (saved.get("data") or {}).get(k)) for k in ("task", "num_labels")]
    for key, value, before in pairs:
        if key not in _RESUME_FREE and _jsonable(value) != before:
            raise SidetuneError(f"train.resume: {path} was trained with {key}={before!r} but this config has "
                                f"{key}={value!r}; resume with the checkpoint's settings, or start a new run")
    if state.get("num_processes", 1) != num_processes:
        raise SidetuneError(f"train.resume: {path} was saved by {state.get('num_processes')} process(es), this run "
                            f"has {num_processes}; resume with the same number of processes")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _resolve_resume(resume: str, out: Path) -> tuple[Path | None, list[Path]]:
    """The verified checkpoint to resume from (None: latest found none complete), and (for latest) the incomplete
    ones passed over."""
    if resume != "latest":
        path = Path(resume)
        checkpoint.verify(path)
        return path, []
    listing = checkpoint.list_checkpoints(out / "checkpoints")
    if not listing.complete:
        return None, listing.incomplete
    path = listing.complete[-1][1]
    try:
        checkpoint.verify(path)
    except SidetuneError as e:
        if len(listing.complete) > 1:
            raise SidetuneError(f"{e} (the one before is train.resume={listing.complete[-2][1]})") from None
        raise
    newest = listing.complete[-1][0]
    skipped = [p for p in listing.incomplete if int(re.sub(r"\D", "", p.name) or 0) > newest]
    return path, skipped


def _claim_output_dir(out: Path, continuing: bool, overwrite: bool, accelerator: Accelerator):
    """Refuse a directory that holds another run (unless resuming it or train.overwrite=true) or that another run is
    using (its lock); take the lock; with train.overwrite, remove the files the earlier run's manifests list.
    Main process only; the others learn the verdict, so no process is left waiting."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = _claim(out, continuing, overwrite)
        except SidetuneError as e:
            error = e
    if accelerator.num_processes > 1:
        votes = accelerator.reduce(torch.tensor(int(error is not None), device=accelerator.device), reduction="sum")
        if votes.item() and error is None:
            raise SidetuneError(f"the main process refused train.output_dir={out}")
    if error is not None:
        raise error
    return lock


def _claim(out: Path, continuing: bool, overwrite: bool):
    lock_path = out / checkpoint.LOCK
    busy = (f"another sidetune run is using train.output_dir={out} (it holds {lock_path}); wait for it to finish "
            f"or choose another train.output_dir")
    lock = None
    if lock_path.is_file():
        lock = _try_lock(lock_path, "a")  # opening for append changes nothing of an existing file
        if lock is None:
            raise SidetuneError(busy)
    found = [name for name in RUN_NAMES if (out / name).exists()]
    if found and not continuing:
        if not overwrite:
            raise SidetuneError(f"train.output_dir={out} already holds a run ({', '.join(found)}); continue it with "
                                f"train.resume=latest, replace it with train.overwrite=true, or choose another "
                                f"train.output_dir")
        listed = set(_listed_run_files(out))
        foreign = [n for n in _RUN_FILES if (out / n).exists() and n not in listed]
        if foreign:
            raise SidetuneError(f"train.overwrite=true, but {out / foreign[0]} was not written by sidetune (no "
                                f"{checkpoint.RUN_MANIFEST} lists it); move it away or choose another "
                                f"train.output_dir")
    if (out / CURVES).exists() and CURVES not in _listed_run_files(out):
        # The run writes curves.png at its end: it must not replace a file of someone else's.
        raise SidetuneError(f"train.output_dir={out} holds {CURVES}, which sidetune did not write (no "
                            f"{checkpoint.RUN_MANIFEST} lists it) and the run would replace; move it away or choose "
                            f"another train.output_dir")
    if out.exists() and not out.is_dir():
        raise SidetuneError(f"train.output_dir={out} is a file; choose a directory")
    out.mkdir(parents=True, exist_ok=True)
    if lock is None:
        lock = _try_lock(lock_path, "a")
        if lock is None:
            raise SidetuneError(busy)
    if found and not continuing:
        _remove_run(out)
    return lock


def _try_lock(path: Path, mode: str):
    f = path.open(mode)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _listed_run_files(out: Path) -> list[str]:
    return [f for f in checkpoint.run_files(out) if f in _RUN_FILES]


def _remove_run(out: Path) -> None:
    """train.overwrite=true: delete what the earlier run wrote (as its manifests list it), nothing else."""
    for name in _listed_run_files(out):
        (out / name).unlink(missing_ok=True)
    (out / checkpoint.RUN_MANIFEST).unlink(missing_ok=True)
    listing = checkpoint.list_checkpoints(out / "checkpoints")
    for _, path in listing.complete:
        checkpoint.remove_written(path)
    for path in listing.incomplete:
        checkpoint.remove_tmp(path)
    if (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir()):
        (out / "checkpoints").rmdir()
    if (out / "final" / checkpoint.MANIFEST).is_file():
        checkpoint.remove_written(out / "final")


def _truncate_metrics(path: Path, rows: int | None, step: int) -> int:
    """Keep the rows written before the checkpoint (its row count; else the rows up to its step): a resumed run then
    logs every step once. Returns the rows kept."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
    if rows is not None:
        keep = lines[:rows]
    else:
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass
    checkpoint.write_text(path, "".join(keep))
    return len(keep)


def yaml_config(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def run_config(run_dir: str | Path) -> tuple[Config, Path]:
    """The config and trainable weights of a finished run (its directory or its final/ directory)."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "final", run_dir):
        if (candidate / checkpoint.MANIFEST).is_file():
            checkpoint.verify(candidate, key="run")  # a damaged or tampered final/ is refused, not loaded
        if (candidate / "trainable.safetensors").is_file() and (candidate / "config.yaml").is_file():
            return load_config(candidate / "config.yaml"), candidate / "trainable.safetensors"
    raise SidetuneError(f"{str(run_dir)!r} is not a finished sidetune run (no final/trainable.safetensors)")


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Rebuild a trained model from its run directory: base model + method + trained weights, in eval mode."""
    cfg, weights = run_config(run_dir)
    s = rebuild(cfg, torch.device(device))
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
    cfg.data.packing = False  # packing shapes the training rows only, which evaluation never reads
    if cfg.data.eval is None:
        raise SidetuneError("this run has no data.eval; pass --data PATH")
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.train, model_dtype=cfg.model.dtype))
    s = build(cfg, accelerator.device)
    load_trainable(s.model, weights)
    module = accelerator.prepare(forward_module(s.model, cfg))
    loaders = _eval_loaders(s, cfg.train.eval_batch_size, s.task.collator(s.tokenizer), accelerator)
    return evaluate(module, loaders, s.task, accelerator)


class _MetricsLog:
    """metrics.jsonl (one JSON object per event) plus accelerate's trackers, main process only."""

    def __init__(self, path: Path, accelerator: Accelerator, rows: int = 0) -> None:
        self.path, self.accelerator = path, accelerator
        self.rows = rows  # rows in the file: a checkpoint records it, so a resume keeps exactly those

    def write(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
