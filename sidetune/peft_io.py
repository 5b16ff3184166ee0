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
from typing import Any

import torch
from torch import nn

from sidetune.errors import SidetuneError

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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


def lora_peft_config(model: nn.Module, layers: dict[str, nn.Module], r: int, alpha: float, dropout: float,
                     rslora: bool, fan_in_fan_out: bool) -> dict[str, Any]:
    """The LoRA fields of adapter_config.json for a model whose wrapped layers are `layers` (name -> LoRA layer)."""
    from sidetune.methods import trainable_parameters

    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    # PEFT matches target names as suffixes: the short leaf names when they pick exactly the wrapped layers.
    same = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves} == set(layers)
    lora_params = {f"{n}.{w}.weight" for n in layers for w in ("lora_A", "lora_B")}
    others = sorted({n.rsplit(".", 1)[0] for n in trainable_parameters(model) if n not in lora_params})
    return {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
            "target_modules": leaves if same else sorted(layers), "fan_in_fan_out": fan_in_fan_out,
            "modules_to_save": others or None}


def load_peft_adapter(model: nn.Module, path: str | Path, r: int, alpha: float, rslora: bool) -> None:
    """Copy a PEFT LoRA adapter's weights into a model LoRA has just wrapped (`method.init_from`). The adapter must
    have this run's rank, alpha and scaling, and its LoRA layers must be exactly this run's targets."""
    from safetensors.torch import load_file

    from sidetune.methods import trainable_parameters

    key = "method.init_from"
    path = Path(path).expanduser()
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise SidetuneError(f"{key}={str(path)!r} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS})")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise SidetuneError(f"{key}: the adapter is {config.get('peft_type')}{' with DoRA' if config.get('use_dora') else ''}"
                            f"; only plain LoRA adapters can start a lora run")
    for name, theirs, ours in (("r", config.get("r"), r), ("alpha", config.get("lora_alpha"), alpha),
                               ("rslora", bool(config.get("use_rslora")), rslora)):
        if theirs != ours and not (isinstance(theirs, (int, float)) and float(theirs) == float(ours)):
            raise SidetuneError(f"{key}: the adapter has {'lora_' if name == 'alpha' else ''}{name}={theirs} but "
                                f"this run has method.{name}={ours}; set method.{name}={theirs}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise SidetuneError(f"{key}: the adapter sets per-layer ranks or alphas (rank_pattern / alpha_pattern), "
                            f"which sidetune's LoRA does not have")
    state = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items()}
    trainable = trainable_parameters(model)
    ours_lora = {n for n in trainable if ".lora_" in n}
    theirs_lora = {n for n in state if ".lora_" in n}
    if ours_lora != theirs_lora:
        extra, missing = sorted(theirs_lora - ours_lora), sorted(ours_lora - theirs_lora)
        raise SidetuneError(f"{key}: the adapter's LoRA layers differ from this run's method.targets (adapter "
                            f"only: {[n.rsplit('.', 2)[0] for n in extra[:2]]}, run only: "
                            f"{[n.rsplit('.', 2)[0] for n in missing[:2]]}); set method.targets to the adapter's "
                            f"target_modules {config.get('target_modules')}")
    unknown = sorted(set(state) - set(trainable))
    if unknown:
        raise SidetuneError(f"{key}: the adapter holds {unknown[0]!r}, which this run does not train")
    with torch.no_grad():
        for name, tensor in state.items():
            if trainable[name].shape != tensor.shape:
                raise SidetuneError(f"{key}: {name} has shape {tuple(tensor.shape)} in the adapter but "
                                    f"{tuple(trainable[name].shape)} here; is it for another base model?")
            trainable[name].copy_(tensor)
