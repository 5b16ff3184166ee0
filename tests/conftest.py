"""Shared fixtures: offline mode, tiny models, small data files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models are all small ops, where a second OpenMP thread only adds barrier waits (on a busy 2-core machine
# ~20 ms per op). One thread by default, for this process and the CLI subprocesses tests start; the few real-weight
# tests ask for every core with the `all_cores` fixture.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sidetune.config import ModelConfig
from sidetune.data import ASSETS
from sidetune.methods import Context
from sidetune.models import load_model, load_tokenizer

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m sidetune ARGS` in a fresh process (this checkout's code first on the path), offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sidetune", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def all_cores():
    """Real-weight tests: MiniLM / SmolLM2 matmuls are big enough for every core to help."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str, task: str, num_labels: int | None = 2, **model_kwargs) -> torch.nn.Module:
    """A random-init tiny preset (seeded, so two calls give identical weights)."""
    return load_model(ModelConfig(name=name, **model_kwargs), task, num_labels, "cpu")


def batch_for(model: torch.nn.Module, task: str, batch: int = 2, seq: int = 12, seed: int = 0) -> dict:
    """A random batch for `model`, with padding in the first row so masks are exercised."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, 1000)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "classification":
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    elif task in ("causal_lm", "chat", "preference"):
        out["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        out["labels"] = torch.randint(3, vocab, (batch, seq // 2), generator=g)
    return out


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory) -> dict[str, str]:
    """The first 512 / 128 rows of the bundled SST-2 as TSV files."""
    root = tmp_path_factory.mktemp("sst2")
    paths = {}
    for split, n in (("train", 512), ("dev", 128)):
        lines = (ASSETS / "sst2" / f"{split}.tsv").read_text().splitlines()[: n + 1]
        path = Path(root) / f"{split}.tsv"
        path.write_text("\n".join(lines) + "\n")
        paths[split] = str(path)
    return paths


def ctx(task_or_model) -> Context:
    """The method context for a task name, or for a tiny model (its task read off its class: tests only; the trainer
    always knows its task)."""
    if isinstance(task_or_model, str):
        # Loaded only if a method asks (PET tokenizes its pattern): the tokenizer tiny-llama borrows, and the label
        # names of the two classes batch_for draws.
        return Context.for_task(task_or_model, load_tokenizer=lambda: load_tokenizer(ModelConfig(name="tiny-llama")),
                                label_names=["negative", "positive"])
    model = task_or_model
    name = type(model).__name__
    task = ("classification" if "SequenceClassification" in name else
            "seq2seq" if model.config.is_encoder_decoder else "causal_lm")
    return Context.for_task(task)


def adam_losses(model: torch.nn.Module, batch: dict, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """The loss at each of `steps` Adam steps on one fixed batch, training only the trainable set."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses
