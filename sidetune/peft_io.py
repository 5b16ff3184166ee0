"""PEFT-format adapters, both ways: `sidetune export RUN --peft OUT` writes a run as `adapter_config.json` +
`adapter_model.safetensors` that `peft.PeftModel.from_pretrained(base, OUT)` loads (and so vLLM / TGI / any PEFT
consumer), and `method.init_from: PEFT_DIR` starts a LoRA run from such an adapter.

Why this is a renaming and nothing more: sidetune's LoRA layers hold `lora_A.weight` / `lora_B.weight` under the
wrapped layer's own name and compute W x + (alpha / r) B A x exactly as PEFT does, so a PEFT key is sidetune's
parameter name under the `base_model.model.` prefix. A freshly initialised task head (a classifier) is trained
whole; PEFT calls that `modules_to_save` and stores it under the same prefix.

Which methods export: those whose `Method.peft_config` says how (LoRA / QLoRA); the others refuse in one line.

The base. `base_model_name_or_path` names a directory `from_pretrained` loads: the local checkpoint of a model
directory or of an alias (smollm2-135m: the converted copy in sidetune's cache). A preset (tiny-llama, ...) is random
weights that exist nowhere on disk, so its base is saved into OUT/base and named there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sidetune.errors import SidetuneError
from sidetune.methods._peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PREFIX", "export_peft", "peft_task_type"]


def peft_task_type(task) -> str:
    """PEFT's task_type for a sidetune Task (what AutoPeftModel picks the model class by)."""
    if task.classifies:
        return "SEQ_CLS"
    return "SEQ_2_SEQ_LM" if task.seq2seq else "CAUSAL_LM"


def export_peft(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the run as a PEFT adapter directory (plus its tokenizer, and its base when that is a preset)."""
    from safetensors.torch import save_file

    from sidetune.methods import trainable_parameters
    from sidetune.models import PRESETS, _quiet_transformers, load_model, resolve_path
    from sidetune.session import build
    from sidetune.train import load_trainable, run_config

    cfg, weights = run_config(run_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SidetuneError(f"export target {str(out)!r} exists and is not empty; pick a new directory or pass "
                            f"--overwrite")
    s = build(cfg, "cpu", with_data=False)
    load_trainable(s.model, weights)
    config = s.method.peft_config(s.model)
    if config is None:
        raise SidetuneError(f"method {cfg.method.name!r} has no PEFT format (PEFT serves LoRA-style updates); serve "
                            f"the run with sidetune.load(RUN_DIR) instead")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model.name in PRESETS:
        # Random-init weights exist nowhere else: save exactly the base this run trained on (same seed).
        base_dir = out / "base"
        base = load_model(cfg.model, s.method.model_task(s.task), cfg.data.num_labels, "cpu",
                          s.tokenizer.pad_token_id, seed=cfg.train.seed)
        with _quiet_transformers():
            base.save_pretrained(base_dir)
        s.tokenizer.save_pretrained(base_dir)
        base_path = base_dir.resolve()
    else:
        base_path = resolve_path(cfg.model.name).resolve()
    config = {"peft_type": "LORA", "task_type": peft_task_type(s.task), "base_model_name_or_path": str(base_path),
              "inference_mode": True, "bias": "none", **config}
    state = {PREFIX + n: p.detach().to("cpu", torch.float32).contiguous()
             for n, p in trainable_parameters(s.model).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if s.tokenizer is not None:
        s.tokenizer.save_pretrained(out)
    if cfg.data.label_names:
        (out / "label_names.json").write_text(json.dumps(cfg.data.label_names) + "\n")
    return out
