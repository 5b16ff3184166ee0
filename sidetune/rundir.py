"""A run directory, one object: the only code that reads or writes `train.output_dir`.

Writing (`RunDir`, the trainer's): the checks that can run before the model is built (the directory can be written,
`train.resume` names a verified checkpoint and does not contradict `train.overwrite`), the checks after it (free
space, the checkpoint fits this config), claiming the directory (its lock, the overwrite / resume policy), the run
manifest and the resolved config, the metrics log, and the checkpoint and final/ contents, gathered from FSDP shards
where the weights are sharded.

`train.overwrite=true` never loses the earlier run: its files move into `OUT/.sidetune-trash/` once the new run has
passed every check, and are deleted only after the new run's first complete save (a checkpoint or final/). If the new
run dies before that (an error: at once; kill -9: at the next `sidetune train` into OUT), the earlier run is moved back.

Reading (`open_run`, everyone else's): a finished run is verified once (its manifest), refused while a run holds its
lock, and reloaded through one path, `FinishedRun.load`: the recorded config is built with `reload=True` (no
training data), then the trainable set and the frozen tensors the method's init changed (`Method.changed_base`,
LoRA-GA's offset base) are copied in. `sidetune.load`, `eval`, `generate`, `chat` and `export` all call it.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sidetune import checkpoint
from sidetune.config import Config, load_config, save_config
from sidetune.errors import SidetuneError, one_line
from sidetune.methods import build_method, trainable_parameters
from sidetune.plot import CURVES
from sidetune.preference import REFERENCE_FILE

# What marks a directory as holding a run (the lock file does not: it stays behind, harmless, after every run).
RUN_NAMES = (checkpoint.RUN_MANIFEST, "config.yaml", "metrics.jsonl", "checkpoints", "final", "logs")
# The top-level files sidetune writes, listed in the run manifest (curves.png: `sidetune plot`'s PNG, at the end).
RUN_FILES = ("config.yaml", "metrics.jsonl", CURVES, REFERENCE_FILE)
TRASH = ".sidetune-trash"  # the earlier run, while an overwriting run has not saved yet
_MOVED = "moved"  # in TRASH: every file of the earlier run is in it (written last)
# Keys that may change between a checkpoint and its resumed run without changing what the checkpoint holds.
_RESUME_FREE = {"model.attn_implementation", "model.tokenizer"}


# ---------------------------------------------------------------------------------------------------------------------
# The trainable set and the changed base, whole on the CPU (gathered from FSDP shards) and back


def _is_sharded(t: torch.Tensor) -> bool:
    """An FSDP2-sharded tensor (DTensor): reading or writing it whole is a collective on every process."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _gather(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: (p.detach().full_tensor() if _is_sharded(p) else p.detach()).contiguous().cpu()
            for n, p in params.items()}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable set, whole, on the CPU. Under FSDP every process must call it: each sharded tensor is gathered
    (`full_tensor`, an all-gather). The trainable set is small, so holding it whole once is cheap."""
    return _gather(trainable_parameters(model))


def changed_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The frozen tensors the method's init changed (`Method.changed_base`), whole, on the CPU (every process)."""
    return _gather(_changed_tensors(model, names))


def _changed_tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The changed parameters, and for a quantized one (LoftQ's 4-bit Q) the quantization state its values live in
    beside the packed bytes: the per-block scales (and, double-quantized, their own scales and offset; an 8-bit
    weight's per-row SCB). The rest of the state (code book, shape, block size) follows from the run's config."""
    tensors = {}
    for name in names:
        p = tensors[name] = model.get_parameter(name)
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors[f"{name}.absmax"] = state.absmax
            if state.nested:
                tensors[f"{name}.nested_absmax"], tensors[f"{name}.offset"] = state.state2.absmax, state.offset
        elif getattr(p, "SCB", None) is not None:
            tensors[f"{name}.SCB"] = p.SCB
    return tensors


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SidetuneError(f"{path} is missing; the run or checkpoint is incomplete (pass another one)")
    try:
        return load_file(str(path))
    except Exception as e:
        raise SidetuneError(f"{path} is not a readable safetensors file, truncated or damaged ({one_line(e, 100)})") \
            from None


def _copy_into(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy `state` into `params` (same names, same shapes), one line on any mismatch."""
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
                p.data.copy_(tensor)  # .data: a bitsandbytes 4-bit weight is a Parameter subclass


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy a trainable set from safetensors into `model`; one line if the file is missing, unreadable or does not
    fit this model's trainable set."""
    _copy_into(trainable_parameters(model), _read_safetensors(path), path)


def restore(model: nn.Module, method, saved: Path) -> None:
    """A saved state (final/ or a checkpoint) into a model built with `reload=True`: the trainable set, and the
    frozen tensors the method's init changed."""
    load_trainable(model, saved / checkpoint.TRAINABLE)
    names = method.changed_base(model)
    if names:
        path = saved / checkpoint.CHANGED_BASE
        if not path.is_file():
            raise SidetuneError(f"{saved} has no {checkpoint.CHANGED_BASE}: the base weights this run's init "
                                f"changed (method.init) were not stored (saved by an older sidetune); train the run "
                                f"again to reload it")
        _copy_into(_changed_tensors(model, names), _read_safetensors(path), path)


def _tensor_writers(weights: dict[str, torch.Tensor], changed: dict[str, torch.Tensor], method: str) -> dict:
    writers = {checkpoint.TRAINABLE: lambda p: save_file(weights, str(p), metadata={"method": method})}
    if changed:
        writers[checkpoint.CHANGED_BASE] = lambda p: save_file(changed, str(p))
    return writers


def save_trainable(model: nn.Module, cfg: Config, out: Path, state: dict[str, torch.Tensor] | None = None,
                   changed: dict[str, torch.Tensor] | None = None) -> None:
    """The trainable set (and the changed base) as safetensors plus the full resolved config: enough to rebuild the
    model with `open_run(...).load()`. Written like a checkpoint: into a temporary directory beside `out`, with a
    manifest, then renamed. `state` / `changed`: already gathered by every process (FSDP)."""
    state = trainable_state(model) if state is None else state
    if changed is None:
        changed = changed_state(model, build_method(cfg.method).changed_base(model))
    tmp = checkpoint.begin(out)
    checkpoint.write_files(tmp, {**_tensor_writers(state, changed, cfg.method.name),
                                 "config.yaml": lambda p: save_config(cfg, p)})
    checkpoint.commit(tmp, out, None)


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


# ---------------------------------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and whether it fits


@dataclass
class ResumePoint:
    path: Path | None = None  # the verified checkpoint to continue from
    state: dict[str, Any] | None = None  # its state.json
    skipped: tuple[Path, ...] = ()  # incomplete checkpoints passed over (train.resume=latest)
    fresh_start: bool = False  # latest found no checkpoint of this run: the same run starts over

    @property
    def step(self) -> int:
        return self.state["step"] if self.state is not None else 0


def _compatible(state: dict[str, Any], cfg: Config, path: Path, num_processes: int) -> None:
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
        if key not in _RESUME_FREE and json.loads(json.dumps(value)) != before:
            raise SidetuneError(f"train.resume: {path} was trained with {key}={before!r} but this config has "
                                f"{key}={value!r}; resume with the checkpoint's settings, or start a new run")
    if state.get("num_processes", 1) != num_processes:
        raise SidetuneError(f"train.resume: {path} was saved by {state.get('num_processes')} process(es), this run "
                            f"has {num_processes}; resume with the same number of processes")


# ---------------------------------------------------------------------------------------------------------------------
# The directory of a run being trained


def _probe_writable(out: Path) -> None:
    """One line naming the path when `out` cannot become a run directory: not a directory, or not writable (a
    read-only mount, /proc, /sys, no permission). Probed with a temporary directory that is removed at once."""
    if out.exists() and not out.is_dir():
        raise SidetuneError(f"train.output_dir={out} is a file; choose a directory")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise SidetuneError(f"train.output_dir={out}: {existing} is not a directory; choose another "
                            f"train.output_dir")
    try:
        Path(tempfile.mkdtemp(prefix=".sidetune-probe-", dir=existing)).rmdir()
    except OSError as e:
        # ENOENT from mkdir inside an existing directory: a pseudo file system (/proc) that holds no new files.
        why = "nothing can be created there" if e.errno == errno.ENOENT else e.strerror or one_line(e, 80)
        raise SidetuneError(f"train.output_dir={out} cannot be written ({existing}: {why}); choose a writable "
                            f"train.output_dir") from None


def _try_lock(path: Path, mode: str, how: int = fcntl.LOCK_EX):
    try:
        f = path.open(mode)
    except OSError:
        return None
    try:
        fcntl.flock(f, how | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _busy(out: Path) -> SidetuneError:
    return SidetuneError(f"another sidetune run is using train.output_dir={out} (it holds {out / checkpoint.LOCK}); "
                         f"wait for it to finish or choose another train.output_dir")


class RunDir:
    """`train.output_dir` of a run being trained. Every process holds one; the main process writes."""

    def __init__(self, out: str | Path, accelerator) -> None:
        self.path = Path(out).expanduser()
        self.accelerator = accelerator
        self.lock = None
        self.trash: Path | None = None  # the earlier run (train.overwrite), until the first save of this one
        self.fresh = False  # this run claimed the directory as a new run (not continuing one)
        self.created = False  # ... and created the directory
        self.saved = False  # it has a complete save of its own
        self.rows = 0  # metrics rows in the file: a checkpoint records it, so a resume keeps exactly those
        self._all(lambda: _probe_writable(self.path))
        self._all(self._recover, main_only=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def _all(self, fn, main_only: bool = False) -> Any:
        """Run `fn` (on the main process only, or on every one); an error on any process stops every process with
        one line, so none is left waiting in a collective."""
        acc = self.accelerator
        result, error = None, None
        if acc.is_main_process or not main_only:
            try:
                result = fn()
            except SidetuneError as e:
                error = e
            except OSError as e:  # moving, renaming, deleting in the run directory: one line naming the path
                error = checkpoint.os_error(self.path, e)
        if acc.num_processes > 1:
            votes = acc.reduce(torch.tensor(int(error is not None), device=acc.device), reduction="sum")
            if votes.item() and error is None:
                raise SidetuneError(f"another process refused train.output_dir={self.path}")
        if error is not None:
            raise error
        return result

    # ----- before the model is built

    def resume_point(self, resume: str | None, overwrite: bool) -> ResumePoint:
        """The verified checkpoint `train.resume` names (or latest finds), before anything is built."""
        if not resume:
            return ResumePoint()
        if overwrite and (resume == "latest" or _inside(Path(resume), self.path)):
            raise SidetuneError(f"train.resume={resume} and train.overwrite=true contradict each other (overwrite "
                                f"would remove the run it resumes); drop one of them")
        if resume != "latest":
            path = Path(resume).expanduser()
            checkpoint.verify(path)
            return ResumePoint(path, checkpoint.read_state(path))
        listing = checkpoint.list_checkpoints(self.checkpoints)
        if not listing.complete:
            # Killed before its first checkpoint: the same run starts over (its own files are replaced).
            fresh = (self.path / checkpoint.RUN_MANIFEST).is_file()
            if fresh and (self.path / "final" / checkpoint.MANIFEST).is_file():
                raise SidetuneError(f"train.resume=latest: the run in {self.path} has finished (final/ is written) "
                                    f"and has no checkpoint to continue from; train it again with "
                                    f"train.overwrite=true")
            return ResumePoint(skipped=tuple(listing.incomplete), fresh_start=fresh)
        path = listing.complete[-1][1]
        try:
            checkpoint.verify(path)
        except SidetuneError as e:
            if len(listing.complete) > 1:
                raise SidetuneError(f"{e} (the one before is train.resume={listing.complete[-2][1]})") from None
            raise
        newest = listing.complete[-1][0]
        skipped = tuple(p for p in listing.incomplete if int(re.sub(r"\D", "", p.name) or 0) > newest)
        return ResumePoint(path, checkpoint.read_state(path), skipped)

    # ----- after the model is built, before anything is written

    def check(self, cfg: Config, resume: ResumePoint, total_steps: int, need_bytes: int) -> None:
        """The checkpoint fits this config and run length; the disk has room for the saves."""
        if resume.state is not None:
            _compatible(resume.state, cfg, resume.path, self.accelerator.num_processes)
            if resume.step > total_steps:
                raise SidetuneError(f"train.resume: {resume.path} is at step {resume.step}, past this run's "
                                    f"{total_steps} steps (train.max_steps={cfg.train.max_steps}); raise "
                                    f"train.max_steps above {resume.step} to train on")

        def space() -> None:
            existing = self.path if self.path.exists() else next(p for p in self.path.parents if p.exists())
            free = shutil.disk_usage(existing).free
            if free < need_bytes:
                raise SidetuneError(f"train.output_dir={self.path}: {free / 2**20:.0f} MiB free on its disk, and a "
                                    f"checkpoint and final/ need about {need_bytes / 2**20:.0f} MiB; free space or "
                                    f"choose another train.output_dir")
        self._all(space, main_only=True)

    def resolved(self, cfg: Config) -> Config:
        """The config to record: data files found from the working directory as absolute paths (so `sidetune eval
        RUN` works from any directory); a bundled file's name (sst2/dev.tsv) and a hub name stay as they are."""
        cfg = copy.deepcopy(cfg)
        for key in ("train", "eval"):
            spec = getattr(cfg.data, key)
            if spec and Path(spec).expanduser().is_file():
                setattr(cfg.data, key, str(Path(spec).expanduser().resolve()))
        return cfg

    def continuing(self, resume: ResumePoint) -> bool:
        return resume.fresh_start or (resume.path is not None and _inside(resume.path, self.checkpoints))

    def claim(self, continuing: bool, overwrite: bool) -> None:
        """Take the lock; refuse a directory holding another run (unless continuing it or train.overwrite=true);
        with train.overwrite, move the earlier run aside (deleted after this run's first save)."""
        self.fresh, self.created = not continuing, not self.path.exists()
        self.lock = self._all(lambda: self._claim(continuing, overwrite), main_only=True)

    def _claim(self, continuing: bool, overwrite: bool):
        out = self.path
        lock = self.lock
        if lock is None and (out / checkpoint.LOCK).is_file():
            lock = _try_lock(out / checkpoint.LOCK, "a")  # opening for append changes nothing of an existing file
            if lock is None:
                raise _busy(out)
        found = [name for name in RUN_NAMES if (out / name).exists()]
        if found and not continuing:
            if not overwrite:
                raise SidetuneError(f"train.output_dir={out} already holds a run ({', '.join(found)}); continue it "
                                    f"with train.resume=latest, replace it with train.overwrite=true, or choose "
                                    f"another train.output_dir")
            listed = set(_listed_run_files(out))
            foreign = [n for n in RUN_FILES if (out / n).exists() and n not in listed]
            if foreign:
                raise SidetuneError(f"train.overwrite=true, but {out / foreign[0]} was not written by sidetune (no "
                                    f"{checkpoint.RUN_MANIFEST} lists it); move it away or choose another "
                                    f"train.output_dir")
        if (out / CURVES).exists() and CURVES not in _listed_run_files(out):
            # The run writes curves.png at its end: it must not replace a file of someone else's.
            raise SidetuneError(f"train.output_dir={out} holds {CURVES}, which sidetune did not write (no "
                                f"{checkpoint.RUN_MANIFEST} lists it) and the run would replace; move it away or "
                                f"choose another train.output_dir")
        if (out / TRASH).exists():
            raise SidetuneError(f"train.output_dir={out} holds {out / TRASH} with files sidetune did not write; move "
                                f"them away or choose another train.output_dir")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise checkpoint.os_error(out, e) from None
        if lock is None:
            lock = _try_lock(out / checkpoint.LOCK, "a")
            if lock is None:
                raise _busy(out)
        if found and not continuing:
            self.trash = _move_to_trash(out)
        return lock

    def _recover(self) -> None:
        """A run that overwrote another and was killed before its first save: the earlier run comes back. (Killed
        after it: the earlier run's files are deleted now, as that save would have done.)"""
        trash = self.path / TRASH
        if not trash.is_dir():
            return
        lock = _try_lock(self.path / checkpoint.LOCK, "a")  # released below: `claim` takes it for the run
        if lock is None:
            raise _busy(self.path)
        try:
            if (trash / _MOVED).is_file() and _has_save(self.path):
                _delete_trash(trash)
                return
            if (trash / _MOVED).is_file():  # the files in OUT are the killed run's own
                _remove_run(self.path)
            _restore_trash(trash)
            print(f"sidetune: restored the run in {self.path}: a train.overwrite=true run replacing it stopped "
                  f"before its first save")
        finally:
            lock.close()

    # ----- writing

    def start(self, cfg: Config, resume: ResumePoint, global_batch: int) -> None:
        """The run manifest, the resolved config, and the metrics log cut back to the checkpoint's rows."""
        acc = self.accelerator
        if not acc.is_main_process:
            return
        t = cfg.train
        # The global batch is a property of the launch, not of config.yaml: recorded here beside it, with the data
        # files as they were found.
        checkpoint.write_json(self.path / checkpoint.RUN_MANIFEST, {
            "written_by": "sidetune", "files": list(RUN_FILES), "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type.value), "batch_size": t.batch_size,
            "grad_accum": t.grad_accum, "global_batch": global_batch,
            "data": {"train": cfg.data.train, "eval": cfg.data.eval}})
        checkpoint.write_text(self.path / "config.yaml", yaml_config(cfg))
        if self.continuing(resume):
            rows = resume.state.get("metrics_rows") if resume.state is not None else 0
            self.rows = _truncate_metrics(self.path / "metrics.jsonl", rows, resume.step)

    def write_file(self, path: Path, writer) -> None:
        """One more file of the run (one of RUN_FILES), written atomically by the main process."""
        self._all(lambda: checkpoint.write_file(path, writer), main_only=True)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row (main process) and accelerate's trackers."""
        acc = self.accelerator
        if not acc.is_main_process:
            return
        try:
            with (self.path / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise checkpoint.os_error(self.path / "metrics.jsonl", e) from None
        self.rows += 1
        acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def save_checkpoint(self, step: int, s, optimizer, scheduler, cfg: Config) -> Path:
        """An atomic checkpoint: every process writes its RNG state into the temporary directory, then the main
        process writes weights, optimizer and scheduler state, the manifest, and renames it into place."""
        acc = self.accelerator
        final = checkpoint.step_dir(self.checkpoints, step)
        tmp = final.parent / f".tmp-{final.name}"
        self._all(lambda: checkpoint.begin(final), main_only=True)
        self._all(lambda: checkpoint.write_files(tmp, checkpoint.rng_writers(acc.process_index)))
        # Gathered by every process (collectives under FSDP), written by the main one.
        weights, optim = trainable_state(s.model), optimizer_state(s.model, optimizer)
        changed = changed_state(s.model, s.method.changed_base(s.model))

        def write() -> None:
            checkpoint.write_files(tmp, {
                **_tensor_writers(weights, changed, cfg.method.name),
                checkpoint.OPTIMIZER: lambda p: torch.save(optim, p),
                checkpoint.SCHEDULER: lambda p: torch.save(scheduler.state_dict(), p)})
            checkpoint.commit(tmp, final, {"step": step, "metrics_rows": self.rows,
                                           "num_processes": acc.num_processes, "config": cfg.to_dict()})
            if cfg.train.save_total_limit:
                checkpoint.prune(self.checkpoints, cfg.train.save_total_limit)
            self._saved()
        self._all(write, main_only=True)
        return final

    def load_checkpoint(self, resume: ResumePoint, s, optimizer, scheduler) -> None:
        """Weights (and the changed base), optimizer, scheduler and this process's RNG state from the verified
        checkpoint."""
        path = resume.path
        restore(s.model, s.method, path)
        for name, target in ((checkpoint.OPTIMIZER, optimizer), (checkpoint.SCHEDULER, scheduler)):
            state = checkpoint.load_tensors(path / name)
            try:
                if target is optimizer:
                    load_optimizer_state(s.model, optimizer, state)
                else:
                    target.load_state_dict(state)
            except Exception as e:
                raise SidetuneError(f"train.resume: {path / name} does not fit this run's {name.split('.')[0]} "
                                    f"({one_line(e, 100)}); resume with the checkpoint's config") from None
        checkpoint.restore_rng(path, self.accelerator.process_index)

    def save_final(self, s, cfg: Config) -> None:
        """final/: the trainable set, the changed base and the resolved config (every process gathers)."""
        weights = trainable_state(s.model)
        changed = changed_state(s.model, s.method.changed_base(s.model))

        def write() -> None:
            save_trainable(s.model, cfg, self.path / "final", weights, changed)
            self._saved()
        self._all(write, main_only=True)

    def _saved(self) -> None:
        """The run has a complete save of its own: the earlier run it replaces can go."""
        self.saved = True
        if self.trash is not None:
            _delete_trash(self.trash)
            self.trash = None

    def fail(self) -> None:
        """The run stopped with an error before its first save: what it wrote goes, so the directory is as it was
        (an earlier run it was replacing comes back). A run that has saved keeps its files, to resume."""
        if self.saved or not self.fresh or self.lock is None or not self.accelerator.is_main_process:
            return
        try:
            _remove_run(self.path)
            if self.trash is not None:
                _restore_trash(self.trash)
                self.trash = None
            elif self.created and [p.name for p in self.path.iterdir()] == [checkpoint.LOCK]:
                (self.path / checkpoint.LOCK).unlink()
                self.path.rmdir()
        except OSError:
            pass  # a trash stays; the next `sidetune train` into this directory restores it

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()  # releases the flock
            self.lock = None


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.expanduser().resolve().is_relative_to(root.expanduser().resolve())
    except OSError:
        return False


def _listed_run_files(out: Path) -> list[str]:
    return [f for f in checkpoint.run_files(out) if f in RUN_FILES]


def _has_save(out: Path) -> bool:
    return bool(checkpoint.list_checkpoints(out / "checkpoints").complete) or \
        (out / "final" / checkpoint.MANIFEST).is_file()


def _move_to_trash(out: Path) -> Path:
    """Move the earlier run's own files (as its manifests list them) into OUT/.sidetune-trash; the run manifest and
    the `moved` mark last, so that a kill in between is told apart. Foreign files stay where they are."""
    trash = out / TRASH
    (trash / "checkpoints").mkdir(parents=True, exist_ok=True)
    listing = checkpoint.list_checkpoints(out / "checkpoints")
    for path in listing.incomplete:
        checkpoint.remove_tmp(path)
    for _, path in listing.complete:
        os.rename(path, trash / "checkpoints" / path.name)
    if (out / "final" / checkpoint.MANIFEST).is_file():
        os.rename(out / "final", trash / "final")
    checkpoint.remove_tmp(out / ".tmp-final")
    for name in _listed_run_files(out):
        if (out / name).is_file():
            os.rename(out / name, trash / name)
    if (out / checkpoint.RUN_MANIFEST).is_file():
        os.rename(out / checkpoint.RUN_MANIFEST, trash / checkpoint.RUN_MANIFEST)
    (trash / _MOVED).write_text("sidetune: the earlier run, kept until the run replacing it saves\n")
    if (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir()):
        (out / "checkpoints").rmdir()
    return trash


def _restore_trash(trash: Path) -> None:
    """Move the earlier run back from the trash (nothing of the run that replaced it is left: see `_remove_run`)."""
    out = trash.parent
    (trash / _MOVED).unlink(missing_ok=True)
    if (trash / "checkpoints").is_dir():
        for path in sorted((trash / "checkpoints").iterdir()):
            (out / "checkpoints").mkdir(exist_ok=True)
            if not (out / "checkpoints" / path.name).exists():
                os.rename(path, out / "checkpoints" / path.name)
        _rmdir_if_empty(trash / "checkpoints")
    for path in sorted(trash.iterdir()):
        if not (out / path.name).exists():
            os.rename(path, out / path.name)
    _rmdir_if_empty(trash)


def _delete_trash(trash: Path) -> None:
    """Delete the earlier run's own files from the trash (as its manifests list them), nothing else."""
    for name in checkpoint.run_files(trash):
        if name in RUN_FILES:
            (trash / name).unlink(missing_ok=True)
    (trash / checkpoint.RUN_MANIFEST).unlink(missing_ok=True)
    for _, path in checkpoint.list_checkpoints(trash / "checkpoints").complete:
        checkpoint.remove_written(path)
    _rmdir_if_empty(trash / "checkpoints")
    if (trash / "final" / checkpoint.MANIFEST).is_file():
        checkpoint.remove_written(trash / "final")
    (trash / _MOVED).unlink(missing_ok=True)
    _rmdir_if_empty(trash)


def _rmdir_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _remove_run(out: Path) -> None:
    """Delete what a run wrote into `out` (as its manifests list them), nothing else."""
    for name in _listed_run_files(out):
        (out / name).unlink(missing_ok=True)
    (out / checkpoint.RUN_MANIFEST).unlink(missing_ok=True)
    listing = checkpoint.list_checkpoints(out / "checkpoints")
    for _, path in listing.complete:
        checkpoint.remove_written(path)
    for path in listing.incomplete:
        checkpoint.remove_tmp(path)
    _rmdir_if_empty(out / "checkpoints")
    checkpoint.remove_tmp(out / ".tmp-final")
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


# ---------------------------------------------------------------------------------------------------------------------
# A finished run, reopened


def init_from(model: nn.Module, method, cfg: Config) -> None:
    """model.init_from: the trained weights (and changed base) of a finished run with the same model and method
    settings, copied over the init (e.g. DPO starting from an SFT run). The trainer calls it on a fresh run (a resumed
    one loads its checkpoint instead)."""
    run = open_run(cfg.model.init_from)
    prev = run.cfg
    if prev.model.name != cfg.model.name or prev.model.quantize != cfg.model.quantize:
        raise SidetuneError(f"model.init_from={cfg.model.init_from}: that run trained model.name={prev.model.name} "
                            f"(quantize={prev.model.quantize}), this one {cfg.model.name} (quantize="
                            f"{cfg.model.quantize}); start from a run of the same model")
    if prev.method != cfg.method:
        theirs, ours = prev.method.__dict__, cfg.method.__dict__
        diff = next((k for k in ours if theirs.get(k) != ours[k]), "name")
        raise SidetuneError(f"model.init_from={cfg.model.init_from}: that run's method.{diff}={theirs.get(diff)!r}, "
                            f"this run's {ours.get(diff)!r}; use the same method settings (copy its method: section)")
    restore(model, method, run.final)
    print(f"sidetune: model.init_from: starting from the trained weights in {run.final}")


@dataclass
class FinishedRun:
    """A finished run, verified once: its directory, its final/ and the config it trained with (resolved)."""

    root: Path
    final: Path
    cfg: Config

    def load(self, device: str | torch.device = "cpu", *, cfg: Config | None = None, with_data: bool = False):
        """The one way a trained model comes back: the recorded config (or `cfg`, a changed copy of it: eval's
        data) built with `reload=True`, then the saved trainable set and changed base copied in; eval mode.
        Returns the `session.Setup`."""
        from sidetune.session import build

        s = build(cfg if cfg is not None else self.cfg, device, with_data=with_data, reload=True)
        restore(s.model, s.method, self.final)
        s.model.eval()
        return s


def open_run(run_dir: str | Path) -> FinishedRun:
    """A finished run (its directory or its final/ directory): verified against its manifest, refused while a
    run holds its lock (training in progress)."""
    given = Path(run_dir).expanduser()
    if (given / TRASH / _MOVED).is_file():
        raise SidetuneError(f"{given}: a train.overwrite=true run replacing this run stopped before its first save; "
                            f"the earlier run is in {given / TRASH}, and the next `sidetune train` into {given} puts "
                            f"it back")
    for final in (given / "final", given):
        if (final / checkpoint.MANIFEST).is_file() or (final / checkpoint.TRAINABLE).is_file():
            break
    else:
        raise SidetuneError(f"{str(run_dir)!r} is not a finished sidetune run (no final/trainable.safetensors)")
    root = final.parent if final == given and final.name == "final" else given
    for lock_dir in {root, final.parent}:
        lock_path = lock_dir / checkpoint.LOCK
        if lock_path.is_file():
            held = _try_lock(lock_path, "r", fcntl.LOCK_SH)
            if held is None:
                raise SidetuneError(f"a sidetune run is in progress in {lock_dir} (it holds {lock_path}); wait for "
                                    f"it to finish (its final/ is not this run's yet)")
            held.close()
    if (final / checkpoint.MANIFEST).is_file():
        checkpoint.verify(final, key="run")  # a damaged or tampered final/ is refused, not loaded
    if not ((final / checkpoint.TRAINABLE).is_file() and (final / "config.yaml").is_file()):
        raise SidetuneError(f"{str(run_dir)!r} is not a finished sidetune run (no final/trainable.safetensors)")
    return FinishedRun(root, final, load_config(final / "config.yaml"))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a finished run, in eval mode: `open_run(run_dir).load(device)`."""
    s = open_run(run_dir).load(device)
    return s.model, s.tokenizer


def export_target(out: str | Path, overwrite: bool) -> Path:
    """The export directory: refused in one line when it holds anything and --overwrite was not given (both
    exports check it here, before the run is loaded)."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SidetuneError(f"export target {str(out)!r} exists and is not empty; pick a new directory or pass "
                            f"--overwrite")
    return out
