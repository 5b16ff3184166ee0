"""Dependency versions (sidetune/compat.py): a release outside pyproject.toml's ranges is refused at start in one line
(the CLI and sidetune.load), the ranges are read from pyproject.toml itself, and the API adaptations detect what the
installed transformers offers."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
from conftest import ctx, tiny
from transformers.models.llama.modeling_llama import LlamaModel

import sidetune
from sidetune import compat
from sidetune.cli import main
from sidetune.errors import SidetuneError

ROOT = Path(__file__).resolve().parents[1]


def _pretend(monkeypatch, **versions: str) -> None:
    """Make compat see these installed versions (the others as they are)."""
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version",
                        lambda name: versions.get(name.lower().replace("-", "_")) or real(name))


def test_the_installed_versions_are_in_the_declared_ranges():
    compat.check_versions()  # the environment this suite runs in is one sidetune declares it supports


def test_ranges_are_pyproject_dependencies():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert compat.declared_requirements() == declared
    assert any(r.startswith("transformers") for r in declared) and any(r.startswith("torch") for r in declared)


def test_installed_metadata_is_read_without_a_source_tree(monkeypatch):
    monkeypatch.setattr(compat, "__file__", "/nowhere/sidetune/compat.py")
    monkeypatch.setattr(compat.metadata, "requires",
                        lambda dist: ["torch>=2.6", "transformers<6,>=5.0", 'pytest>=8; extra == "dev"'])
    assert compat.declared_requirements() == ["torch>=2.6", "transformers<6,>=5.0"]


@pytest.mark.parametrize("found,ok", [("4.57.6", False), ("6.0.0", False), ("5.0.0", True), ("5.25.0.dev0", True)])
def test_transformers_range(monkeypatch, found, ok):
    _pretend(monkeypatch, transformers=found)
    problem = compat.version_problem("transformers>=5.0,<6")
    assert (problem is None) == ok, problem
    if not ok:
        assert problem.startswith(f"transformers {found} is installed, but sidetune supports transformers>=5.0,<6")


@pytest.mark.parametrize("found,ok", [("2.5.1+cu121", False), ("2.13.0+cpu", True), ("2.11.0", True)])
def test_a_local_torch_build_is_compared_by_its_release(monkeypatch, found, ok):
    _pretend(monkeypatch, torch=found)
    assert (compat.version_problem("torch>=2.6") is None) == ok


def test_cli_refuses_an_out_of_range_release_in_one_line(monkeypatch, capsys, tmp_path):
    _pretend(monkeypatch, transformers="4.57.6")
    assert main(["eval", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sidetune: error: transformers 4.57.6 is installed, but sidetune supports transformers"), err
    assert not (tmp_path / "run").exists()


def test_load_refuses_an_out_of_range_release(monkeypatch, tmp_path):
    _pretend(monkeypatch, accelerate="0.34.2")
    with pytest.raises(SidetuneError, match=r"^accelerate 0\.34\.2 is installed, but sidetune supports accelerate>="):
        sidetune.load(tmp_path / "no-such-run")  # refused before the run directory is even looked at


def test_a_missing_package_is_left_to_its_import(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda name: None)
    assert compat.version_problem("bitsandbytes>=0.47") is None


def test_the_cache_keyword_is_the_one_the_installed_models_take():
    # transformers 5.0-5.23: past_key_values; 5.24+: cache (past_key_values a deprecated alias). The floors CI
    # environment runs the other branch.
    assert compat.cache_arg() in inspect.signature(LlamaModel.forward).parameters
    model = tiny("tiny-llama", "causal_lm", None).eval()
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        cache = compat.returned_cache(model(input_ids=ids[:, :6], use_cache=True))
        assert cache.get_seq_length() == 6
        step = model(input_ids=ids[:, 6:], use_cache=True, **compat.cache_kwargs(cache))
    assert compat.returned_cache(step).get_seq_length() == 7
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)


def test_prefix_methods_refuse_checkpointing_where_transformers_would_drop_the_prefix(monkeypatch):
    # transformers < 5.15 sets every cache to None inside a checkpointed block: the prefix would silently vanish.
    from sidetune.methods import _prefix
    from sidetune.methods.ptuning_v2 import PTuningV2, PTuningV2Config

    model = PTuningV2(PTuningV2Config()).apply(tiny("tiny-llama", "causal_lm", None), ctx("causal_lm"))
    monkeypatch.setattr(_prefix, "block_checkpointing_keeps_cache", lambda: False)
    with pytest.raises(SidetuneError, match=r"needs transformers >= 5\.15 .*set train\.gradient_checkpointing=false"):
        model.gradient_checkpointing_enable()
    monkeypatch.undo()
    if compat.block_checkpointing_keeps_cache():
        model.gradient_checkpointing_enable()  # where transformers can keep it, it is kept (tests/test_ptuning_v2.py)
