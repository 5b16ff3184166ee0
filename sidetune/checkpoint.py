"""Atomic, verified checkpoints and the files a run owns.

A checkpoint is a directory `checkpoints/step-NNNNNNN/` that appears in one rename: its files are written into
`checkpoints/.tmp-step-NNNNNNN/` beside it, fsynced, listed with their sizes and sha256 in `manifest.json`, and the
directory is then renamed into place. A kill -9 at any moment leaves either the complete checkpoint or a temporary
directory, never a half-written `step-*`. Loading verifies the manifest (every file listed, none extra, sizes and
hashes equal) before reading a byte of state. Every file operation of a save passes `fault_point`, where a test can
stop the process (tests/test_reliability.py kills a save at each of them in turn).

Nothing executable is loaded: weights and RNG states are safetensors, sidetune's own state is JSON, and the optimizer
and scheduler states (plain tensors and numbers) load with `torch.load(weights_only=True)`.

Deletion is confined to what sidetune wrote: a checkpoint's or final/'s files as its manifest lists them, the run
files the run manifest (`sidetune-run.json`) lists, and sidetune's own temporary directories. A temporary directory
is sidetune's when it carries the `OWNER` mark, written first thing after `mkdir`: then everything in it goes, also
what another writer left there (safetensors' or torch's own `.tmpXXXXXX` of a killed write); one without the mark
is removed only when it holds nothing but sidetune's file names, and is otherwise renamed aside, never deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sidetune.errors import SidetuneError, one_line

MANIFEST = "manifest.json"
STATE = "state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
# The frozen tensors a method's init changed (LoRA-GA's W - s B0 A0, `Method.changed_base`): a reload reads them.
CHANGED_BASE = "changed_base.safetensors"
RUN_MANIFEST = "sidetune-run.json"
LOCK = ".sidetune.lock"
OWNER = ".sidetune-tmp"  # the mark of a temporary directory sidetune created
FORMAT = 1
_STEP = re.compile(r"^step-(\d+)$")
_TMP = re.compile(r"^\.tmp-(step-\d+|final)$")
# Every file name sidetune puts into a checkpoint or final/ directory (rng-<rank>.* per process).
_OWN_FILE = re.compile(r"^(manifest\.json|state\.json|trainable\.safetensors|optimizer\.pt|scheduler\.pt|"
                       r"changed_base\.safetensors|config\.yaml|rng-\d+\.(safetensors|json)|\.sidetune-tmp)$")


class Stopped(KeyboardInterrupt):
    """SIGTERM / Ctrl-C: a checkpoint was saved and the run stopped; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


_ops = 0


def fault_point(where: Path) -> None:
    """Called before every file operation of a save. Tests set SIDETUNE_TEST_FAIL_AT=N: the Nth call (counted per
    process) leaves a stray file in `where` when that is sidetune's temporary directory, as a writer (safetensors,
torch) killed mid-write would, and stops
    the process as a kill would (SystemExit, which no `except Exception` of sidetune's catches; or os._exit with
    SIDETUNE_TEST_FAIL_HOW=exit). Unset in real runs: one environment lookup."""
    global _ops
    at = os.environ.get("SIDETUNE_TEST_FAIL_AT")
    if not at:
        return
    _ops += 1
    if _ops != int(at):
        return
    if (where / OWNER).is_file():  # while another writer may be writing into sidetune's temporary directory
        (where / ".tmpk1ll3d").write_bytes(b"half")
    if os.environ.get("SIDETUNE_TEST_FAIL_HOW") == "exit":
        os._exit(137)
    raise SystemExit(137)


def reset_fault_count() -> int:
    """The file operations counted since the last reset (tests)."""
    global _ops
    n, _ops = _ops, 0
    return n


def os_error(path: Path, e: BaseException) -> SidetuneError:
    """An OS failure while writing (no space, permissions, read-only) as one line naming the path."""
    if isinstance(e, OSError):
        where = e.filename or path
        why = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied",
               errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror)
    else:  # torch.save reports a failed write as RuntimeError (e.g. "basic_ios::clear" on a full disk)
        where, why = path, one_line(e, 100)
    return SidetuneError(f"could not write {where}: {why or one_line(e, 100)}; free space or fix the permissions "
                         f"there (a run that has started continues with train.resume=latest)")


def _test_delay() -> None:
    # Tests make a save slow so that a kill lands inside it (tests/test_reliability.py); 0 in real runs.
    delay = float(os.environ.get("SIDETUNE_TEST_SAVE_DELAY", "0") or 0)
    if delay:
        time.sleep(delay)


def write_json(path: Path, obj: Any) -> None:
    """Write a JSON file atomically (temporary file beside it, fsync, rename)."""
    write_text(path, json.dumps(obj, indent=1))


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically; a kill leaves at most `.tmp-NAME` beside it, which the next write replaces."""
    write_file(path, lambda tmp: tmp.write_text(text))


def write_file(path: Path, writer: Callable[[Path], None]) -> None:
    """Write a file atomically: `writer` writes the temporary `.tmp-NAME` beside it, then fsync and rename."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        fault_point(path.parent)
        writer(tmp)
        fault_point(path.parent)
        _fsync(tmp)
        fault_point(path.parent)
        os.replace(tmp, path)
    except OSError as e:
        raise os_error(path, e) from None


def begin(final: Path) -> Path:
    """Create the temporary directory that `commit` renames to `final` (main process only), with sidetune's mark."""
    tmp = final.parent / f".tmp-{final.name}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            remove_tmp(tmp)  # a save killed before its rename
        if tmp.exists():  # not sidetune's (no mark, foreign names): kept, under another name
            _move_aside(tmp)
        fault_point(final.parent)
        tmp.mkdir()
        fault_point(tmp)
        (tmp / OWNER).write_text("sidetune temporary directory: removed with everything in it by the next save\n")
    except OSError as e:
        raise os_error(tmp, e) from None
    return tmp


def write_files(tmp: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write each file with its writer and fsync it (any process: rank-specific names). An OS failure (no space,
    permissions) becomes one line naming the file."""
    for name, write in writers.items():
        try:
            fault_point(tmp)
            write(tmp / name)
            fault_point(tmp)
            _fsync(tmp / name)
        except SidetuneError:
            raise
        except (OSError, RuntimeError) as e:
            raise os_error(tmp / name, e) from None
        _test_delay()


def commit(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """Write state.json and the manifest into `tmp`, fsync, and rename it to `final` (main process only)."""
    try:
        fault_point(tmp)
        (tmp / OWNER).unlink()  # the complete directory is verified by its manifest, which lists every file
        fault_point(tmp)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        fault_point(tmp)
        _fsync(tmp / STATE)
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        fault_point(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
        fault_point(tmp)
        _fsync(tmp / MANIFEST)
        fault_point(tmp)
        _fsync(tmp)
        if final.exists():
            fault_point(final)
            _move_aside(final)
        fault_point(tmp)
        os.rename(tmp, final)
        fault_point(final.parent)
        _fsync(final.parent)
    except OSError as e:
        raise os_error(tmp, e) from None


def _move_aside(path: Path) -> None:
    """A directory in the way of a new checkpoint: ours (complete) is replaced, anything else is renamed, kept."""
    if (path / MANIFEST).is_file():
        remove_written(path)
        if not path.exists():
            return
    n = 0
    while path.with_name(f"{path.name}.incomplete-{n}").exists():
        n += 1
    os.rename(path, path.with_name(f"{path.name}.incomplete-{n}"))


def remove_tmp(tmp: Path) -> None:
    """Remove a temporary checkpoint directory: all of it when it carries sidetune's mark (a killed write of any
    writer may have left its own temporary file there), else only if it holds nothing but sidetune's file names;
    otherwise leave it."""
    if not _TMP.match(tmp.name) or not tmp.is_dir() or tmp.is_symlink():
        return
    if (tmp / OWNER).is_file():
        shutil.rmtree(tmp)
        return
    entries = list(tmp.iterdir())
    if any(not (e.is_file() and _OWN_FILE.match(e.name)) for e in entries):
        return
    for e in entries:
        e.unlink()
    tmp.rmdir()


def remove_written(path: Path) -> None:
    """Delete a checkpoint / final directory's files as its manifest lists them, then the directory if empty."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for name in files:
        if _OWN_FILE.match(name) and (path / name).is_file():
            (path / name).unlink()
    (path / MANIFEST).unlink(missing_ok=True)
    if not any(path.iterdir()):
        path.rmdir()


def run_files(out: Path) -> list[str]:
    """The top-level file names the run manifest (`sidetune-run.json`) of `out` lists as sidetune's own; none when
    it has no readable manifest."""
    try:
        files = json.loads((Path(out) / RUN_MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


# ---------------------------------------------------------------------------------------------------------------------
# Listing and pruning


@dataclass
class Listing:
    complete: list[tuple[int, Path]]  # (step, dir) with a manifest, oldest first
    incomplete: list[Path]  # step-* without a manifest, and temporary directories of killed saves


def list_checkpoints(root: Path) -> Listing:
    complete, incomplete = [], []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            m = _STEP.match(p.name)
            if m and p.is_dir():
                (complete.append((int(m.group(1)), p)) if (p / MANIFEST).is_file() else incomplete.append(p))
            elif _TMP.match(p.name) and p.is_dir():
                incomplete.append(p)
    complete.sort()
    return Listing(complete, incomplete)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; delete the older ones' own files."""
    for _, path in list_checkpoints(root).complete[:-keep]:
        fault_point(path)
        remove_written(path)


# ---------------------------------------------------------------------------------------------------------------------
# Verifying and reading


def verify(path: Path, key: str = "train.resume") -> dict[str, Any]:
    """Check a checkpoint (or final/) directory against its manifest; return the manifest. One line on any fault."""
    if not path.is_dir():
        raise SidetuneError(f"{key}={str(path)!r} is not a directory; pass a checkpoint directory "
                            f"(output_dir/checkpoints/step-N) or latest")
    if not (path / MANIFEST).is_file():
        what = "is empty" if not any(path.iterdir()) else "has no manifest.json"
        raise SidetuneError(f"{key}: {path} {what}, so it is not a complete sidetune checkpoint (its save did not "
                            f"finish, or another tool wrote it); pass an earlier checkpoint or train.resume=latest")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and all(isinstance(v["size"], int) for v in files.values())
    except Exception as e:
        raise SidetuneError(f"{key}: {path / MANIFEST} is damaged ({one_line(e, 80)}); pass an earlier "
                            f"checkpoint") from None
    extra = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.name not in files)
    if extra:
        raise SidetuneError(f"{key}: {path} holds {extra[0]!r}, which its manifest does not list; refusing a "
                            f"tampered checkpoint (remove that file if you put it there)")
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise SidetuneError(f"{key}: {f} is missing (the manifest lists it); pass an earlier checkpoint")
        size = f.stat().st_size
        if size != entry["size"]:
            raise SidetuneError(f"{key}: {f} is {size} bytes but its manifest says {entry['size']} (truncated or "
                                f"damaged); pass an earlier checkpoint")
        if _sha256(f) != entry["sha256"]:
            raise SidetuneError(f"{key}: {f} does not match its manifest's sha256 (damaged or tampered); pass an "
                                f"earlier checkpoint")
    return manifest


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / STATE).read_text())
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise ValueError("no step count")
        return state
    except Exception as e:
        raise SidetuneError(f"train.resume: {path / STATE} is unreadable ({one_line(e, 80)})") from None


def load_tensors(path: Path) -> Any:
    """Optimizer / scheduler state: tensors, numbers, lists and dicts only (weights_only=True runs no code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SidetuneError(f"train.resume: {path} could not be loaded as plain tensors ({one_line(e, 120)}); "
                            f"refusing it") from None


# ---------------------------------------------------------------------------------------------------------------------
# RNG states (per process): torch CPU / CUDA generators in safetensors, Python's and NumPy's in JSON


def rng_writers(rank: int) -> dict[str, Callable[[Path], None]]:
    import random

    import numpy as np
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, py_gauss = random.getstate()
    other = {"python": [version, list(py_state), py_gauss], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return {f"rng-{rank}.safetensors": lambda p: save_file(tensors, str(p)),
            f"rng-{rank}.json": lambda p: p.write_text(json.dumps(other))}


def restore_rng(path: Path, rank: int) -> None:
    import random

    import numpy as np
    from safetensors.torch import load_file

    f = path / f"rng-{rank}.safetensors"
    if not f.is_file():
        raise SidetuneError(f"train.resume: {path} has no RNG state for process {rank} (saved with fewer processes?); "
                            f"resume with the same number of processes")
    try:
        tensors = load_file(str(f))
        other = json.loads((path / f"rng-{rank}.json").read_text())
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        version, py_state, py_gauss = other["python"]
        random.setstate((version, tuple(py_state), py_gauss))
        kind, pos, has_gauss, gauss = other["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    except SidetuneError:
        raise
    except Exception as e:
        raise SidetuneError(f"train.resume: the RNG state in {path} is corrupt ({one_line(e, 100)}); resume from "
                            f"an earlier checkpoint") from None
