"""sidetune: one trainer for memory-efficient fine-tuning (LST, Q-LST, LoRA/QLoRA, adapters, P-tuning v2)."""

from __future__ import annotations

__version__ = "0.1.0"


def load(run_dir, device="cpu"):
    """Load a finished run: returns (model, tokenizer), the model in eval mode with its trained weights, ready to
    predict (`model(**batch)`) or generate. A classifier's `model.config.id2label` holds the run's label names."""
    from sidetune.compat import check_versions

    check_versions()  # a dependency outside pyproject.toml's ranges: one SidetuneError line before anything loads
    from sidetune.rundir import open_run
    from sidetune.tasks import get_task

    s = open_run(run_dir).load(device)
    model, tokenizer, data = s.model, s.tokenizer, s.cfg.data
    names = data.label_names
    if names and get_task(data.task).classifies:  # a classifier: its label names
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
    return model, tokenizer


__all__ = ["__version__", "load"]
