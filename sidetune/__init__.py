"""sidetune: one trainer for memory-efficient fine-tuning (LST, Q-LST, LoRA/QLoRA, adapters, P-tuning v2)."""

from __future__ import annotations

__version__ = "0.1.0"


def load(run_dir, device="cpu"):
    """Load a finished run: returns (model, tokenizer), the model in eval mode with its trained weights, ready to
    predict (`model(**batch)`) or generate."""
    from sidetune.train import load_run

    return load_run(run_dir, device)


__all__ = ["__version__", "load"]
