"""The one training loop, on accelerate. Every method runs through it unchanged.

Reading order: `train` runs the phases in order. Everything that can refuse the run happens before the output
directory is touched: `RunDir` checks that it can be written and which checkpoint `train.resume` names, `build` reads
the data and the model (every input error surfaces there), `RunDir.check` the checkpoint's fit and the free space,
and only then `RunDir.claim` takes the directory. `_run_steps` is the loop (`session.train_step` per optimizer step,
with the fault guards below); `_finish` evaluates and saves final/. What is written where is `sidetune.rundir`'s;
the metrics are `sidetune.evaluate`'s.
"""

from __future__ import annotations

import json
import math
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sidetune import checkpoint, preference
from sidetune.config import Config
from sidetune.distributed import agree, announce_failure, clip_grad_norm, peer_failure, total_grad_norm
from sidetune.errors import SidetuneError, one_line
from sidetune.evaluate import eval_loaders, evaluate
from sidetune.memory import TrainingPeak, short
from sidetune.methods import trainable_parameters
from sidetune.plot import CURVES, plot_runs
from sidetune.profiling.shard import fsdp_optimizer_refusal, fsdp_refusal
from sidetune.rundir import ResumePoint, RunDir, init_from
from sidetune.session import Setup, build, mixed_precision, train_step
from sidetune.tasks import batch_tokens


def train(cfg: Config) -> dict[str, float]:
    """Train with `cfg`; write config.yaml, metrics.jsonl, checkpoints and final/ to train.output_dir. Returns the
    final eval metrics (empty without eval data)."""
    _check_launch(cfg)
    accelerator = _accelerator(cfg)
    run = RunDir(cfg.train.output_dir, accelerator)  # writable? an interrupted overwrite to undo? (before any build)
    resume = run.resume_point(cfg.train.resume, cfg.train.overwrite)
    set_seed(cfg.train.seed)
    # A resumed run loads the checkpoint's weights and changed base over the init: a data-dependent init is skipped.
    s = build(cfg, accelerator.device, with_optimizer=True, reload=resume.path is not None)
    cfg = run.resolved(s.cfg)  # what the build resolved, and the data files' absolute paths: recorded in the run
    loop = _prepare(s, cfg, accelerator)
    run.check(cfg, resume, loop.total_steps, _save_bytes(s))
    if resume.path is not None:
        run.load_checkpoint(resume, s, loop.optimizer, loop.scheduler)
    elif cfg.model.init_from:
        init_from(s.model, s.method, cfg)  # the trained weights of a finished run over the init (DPO after SFT)
    run.claim(run.continuing(resume), cfg.train.overwrite)  # the first write; held until the run ends
    try:
        run.start(cfg, resume, loop.global_batch)
        _reference_table(loop, run, resume)
        _announce(loop, resume)
        step, eval_metrics = _run_steps(loop, run, resume.step)
        return _finish(loop, run, step, eval_metrics)
    except (Exception, KeyboardInterrupt):
        run.fail()  # an earlier run this one was replacing comes back, if this one never saved
        raise
    finally:
        run.close()
        # Nor is the process group destroyed here (see `_finish`): `sidetune train`'s workers leave with os._exit
        # (cli.main), which never runs gloo's destructor.


def _accelerator(cfg: Config) -> Accelerator:
    t = cfg.train
    out = Path(t.output_dir).expanduser()
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
    return accelerator


@dataclass
class _Loop:
    """What the steps run on, prepared by accelerate."""

    accelerator: Accelerator
    s: Setup
    cfg: Config  # the resolved config (the one recorded in the run)
    module: nn.Module
    optimizer: Any
    loader: Any
    scheduler: Any
    evals: dict[str, Any]
    steps_per_epoch: int
    total_steps: int

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.accelerator.num_processes


def _prepare(s: Setup, cfg: Config, accelerator: Accelerator) -> _Loop:
    t = cfg.train
    collate = s.task.collator(s.tokenizer)
    # The loader's own generator: starting an epoch's iterator then draws no number from the global RNG, which
    # feeds dropout; otherwise a resumed run's dropout masks would be shifted by one draw.
    loader = DataLoader(s.data.train, batch_size=t.batch_size, shuffle=True, collate_fn=collate,
                        num_workers=t.num_workers, generator=torch.Generator().manual_seed(t.seed))
    module, optimizer, loader = accelerator.prepare(s.module, s.optimizer, loader)
    # Counted on the prepared loader: under `accelerate launch` each process sees only its shard of the batches.
    steps_per_epoch = max(1, math.ceil(len(loader) / t.grad_accum))
    # max_steps=0 is a run with no optimizer step (the loop never starts): evaluate, save final/.
    total_steps = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps or int(t.warmup_ratio * total_steps)
    # Imported here: transformers.optimization pulls in peft when it is installed (seconds of import for every
    # command that only needs the model-building half of the package, e.g. `sidetune profile`'s workers).
    from transformers import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler({"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler],
                              optimizer, num_warmup_steps=warmup * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    evals = eval_loaders(s, t.eval_batch_size, collate, accelerator)
    return _Loop(accelerator, s, cfg, module, optimizer, loader, scheduler, evals, steps_per_epoch, total_steps)


def _reference_table(loop: _Loop, run: RunDir, resume: ResumePoint) -> None:
    """A preference run whose method's reference is precomputed (`Method.reference`): the starting model's
    log-probabilities of every training and eval pair, computed once before the first step and written atomically
    into the run directory; a resumed run reads them back (its model is no longer the starting one)."""
    pm = loop.s.preference
    if pm is None or not pm.needs_table:
        return
    acc, s = loop.accelerator, loop.s
    path = run.path / preference.REFERENCE_FILE
    pairs = len(s.data.train) + (len(s.data.eval) if s.data.eval is not None else 0)
    if resume.path is not None:
        if not path.is_file():
            raise SidetuneError(f"train.resume: {path} is missing: the reference log-probabilities this run computed "
                                f"at its start; start the run again (train.overwrite=true)")
        pm.table = preference.read_table(path, pairs)
        acc.print(f"sidetune: the DPO reference log-probabilities are read from {path}")
        return
    acc.print(f"sidetune: computing the DPO reference log-probabilities of {pairs} pairs (method {loop.cfg.method.name}"
              f" has no reference of its own: once, with the starting model)")
    pm.table = preference.compute_table(pm, [s.data.train, s.data.eval], s.task.collator(s.tokenizer),
                                        loop.cfg.train.eval_batch_size, acc.device, acc.autocast)
    run.write_file(path, lambda p: preference.write_table(p, pm.table))


def _save_bytes(s: Setup) -> int:
    """About what a checkpoint and final/ take on disk: fp32 weights and two Adam moments, the changed base, slack."""
    trainable = sum(p.numel() for p in s.trainable) * 4
    changed = sum(s.model.get_parameter(n).nbytes for n in s.method.changed_base(s.model))
    return 4 * trainable + 2 * changed + (16 << 20)


def _announce(loop: _Loop, resume: ResumePoint) -> None:
    acc, t, cfg = loop.accelerator, loop.cfg.train, loop.cfg
    if resume.skipped:
        names = ", ".join(p.name for p in resume.skipped)
        acc.print(f"sidetune: train.resume=latest skipped incomplete checkpoint(s) {names} (saves that never "
                  f"finished)" + (f"; using {resume.path.name}" if resume.path is not None else ""))
    if t.resume == "latest" and resume.path is None:
        acc.print(f"sidetune: train.resume=latest found no complete checkpoint in {Path(t.output_dir) / 'checkpoints'}"
                  f"; starting from step 0")
    if t.tracker:
        acc.init_trackers("sidetune", config=_flat(cfg.to_dict()))
    if resume.path is not None:
        acc.print(f"sidetune: resumed from {resume.path} at step {resume.step}")
    n_trainable = sum(p.numel() for p in trainable_parameters(loop.s.model).values())
    n_total = sum(p.numel() for p in loop.s.model.parameters())
    acc.print(f"sidetune: {cfg.method.name} on {cfg.model.name}: {n_trainable:,} trainable of {n_total:,} "
              f"parameters ({100 * n_trainable / n_total:.2f}%), {loop.total_steps} steps; global batch "
              f"{loop.global_batch} = batch_size {t.batch_size} x grad_accum {t.grad_accum} x "
              f"{acc.num_processes} process(es)")


class _Meter:
    """Loss and token counts between log rows. They stay on the device: reading them every micro-batch would force
    a host-device sync per step and stall the GPU queue. The one read per optimizer step is the finiteness check."""

    def __init__(self, device: torch.device) -> None:
        self.peak = TrainingPeak(device)  # the logged peak: the training steps', not the build's or an eval's
        self.loss_sum = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device, dtype=torch.long)
        self.micro_batches, self.last = 0, time.perf_counter()

    def add(self, window: torch.Tensor | None, n: int) -> None:
        if window is not None:
            self.loss_sum += window
            self.micro_batches += n

    def row(self, loop: _Loop, step: int, guard: _FiniteGuard) -> dict[str, Any]:
        """The log row (every process computes it: the reductions are collectives), then reset."""
        acc = loop.accelerator
        elapsed = time.perf_counter() - self.last
        # The mean loss over all processes and the tokens of all of them.
        # agree: a sum over the processes that stops with another process's failure instead of waiting for it.
        mean_loss = agree(self.loss_sum / max(self.micro_batches, 1)) / acc.num_processes
        all_tokens = agree(self.tokens.clone())
        row = {"step": step, "loss": mean_loss.item(), "lr": loop.scheduler.get_last_lr()[0],
               "tokens_per_s": all_tokens.item() / elapsed, **self.peak.row()}
        if loop.s.preference is not None:  # rewards, reward accuracy and margins (means over the window's pairs)
            row.update(loop.s.preference.take_metrics(agree))
        if loop.cfg.train.skip_nonfinite:
            row["skipped_nonfinite"] = guard.skipped
        self.loss_sum.zero_()
        self.tokens.zero_()
        self.micro_batches, self.last = 0, time.perf_counter()
        return row


def _batches(loop: _Loop, step: int):
    """The rest of the epoch that optimizer step `step` falls in (a resumed run skips what it has seen)."""
    epoch, done_in_epoch = divmod(step, loop.steps_per_epoch)
    loop.loader.set_epoch(epoch)
    if done_in_epoch:
        return loop.accelerator.skip_first_batches(loop.loader, done_in_epoch * loop.cfg.train.grad_accum)
    return loop.loader


def _run_steps(loop: _Loop, run: RunDir, step: int) -> tuple[int, dict[str, float]]:
    """The loop: optimizer steps from `step` to the last, with logging, evaluation, checkpoints and the stop
    signals. Returns the last step and the last eval metrics."""
    acc, t, s = loop.accelerator, loop.cfg.train, loop.s
    bar = tqdm(total=loop.total_steps, initial=step, disable=not (t.progress and acc.is_main_process), desc="train",
               dynamic_ncols=True)
    meter, guard = _Meter(acc.device), _FiniteGuard(s.trainable, t, acc)
    acc.print(f"sidetune: the logged peak memory covers {meter.peak.covers}")
    meter.peak.start()
    eval_metrics: dict[str, float] = {}
    loop.module.train()
    with _StopSignals() as stop:
        try:
            while step < loop.total_steps:
                for batch in _batches(loop, step):
                    with acc.accumulate(loop.module):
                        # The guard clips the synchronised gradients (last micro-batch of an accumulation) and
                        # checks loss and gradient norm before the optimizer step.
                        train_step(loop.module, batch, loop.optimizer, s.trainable, t.max_grad_norm,
                                   scheduler=loop.scheduler, backward=guard.backward(step + 1), clip=None)
                    meter.tokens += batch_tokens(batch)  # real tokens: padding, also of packed rows, left out
                    if not acc.sync_gradients:
                        continue
                    step += 1
                    meter.add(*guard.take_window())
                    bar.update(1)
                    if step % t.log_every == 0 or step == loop.total_steps:
                        # Every process logs the same steps, so the reductions in the row line up.
                        row = meter.row(loop, step, guard)
                        run.log(row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                        mem=short(row))
                    if loop.evals and t.eval_every and step % t.eval_every == 0 and step < loop.total_steps:
                        meter.peak.pause()
                        eval_metrics = evaluate(loop.module, loop.evals, s.task, acc)
                        meter.peak.resume()
                        run.log({"step": step, **eval_metrics})
                        loop.module.train()
                        meter.last = time.perf_counter()  # eval time is not training throughput
                    _save_or_stop(loop, run, step, stop, bar)
                    if step >= loop.total_steps:
                        break
        except torch.OutOfMemoryError as e:
            # Left for the other processes too, which stop with it instead of waiting in a collective.
            raise SidetuneError(announce_failure(_oom_message(e, loop.cfg, step + 1, acc.device))) from None
        except Exception as e:
            peer_failure(e)  # a collective broke because another process stopped: its one line instead
            raise
    bar.close()
    return step, eval_metrics


def _save_or_stop(loop: _Loop, run: RunDir, step: int, stop: _StopSignals, bar) -> None:
    """A checkpoint every train.save_every steps; on SIGTERM / Ctrl-C one now (if not just saved), then stop."""
    t = loop.cfg.train
    saved = bool(t.save_every and step % t.save_every == 0)
    if saved:
        run.save_checkpoint(step, loop.s, loop.optimizer, loop.scheduler, loop.cfg)
    if stop.requested(loop.accelerator):
        where = checkpoint.step_dir(run.checkpoints, step)
        if not saved:
            run.save_checkpoint(step, loop.s, loop.optimizer, loop.scheduler, loop.cfg)
        bar.close()
        loop.accelerator.print(f"sidetune: stopped by {stop.name} at step {step}; checkpoint {where}; continue with "
                               f"train.resume=latest")
        raise checkpoint.Stopped(stop.signum)


def _finish(loop: _Loop, run: RunDir, step: int, eval_metrics: dict[str, float]) -> dict[str, float]:
    """The last evaluation, final/, the curves; returns the final eval metrics."""
    acc, out = loop.accelerator, run.path
    if loop.evals:
        eval_metrics = evaluate(loop.module, loop.evals, loop.s.task, acc)
        run.log({"step": step, **eval_metrics})
    run.save_final(loop.s, loop.cfg)  # every process: under FSDP gathering the shards is a collective
    curves = ""
    if acc.is_main_process and run.rows:  # a run with no step and no eval has nothing to plot
        try:
            curves = f", curves in {plot_runs([out], out / CURVES)}"
        except Exception as e:  # the weights are saved; a failed picture must not fail (or hang) the run
            print(f"sidetune: could not write {out / CURVES} ({one_line(e, 100)}); the run is complete")
    acc.wait_for_everyone()
    # accelerate's end_training() would also destroy the process group. That leaves DDP's Reducer its last owner,
    # and freeing the Reducer when this frame ends then deadlocks in gloo's destructor (py-spy: the main thread joins
    # gloo's worker thread holding the GIL; the worker waits for the GIL to free a barrier's tensors), so CI saw
    # 2-process runs print "done" and hang. The trackers are finished; the group lives until `sidetune train`'s
    # workers leave with os._exit (cli.main).
    for tracker in acc.trackers:
        tracker.finish()
    acc.print(f"sidetune: done; final weights in {out / 'final'}{curves}")
    if eval_metrics:
        acc.print(json.dumps({"step": step, **eval_metrics}))
    return eval_metrics


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


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
