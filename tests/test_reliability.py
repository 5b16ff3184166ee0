"""Reliability: a run survives kill -9 and SIGTERM bit for bit, never destroys an earlier run, loads nothing
executable, and answers every bad input with one line (exit 2) before touching any file."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, ROOT, read_metrics
from safetensors.torch import load_file, save_file

from sidetune import cli
from sidetune.config import load_config
from sidetune.train import train

RECIPE = RECIPES / "sst2_lora.yaml"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, str]:
    """64 training / 32 eval rows of the bundled SST-2: a 12-step run of batch 4 crosses an epoch boundary."""
    root = tmp_path_factory.mktemp("data")
    paths = {}
    for split, n in (("train", 64), ("dev", 32)):
        lines = (ROOT / "sidetune" / "assets" / "sst2" / f"{split}.tsv").read_text().splitlines()[: n + 1]
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        paths[split] = str(root / f"{split}.tsv")
    return paths


def _overrides(out: Path, data: dict[str, str], *extra: str) -> list[str]:
    return ["model.name=tiny-bert", "method.r=4", "method.dropout=0.1", f"data.train={data['train']}",
            f"data.eval={data['dev']}", "data.max_length=32", "train.batch_size=4", "train.eval_batch_size=32",
            "train.max_steps=12", "train.log_every=1", "train.eval_every=4", "train.warmup_steps=2",
            "train.progress=false", f"train.output_dir={out}", *extra]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "sidetune", *args], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """`sidetune ARGS` in this process (the CLI's own main: its error handling is what is tested)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_data) -> Path:
    """A finished 12-step run with checkpoints every 4 steps (the reference for bit-identity too)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(RECIPE, _overrides(out, small_data, "train.save_every=4")))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Kill -9 (also inside a checkpoint save) and SIGTERM, then train.resume=latest and nothing else


def test_kill_anywhere_then_resume_is_bit_identical(tmp_path, small_data, finished):
    out = tmp_path / "killed"
    base = ["train", str(RECIPE), *_overrides(out, small_data, "train.save_every=3")]
    # Slow saves (each file written, then a pause) so that a kill lands inside one.
    env = {"SIDETUNE_TEST_SAVE_DELAY": "0.15"}
    rng = random.Random(int(os.environ.get("SIDETUNE_TEST_KILL_SEED", "0")))
    # (signal, when): before the first checkpoint, inside saves, between steps; SIGTERM saves and exits cleanly.
    moments = [(signal.SIGKILL, ("rows", 1)), (signal.SIGKILL, ("save", 3 * rng.randint(1, 2))),
               (signal.SIGTERM, ("rows", rng.randint(8, 12))), (signal.SIGKILL, ("save", 12))]
    said = []
    for n, (sig, (kind, at)) in enumerate(moments):
        proc = _popen(*base, *(["train.resume=latest"] if n else []), env=env)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if kind == "rows" and (out / "metrics.jsonl").is_file():
                hit = sum(1 for r in read_metrics(out) if "loss" in r and r["step"] >= at) > 0
            else:
                hit = kind == "save" and (out / "checkpoints" / f".tmp-step-{at:07d}").is_dir()
            if hit:
                if kind == "save":
                    time.sleep(rng.uniform(0, 0.6))  # somewhere among the files of the save
                proc.send_signal(sig)
                break
            time.sleep(0.01)
        stdout, err = proc.communicate(timeout=300)
        said.append(stdout)
        assert "Traceback" not in err, err
        if sig == signal.SIGTERM and proc.returncode != 0:
            assert proc.returncode == 128 + signal.SIGTERM, err
            stopped_at = max(r["step"] for r in read_metrics(out) if "loss" in r)
            assert (out / "checkpoints" / f"step-{stopped_at:07d}" / "manifest.json").is_file()

    done = _popen(*base, "train.resume=latest")
    stdout, err = done.communicate(timeout=300)
    said.append(stdout)
    assert done.returncode == 0, err
    assert "Traceback" not in err
    # The kill before the first checkpoint started over; a kill inside a save left a temporary directory that
    # resume=latest named in one line and passed over.
    assert "found no complete checkpoint" in said[1]
    assert any(re.search(r"skipped incomplete checkpoint\(s\) \.tmp-step-\d+", s) for s in said[2:]), said

    a = load_file(finished / "final" / "trainable.safetensors")
    b = load_file(out / "final" / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # each step once, in order
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8, 12]
    ref = {r["step"]: r["loss"] for r in read_metrics(finished) if "loss" in r}
    assert all(r["loss"] == ref[r["step"]] for r in rows if "loss" in r)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, small_data):
    out = tmp_path / "term"
    proc = _popen("train", str(RECIPE), *_overrides(out, small_data, "train.max_steps=400"))
    while proc.poll() is None and not ((out / "metrics.jsonl").is_file() and read_metrics(out)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    ckpt = out / "checkpoints" / f"step-{steps[-1]:07d}"
    assert (ckpt / "manifest.json").is_file()  # train.save_every=0, yet the stop saved one
    assert json.loads((ckpt / "state.json").read_text())["step"] == steps[-1]
    assert not (out / "final").exists()


def _fault_overrides(out: Path, data: dict[str, str], *extra: str) -> list[str]:
    """Two steps, a checkpoint after each (the older one pruned), final/: every kind of file operation a run makes."""
    return ["model.name=tiny-bert", "method.r=4", "method.dropout=0.1", f"data.train={data['train']}",
            "data.eval=null", "data.max_train_samples=16", "data.max_length=16", "train.batch_size=4",
            "train.max_steps=2", "train.save_every=1", "train.save_total_limit=1", "train.log_every=1",
            "train.warmup_steps=0", "train.progress=false", f"train.output_dir={out}", *extra]


def test_a_kill_at_every_file_operation_then_resume_is_bit_identical(tmp_path, small_data, monkeypatch):
    """Not a random moment: the run is stopped at each file operation of its saves in turn (checkpoint.fault_point:
    the run manifest, config.yaml, both checkpoints, the prune, final/), leaving inside sidetune's temporary
    directory the stray file a writer killed mid-write leaves (safetensors' `.tmpXXXXXX`); then
    train.resume=latest finishes the run bit for bit like an uninterrupted one, and no temporary directory is left."""
    from sidetune import checkpoint

    monkeypatch.setenv("SIDETUNE_TEST_FAIL_AT", str(10**9))  # counts, never fires
    checkpoint.reset_fault_count()
    ref = tmp_path / "ref"
    train(load_config(RECIPE, _fault_overrides(ref, small_data)))
    total = checkpoint.reset_fault_count()
    assert total > 40, total
    expected = load_file(ref / "final" / "trainable.safetensors")
    losses = [(r["step"], r["loss"]) for r in read_metrics(ref)]
    for n in range(1, total + 1):
        out = tmp_path / f"kill-{n}"
        monkeypatch.setenv("SIDETUNE_TEST_FAIL_AT", str(n))
        checkpoint.reset_fault_count()
        with pytest.raises(SystemExit):  # what a kill leaves: no except/finally of sidetune's cleaned up for it
            train(load_config(RECIPE, _fault_overrides(out, small_data)))
        monkeypatch.delenv("SIDETUNE_TEST_FAIL_AT")
        train(load_config(RECIPE, _fault_overrides(out, small_data, "train.resume=latest")))
        got = load_file(out / "final" / "trainable.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), n
        assert [(r["step"], r["loss"]) for r in read_metrics(out)] == losses, n
        assert not [p for p in out.rglob(".tmp*")], (n, list(out.rglob(".tmp*")))
        checkpoint.verify(out / "final", key="final")


def test_a_foreign_file_in_an_unmarked_temporary_directory_is_kept_and_the_save_goes_on(tmp_path, small_data):
    """A `.tmp-step-N` sidetune did not create (no mark) holding a file sidetune did not write: renamed aside, never
    deleted, and the save is not blocked (it once died with FileExistsError at every resume)."""
    out = tmp_path / "run"
    train(load_config(RECIPE, _fault_overrides(out, small_data, "train.max_steps=1")))
    stray = out / "checkpoints" / ".tmp-step-0000002" / "notes.txt"
    stray.parent.mkdir(parents=True)
    stray.write_text("mine")
    train(load_config(RECIPE, _fault_overrides(out, small_data, "train.resume=latest")))
    kept = out / "checkpoints" / ".tmp-step-0000002.incomplete-0" / "notes.txt"
    assert kept.read_text() == "mine"
    assert (out / "checkpoints" / "step-0000002" / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Nothing of an earlier run is destroyed


def test_rerun_into_finished_run_changes_nothing(finished, small_data, capsys):
    before = _snapshot(finished)
    rc, _, err = _main(capsys, "train", RECIPE, *_overrides(finished, small_data))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("sidetune: error: ") and "already holds a run" in err
    assert "train.resume=latest" in err and "train.overwrite=true" in err
    assert _snapshot(finished) == before


def test_unrelated_directory_keeps_its_files(tmp_path, small_data, capsys):
    """A directory with someone's final/ and checkpoints/ is refused; with train.overwrite=true sidetune writes its
    run beside their files and deletes none of them (their checkpoint dir in its way is renamed, kept)."""
    out = tmp_path / "theirs"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.bin").write_text("theirs")
    (out / "checkpoints" / "step-0000004").mkdir(parents=True)
    (out / "checkpoints" / "step-0000004" / "notes.txt").write_text("theirs")
    (out / "logs").mkdir()
    (out / "logs" / "x.log").write_text("theirs")
    before = _snapshot(out)
    rc, _, err = _main(capsys, "train", RECIPE, *_overrides(out, small_data, "train.max_steps=8"))
    assert rc == 2 and "already holds a run" in err and _snapshot(out) == before
    rc, _, err = _main(capsys, "train", RECIPE, *_overrides(out, small_data, "train.max_steps=8", "train.save_every=2",
                                                             "train.save_total_limit=2", "train.overwrite=true"))
    assert rc == 0, err
    for name in before:
        moved = name.replace("checkpoints/step-0000004/", "checkpoints/step-0000004.incomplete-0/")
        moved = moved.replace("final/", "final.incomplete-0/")
        assert (out / moved).read_text() == "theirs", name
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-0000004.incomplete-0", "step-0000006", "step-0000008"]  # save_total_limit=2
    # A second overwrite removes what sidetune wrote, and still nothing of theirs.
    rc, _, err = _main(capsys, "train", RECIPE, *_overrides(out, small_data, "train.max_steps=2",
                                                             "train.overwrite=true"))
    assert rc == 0, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004.incomplete-0"]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]


def test_an_overwrite_that_fails_before_its_first_save_gives_the_earlier_run_back(tmp_path, small_data, capsys,
                                                                                   monkeypatch):
    """train.overwrite=true moves the earlier run aside only after every check has passed, and deletes it only after
    the new run's first save: an error before that (a NaN loss here) puts it back at once; a kill (SystemExit at the
    new run's first write) leaves it in .sidetune-trash, reading commands say so, and the next `sidetune train`
    into the directory puts it back."""
    from sidetune import checkpoint

    out = tmp_path / "run"
    train(load_config(RECIPE, _fault_overrides(out, small_data)))
    before = _snapshot(out)
    nan = ["train.overwrite=true", "train.lr=1e30", "train.max_grad_norm=0", "train.scheduler=constant",
           "train.save_every=0", "train.max_steps=12"]
    rc, _, err = _main(capsys, "train", RECIPE, *_fault_overrides(out, small_data, *nan))
    assert rc == 2 and "non-finite" in err, err
    assert _snapshot(out) == before

    monkeypatch.setenv("SIDETUNE_TEST_FAIL_AT", "1")
    checkpoint.reset_fault_count()
    with pytest.raises(SystemExit):
        train(load_config(RECIPE, _fault_overrides(out, small_data, "train.overwrite=true")))
    monkeypatch.delenv("SIDETUNE_TEST_FAIL_AT")
    assert (out / ".sidetune-trash" / "final" / "manifest.json").is_file()
    rc, _, err = _main(capsys, "eval", out)
    assert rc == 2 and ".sidetune-trash" in err and err.count("\n") == 1, err
    rc, stdout, err = _main(capsys, "train", RECIPE, *_fault_overrides(out, small_data))
    assert rc == 2 and "already holds a run" in err and "restored the run" in stdout, (stdout, err)
    assert _snapshot(out) == before
    # Once the overwriting run has saved, the earlier run is gone for good (its files only).
    rc, _, err = _main(capsys, "train", RECIPE, *_fault_overrides(out, small_data, "train.overwrite=true",
                                                                   "train.max_steps=1"))
    assert rc == 0, err
    assert not (out / ".sidetune-trash").exists()
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_a_new_run_that_fails_before_its_first_save_leaves_no_directory(tmp_path, small_data, capsys):
    """A crash before anything was saved leaves nothing that counts as a run (the directory did not exist: it is
    gone again), so the same command can simply be run again once the cause is fixed."""
    out = tmp_path / "new"
    nan = ["train.lr=1e30", "train.max_grad_norm=0", "train.scheduler=constant", "train.save_every=0",
           "train.max_steps=12"]
    rc, _, err = _main(capsys, "train", RECIPE, *_fault_overrides(out, small_data, *nan))
    assert rc == 2 and "non-finite" in err and "no checkpoint yet" in err, err
    assert not out.exists()


def test_a_full_disk_is_one_line_before_the_run_and_while_saving(tmp_path, small_data, capsys, monkeypatch):
    """Too little free space is refused before the directory is touched; a write that fails with ENOSPC (or torch's
    RuntimeError for it) while saving is one line naming the file, and the last complete checkpoint stays."""
    import errno
    import shutil as shutil_mod
    from collections import namedtuple

    import sidetune.rundir

    usage = namedtuple("usage", "total used free")
    real_usage = shutil_mod.disk_usage
    monkeypatch.setattr(sidetune.rundir.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1 << 20))
    out = tmp_path / "run"
    rc, _, err = _main(capsys, "train", RECIPE, *_fault_overrides(out, small_data))
    assert rc == 2 and "MiB free" in err and str(out) in err and err.count("\n") == 1, err
    assert not out.exists()
    monkeypatch.setattr(sidetune.rundir.shutil, "disk_usage", real_usage)

    calls = {"n": 0}
    real = sidetune.rundir.save_file

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3's trainable.safetensors (steps 1 and 2 saved theirs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(sidetune.rundir, "save_file", full)
    rc, _, err = _main(capsys, "train", RECIPE, *_fault_overrides(out, small_data, "train.max_steps=3"))
    assert rc == 2 and err.count("\n") == 1 and "no space left" in err and "trainable.safetensors" in err, err
    assert (out / "checkpoints" / "step-0000002" / "manifest.json").is_file()
    monkeypatch.setattr(sidetune.rundir, "save_file", real)
    rc, _, err = _main(capsys, "train", RECIPE, *_fault_overrides(out, small_data, "train.max_steps=3",
                                                                   "train.resume=latest"))
    assert rc == 0, err


def test_reading_commands_refuse_a_run_in_progress_and_eval_works_from_anywhere(tmp_path, small_data, capsys,
                                                                                 monkeypatch):
    """export, eval and generate refuse a directory whose lock a run holds (its final/ is not this run's yet);
    `sidetune eval RUN` reads the eval file the run recorded as an absolute path, from any directory; errors about
    --data name --data."""
    data_dir = Path(small_data["train"]).parent
    monkeypatch.chdir(data_dir)
    out = tmp_path / "run"
    train(load_config(RECIPE, [*_fault_overrides(out, small_data, "train.max_steps=1", "train.save_every=0"),
                               "data.train=train.tsv", "data.eval=dev.tsv"]))
    assert load_config(out / "final" / "config.yaml").data.eval == str(data_dir / "dev.tsv")
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = _main(capsys, "eval", out)
    assert rc == 0 and json.loads(stdout)["eval_examples"] == 32, err
    rc, _, err = _main(capsys, "eval", out, "--data", "nope.tsv")
    assert rc == 2 and "--data 'nope.tsv'" in err and "data.train" not in err, err
    bad = _tsv(tmp_path, "bad.tsv", [("c", "neutral")])
    rc, _, err = _main(capsys, "eval", out, "--data", bad)
    assert rc == 2 and "--data" in err and "data.eval" not in err and "data.train" not in err, err

    with (out / ".sidetune.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sidetune holds it
        for args in (["eval", out], ["export", out, "--merge", tmp_path / "m"], ["export", out, "--peft", tmp_path / "p"],
                     ["generate", out, "--prompt", "hi"]):
            rc, _, err = _main(capsys, *args)
            assert rc == 2 and "in progress" in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


def test_every_reading_command_verifies_the_run_once(finished, tmp_path, capsys, monkeypatch):
    """One reload path (rundir.open_run(...).load()): eval, export --merge / --peft and sidetune.load verify the
    run's manifest once each."""
    import sidetune
    from sidetune import checkpoint

    calls = []
    real = checkpoint.verify
    monkeypatch.setattr(checkpoint, "verify", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    for args in (["eval", finished], ["export", finished, "--merge", tmp_path / "m"],
                 ["export", finished, "--peft", tmp_path / "p"]):
        calls.clear()
        rc, _, err = _main(capsys, *args)
        assert rc == 0, (args, err)
        assert calls == [finished / "final"], (args, calls)
    calls.clear()
    sidetune.load(finished)
    assert calls == [finished / "final"]


def test_curves_png_of_someone_else_is_refused_and_the_runs_own_is_replaced(tmp_path, small_data, capsys):
    """Every run ends by writing curves.png (listed in its run manifest): one that sidetune did not write is refused
    before any write, with or without train.overwrite; the run's own is replaced by a rerun."""
    out = tmp_path / "plots"
    out.mkdir()
    (out / "curves.png").write_text("theirs")
    before = _snapshot(out)
    for extra in ([], ["train.overwrite=true"]):
        rc, _, err = _main(capsys, "train", RECIPE, *_overrides(out, small_data, "train.max_steps=2", *extra))
        assert rc == 2 and err.count("\n") == 1 and "curves.png, which sidetune did not write" in err, err
        assert _snapshot(out) == before
    (out / "curves.png").unlink()
    rc, _, err = _main(capsys, "train", RECIPE, *_overrides(out, small_data, "train.max_steps=2"))
    assert rc == 0, err
    first = (out / "curves.png").read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curves.png" in json.loads((out / "sidetune-run.json").read_text())["files"]
    rc, _, err = _main(capsys, "train", RECIPE, *_overrides(out, small_data, "train.max_steps=3",
                                                             "train.overwrite=true"))
    assert rc == 0, err
    second = (out / "curves.png").read_bytes()
    assert second[:8] == b"\x89PNG\r\n\x1a\n" and second != first  # three steps plotted, not two


def test_a_failed_curves_png_leaves_the_run_complete(tmp_path, small_data, capsys, monkeypatch):
    def broken(runs, out):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("sidetune.train.plot_runs", broken)
    out = tmp_path / "run"
    rc, stdout, err = _main(capsys, "train", RECIPE, *_overrides(out, small_data, "train.max_steps=1"))
    assert rc == 0, err
    assert "could not write" in stdout and "no fonts" in stdout
    assert (out / "final" / "manifest.json").is_file() and not (out / "curves.png").exists()


def test_lock_refuses_a_concurrent_run(tmp_path, small_data, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    with (out / ".sidetune.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sidetune holds it
        rc, _, err = _main(capsys, "train", RECIPE, *_overrides(out, small_data))
    assert rc == 2 and "another sidetune run is using" in err
    assert [p.name for p in out.iterdir()] == [".sidetune.lock"]


# ---------------------------------------------------------------------------------------------------------------------
# Nothing executable is loaded


class _Payload:
    """Unpickling this touches a marker file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _copy_checkpoint(finished: Path, dest: Path, step: int = 4) -> Path:
    ckpt = dest / "checkpoints" / f"step-{step:07d}"
    shutil.copytree(finished / "checkpoints" / f"step-{step:07d}", ckpt)
    return ckpt


def _rewrite_manifest(ckpt: Path) -> None:
    """What a careful attacker does: a manifest that matches the tampered files."""
    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(ckpt.iterdir()) if p.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))


@pytest.mark.parametrize("where", ["extra_file", "optimizer_with_manifest", "scheduler_with_manifest"])
def test_malicious_pickle_is_neither_run_nor_skipped(tmp_path, small_data, finished, capsys, where):
    marker = tmp_path / "pwned"
    ckpt = _copy_checkpoint(finished, tmp_path / "run")
    if where == "extra_file":  # accelerate's old counter file
        (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"state": _Payload(marker)}, ckpt / ("optimizer.pt" if "optimizer" in where else "scheduler.pt"))
        _rewrite_manifest(ckpt)
    before = _snapshot(tmp_path / "run")
    rc, out, err = _main(capsys, "train", RECIPE, *_overrides(tmp_path / "run", small_data, "train.resume=latest"))
    assert not marker.exists(), "the checkpoint ran code"
    assert rc == 2 and err.startswith("sidetune: error: ") and err.count("\n") == 1, err
    assert ("custom_checkpoint_0.pkl" in err) if where == "extra_file" else ("plain tensors" in err)
    assert "resumed" not in out
    assert _snapshot(tmp_path / "run") == before


def test_package_has_no_pickle_and_only_weights_only_torch_load():
    for path in (ROOT / "sidetune").rglob("*.py"):
        text = path.read_text()
        assert "pickle" not in text, path
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, (path, call)


# ---------------------------------------------------------------------------------------------------------------------
# Every bad input: exit 2, one line naming the offending thing, no traceback, the earlier run untouched


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _tsv(tmp: Path, name: str, rows: list[tuple[str, str]]) -> str:
    return _write(tmp / name, "sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows))


def _model_dir(tmp: Path, weights: str) -> str:
    """A local tiny-bert directory with a damaged config.json, a truncated or a missing weights file."""
    from sidetune.config import ModelConfig
    from sidetune.models import load_model, load_tokenizer

    d = tmp / f"model_{weights}"
    load_model(ModelConfig(name="tiny-bert"), "classification", 2).save_pretrained(d)
    load_tokenizer(ModelConfig(name="tiny-bert")).save_pretrained(d)
    if weights == "corrupt_config":
        (d / "config.json").write_text('{"model_type": "bert", ')
    elif weights == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (d / "model.safetensors").unlink()
    return str(d)


def _ckpt(tmp: Path, finished: Path, damage: str) -> str:
    """A copy of the finished run's step-4 checkpoint, damaged."""
    ckpt = _copy_checkpoint(finished, tmp / "copy")
    if damage == "truncated_optimizer":
        data = (ckpt / "optimizer.pt").read_bytes()
        (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "corrupt_rng":  # damaged on disk
        data = bytearray((ckpt / "rng-0.safetensors").read_bytes())
        data[-5:] = b"\xff" * 5
        (ckpt / "rng-0.safetensors").write_bytes(bytes(data))
    elif damage == "bad_rng_state":  # well-formed file, nonsense state, matching manifest
        save_file({"torch": torch.zeros(7, dtype=torch.uint8), "numpy_keys": torch.zeros(3, dtype=torch.int64)},
                  str(ckpt / "rng-0.safetensors"))
        _rewrite_manifest(ckpt)
    elif damage == "empty":
        shutil.rmtree(ckpt)
        ckpt.mkdir()
    elif damage == "missing_weights":
        (ckpt / "trainable.safetensors").unlink()
    return str(ckpt)


# id -> (overrides built from (tmp, finished), text the error line must contain)
BAD = {
    "dropout>=1": (lambda tmp, f: ["method.dropout=1.5"], "method.dropout"),
    "num_workers<0": (lambda tmp, f: ["train.num_workers=-1"], "train.num_workers"),
    "max_train_samples=0": (lambda tmp, f: ["data.max_train_samples=0"], "data.max_train_samples"),
    "bad_regex": (lambda tmp, f: ["method.targets=re:query[("], "regular expression"),
    "log_every=0": (lambda tmp, f: ["train.log_every=0"], "train.log_every"),
    "warmup_ratio=5": (lambda tmp, f: ["train.warmup_ratio=5"], "train.warmup_ratio"),
    "epochs=0": (lambda tmp, f: ["train.max_steps=null", "train.epochs=0"], "train.epochs"),
    "lr=nan": (lambda tmp, f: ["train.lr=.nan"], "train.lr"),
    "save_total_limit=0": (lambda tmp, f: ["train.save_total_limit=0"], "train.save_total_limit"),
    "num_labels=1": (lambda tmp, f: ["data.num_labels=1"], "data.num_labels"),
    "empty_text_cell": (lambda tmp, f: [f"data.train={_tsv(tmp, 't.tsv', [('good', '1'), (' ', '0')])}"],
                        "column 'sentence' is empty"),
    "unknown_eval_label": (lambda tmp, f: [f"data.train={_tsv(tmp, 't.tsv', [('a', 'pos'), ('b', 'neg')])}",
                                           f"data.eval={_tsv(tmp, 'e.tsv', [('c', 'neutral')])}"], "'neutral'"),
    "eval_label_out_of_range": (lambda tmp, f: [f"data.eval={_tsv(tmp, 'e.tsv', [('c', '5')])}"], "data.eval"),
    "label_above_num_labels": (lambda tmp, f: [f"data.train={_tsv(tmp, 't.tsv', [('a', '0'), ('b', '3')])}",
                                               "data.num_labels=2"], "out of range"),
    "negative_label": (lambda tmp, f: [f"data.train={_tsv(tmp, 't.tsv', [('a', '0'), ('b', '-1')])}"], "negative"),
    "float_labels": (lambda tmp, f: [f"data.train={_tsv(tmp, 't.tsv', [('a', '0.5'), ('b', '1.0')])}"], "0.5"),
    "corrupt_config_json": (lambda tmp, f: [f"model.name={_model_dir(tmp, 'corrupt_config')}"], "config.json"),
    "truncated_weights": (lambda tmp, f: [f"model.name={_model_dir(tmp, 'truncated')}"], "model.name"),
    "missing_weights": (lambda tmp, f: [f"model.name={_model_dir(tmp, 'missing')}"], "model.name"),
    "missing_tokenizer_dir": (lambda tmp, f: [f"model.tokenizer={tmp / 'no_such_dir'}"], "model.tokenizer="),
    "resume_other_r": (lambda tmp, f: [f"train.resume={f / 'checkpoints' / 'step-0000004'}", "method.r=8"],
                       "method.r=4"),
    "resume_other_method_config": (lambda tmp, f: [f"train.resume={f / 'checkpoints' / 'step-0000004'}",
                                                   "method.targets=[query]"], "method.targets"),
    "resume_truncated_optimizer": (lambda tmp, f: [f"train.resume={_ckpt(tmp, f, 'truncated_optimizer')}"],
                                   "optimizer.pt"),
    "resume_corrupt_rng": (lambda tmp, f: [f"train.resume={_ckpt(tmp, f, 'corrupt_rng')}"], "rng-0.safetensors"),
    "resume_bad_rng_state": (lambda tmp, f: [f"train.resume={_ckpt(tmp, f, 'bad_rng_state')}"], "RNG state"),
    "resume_empty_dir": (lambda tmp, f: [f"train.resume={_ckpt(tmp, f, 'empty')}"], "is empty"),
    "resume_missing_weights": (lambda tmp, f: [f"train.resume={_ckpt(tmp, f, 'missing_weights')}"],
                               "trainable.safetensors"),
    "resume_no_such_dir": (lambda tmp, f: [f"train.resume={tmp / 'nope'}"], "train.resume="),
    "max_steps_below_checkpoint": (lambda tmp, f: [f"train.resume={f / 'checkpoints' / 'step-0000008'}",
                                                   "train.max_steps=5"], "step 8"),
    "unknown_key": (lambda tmp, f: ["train.lr_warmup=3"], "train.lr_warmup"),
    "resume_latest_and_overwrite": (lambda tmp, f: ["train.resume=latest", "train.overwrite=true"], "contradict"),
    "resume_own_checkpoint_and_overwrite": (lambda tmp, f: [f"train.resume={f / 'checkpoints' / 'step-0000004'}",
                                                            "train.overwrite=true"], "contradict"),
    "overwrite_with_missing_data": (lambda tmp, f: ["train.overwrite=true", f"data.train={tmp / 'nope.tsv'}"],
                                    "no such data file"),
    "overwrite_with_bad_model": (lambda tmp, f: ["train.overwrite=true", f"model.name={_model_dir(tmp, 'missing')}"],
                                 "model.name"),
    "output_dir_in_proc": (lambda tmp, f: ["train.output_dir=/proc/sidetune-run"], "/proc/sidetune-run"),
    "output_dir_in_sys": (lambda tmp, f: ["train.output_dir=/sys/sidetune-run"], "/sys/sidetune-run"),
    "output_dir_is_a_file": (lambda tmp, f: [f"train.output_dir={_write(tmp / 'a_file', 'x')}"], "is a file"),
    "output_dir_below_a_file": (lambda tmp, f: [f"train.output_dir={_write(tmp / 'b_file', 'x')}/run"],
                                "not a directory"),
    # issue 17: checks that need the model's config or the device, run first in session.build
    "max_length_beyond_positions": (lambda tmp, f: ["data.max_length=100000"], "position table has 512 positions"),
    "causal_lm_on_an_encoder": (lambda tmp, f: ["data.task=causal_lm"], "data.task=causal_lm needs a decoder"),
    "chat_on_an_encoder": (lambda tmp, f: ["data.task=chat"], "data.task=chat needs a decoder"),
    # issue 17: label sets
    "one_class": (lambda tmp, f: [f"data.train={_tsv(tmp, 't.tsv', [('a', '0'), ('b', '0')])}"],
                  "at least two classes"),
    "label_outside_label_names": (lambda tmp, f: ["data.train=" + _tsv(tmp, "t.tsv", [("a", "pos"), ("b", "neg"),
                                                                                      ("c", "neutral")]),
                                                  "data.label_names=[neg,pos]"], "'neutral' (row 3)"),
    "eval_label_outside_training_classes": (
        lambda tmp, f: ["data.train=" + _tsv(tmp, "t.tsv", [("a", "pos"), ("b", "neg")]),
                        "data.eval=" + _tsv(tmp, "e.tsv", [("c", "pos"), ("d", "Pos")])], "'Pos' (row 2)"),
    "stray_number_among_names": (lambda tmp, f: ["data.train=" + _tsv(tmp, "t.tsv", [("a", "pos"), ("b", "neg"),
                                                                                     ("c", "1")])],
                                 "label '1' (row 3)"),
    "json_number_among_names": (lambda tmp, f: ["data.train=" + _write(tmp / "t.jsonl", _MIXED_LABELS)],
                                "label 1 (row 3) in column 'label' is a number among names"),
    "two_spellings_of_a_label": (lambda tmp, f: ["data.train=" + _tsv(tmp, "t.tsv", [("a", "neutral"), ("b", "neg"),
                                                                                     ("c", "Neutral")])],
                                 "differ only in case"),
    "free_text_label_column": (lambda tmp, f: ["data.label_field=sentence"], "looks like free text"),
    # issue 17: file formats
    "txt_as_a_table": (lambda tmp, f: ["data.train=" + _write(tmp / "t.txt", "good\nbad\n")], "a .txt file"),
    "tsv_tab_inside_a_field": (lambda tmp, f: ["data.train=" + _write(tmp / "t.tsv", "sentence\tlabel\na\tb\t0\n")],
                               "line 2 has 3 tab-separated fields"),
    "messages_under_causal_lm": (lambda tmp, f: ["model.name=tiny-llama", "data.task=causal_lm", "data.eval=null",
                                                 "data.train=" + _write(tmp / "m.jsonl", _MESSAGES)],
                                 "data.task=chat"),
}

_MIXED_LABELS = "".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in (("a", "pos"), ("b", "neg"), ("c", 1)))
_MESSAGES = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_and_nothing_touched(case, tmp_path, finished, small_data, capsys):
    make, expected = BAD[case]
    extra = make(tmp_path, finished)
    before = _snapshot(finished)
    rc, out, err = _main(capsys, "train", RECIPE, *_overrides(finished, small_data, *extra))
    assert rc == 2, (out, err)
    assert "Traceback" not in err + out
    assert err.startswith("sidetune: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert _snapshot(finished) == before


def _dup_key_recipe(tmp: Path) -> str:
    return _write(tmp / "dup.yaml", RECIPE.read_text() + "\ntrain:\n  lr: 1.0e-3\n")  # a second train section


# Other commands and arguments (issue 17): id -> (argv built from (tmp, finished run), text the error line must contain)
BAD_COMMANDS = {
    "recipe_is_a_directory": (lambda tmp, f: ["train", str(RECIPES), f"train.output_dir={f}"], "is a directory"),
    "duplicate_yaml_key": (lambda tmp, f: ["train", _dup_key_recipe(tmp), f"train.output_dir={f}"],
                           "appears twice"),
    "generate_negative_temperature": (lambda tmp, f: ["generate", str(f), "--prompt", "hi", "--temperature", "-1"],
                                      "--temperature"),
    "generate_top_k_0": (lambda tmp, f: ["generate", str(f), "--prompt", "hi", "--top-k", "0"], "--top-k"),
    "generate_no_such_device": (lambda tmp, f: ["generate", str(f), "--prompt", "hi", "--device", "tpu"], "--device"),
    "chat_nan_temperature": (lambda tmp, f: ["chat", str(f), "--temperature", "nan"], "--temperature"),
    "chat_max_new_tokens_0": (lambda tmp, f: ["chat", str(f), "--max-new-tokens", "0"], "--max-new-tokens"),
    "profile_out_is_a_file": (lambda tmp, f: ["profile", "--model", "tiny-llama", "--device", "meta", "--methods",
                                              "lora", "--seq", "8", "--batch", "1", "--out", str(f / "config.yaml")],
                              "is a file"),
    "plan_encoder_causal_lm": (lambda tmp, f: ["plan", "--model", "tiny-bert", "--vram", "1GiB", "--methods", "lora"],
                               "--task causal_lm needs a decoder"),
    "profile_seq_beyond_positions": (lambda tmp, f: ["profile", "--model", "tiny-gpt2", "--device", "meta", "--methods",
                                                     "lora", "--seq", "2048", "--out", str(tmp / "p")],
                                     "--seq 2048 is longer than model.name=tiny-gpt2 can read"),
    "plan_out_is_a_directory": (lambda tmp, f: ["plan", "--model", "tiny-llama", "--vram", "1GiB", "--methods", "lora",
                                                "--out", str(f)], "is a directory"),
}
if not torch.cuda.is_available():
    BAD_COMMANDS["generate_cuda_without_cuda"] = (
        lambda tmp, f: ["generate", str(f), "--prompt", "hi", "--device", "cuda"], "no CUDA GPU")


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_bad_command_one_line_and_nothing_touched(case, tmp_path, finished, capsys):
    make, expected = BAD_COMMANDS[case]
    argv = make(tmp_path, finished)
    before = _snapshot(finished)
    rc, out, err = _main(capsys, *argv)
    assert rc == 2, (out, err)
    assert "Traceback" not in err + out
    assert err.startswith("sidetune: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert _snapshot(finished) == before


def test_bad_input_from_the_real_command_line(finished, small_data):
    """The same, through a fresh `python -m sidetune` process (no test harness between it and the user)."""
    before = _snapshot(finished)
    r = subprocess.run([sys.executable, "-m", "sidetune", "train", str(RECIPE),
                        *_overrides(finished, small_data, "train.warmup_ratio=5")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("sidetune: error:")] == r.stderr.splitlines()[-1:]
    assert "train.warmup_ratio" in r.stderr
    assert _snapshot(finished) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on CUDA")
def test_fp16_on_cpu_is_refused_before_anything_is_written(finished, small_data):
    """In a fresh process: accelerate's state is per process, and a test process has made it with no mixed precision
    already. Without the check the run trained in float32 while its config.yaml said fp16."""
    before = _snapshot(finished)
    r = subprocess.run([sys.executable, "-m", "sidetune", "train", str(RECIPE),
                        *_overrides(finished, small_data, "train.mixed_precision=fp16")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [line for line in r.stderr.splitlines() if line.startswith("sidetune: error:")]
    assert len(r.stderr.splitlines()) == 1 and "train.mixed_precision=fp16 needs a CUDA GPU" in r.stderr
    assert _snapshot(finished) == before


# ---------------------------------------------------------------------------------------------------------------------
# Numerical faults


def test_nonfinite_stops_with_one_line_or_is_skipped(tmp_path, small_data, capsys):
    out = tmp_path / "nan"
    # An lr of 1e30 blows the LoRA weights up within a few steps: the loss turns inf/NaN.
    args = _overrides(out, small_data, "train.lr=1e30", "train.max_grad_norm=0", "train.save_every=1",
                      "train.eval_every=0", "train.warmup_steps=0", "train.scheduler=constant")
    rc, _, err = _main(capsys, "train", RECIPE, *args)
    assert rc == 2 and err.count("\n") == 1, err
    step = int(re.search(r"at step (\d+)", err).group(1))
    assert "train.lr" in err and "bf16" in err and f"step-{step - 1:07d}" in err
    assert (out / "checkpoints" / f"step-{step - 1:07d}" / "manifest.json").is_file()  # the last good one is kept
    assert not (out / "checkpoints" / f"step-{step:07d}").exists()

    skip = tmp_path / "skip"
    rc, _, err = _main(capsys, "train", RECIPE, *_overrides(skip, small_data, *args[-5:], "train.lr=1e30",
                                                             "train.skip_nonfinite=true"))
    assert rc == 0, err
    rows = [r for r in read_metrics(skip) if "loss" in r]
    assert rows[-1]["skipped_nonfinite"] == 12 - (step - 1)
    final = load_file(skip / "final" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_out_of_memory_becomes_one_line_with_the_plan_command(small_data, tmp_path):
    from sidetune.train import _oom_message

    cfg = load_config(RECIPE, _overrides(tmp_path, small_data))
    msg = _oom_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), cfg, 7,
                       torch.device("cpu"))
    assert "\n" not in msg and "step 7" in msg
    assert "sidetune plan --model tiny-bert" in msg and "--batch 4" in msg and "--methods lora" in msg


# ---------------------------------------------------------------------------------------------------------------------
# A preset's initialisation follows train.seed


def test_preset_init_follows_train_seed():
    from sidetune.session import build

    def weights(seed: int) -> torch.Tensor:
        cfg = load_config(RECIPE, ["model.name=tiny-bert", f"train.seed={seed}"])
        return build(cfg, "cpu", with_data=False).base.bert.embeddings.word_embeddings.weight.detach().clone()

    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(2))
