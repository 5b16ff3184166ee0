"""Shared fixtures: offline mode, tiny models, small data files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from sidetune.config import ModelConfig
from sidetune.data import ASSETS
from sidetune.models import load_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
    elif task == "causal_lm":
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
