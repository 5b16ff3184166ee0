"""`sidetune export RUN_DIR --merge OUT`: the merged plain model gives the run's logits, loads with transformers alone,
and non-mergeable methods fail in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch_for
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from sidetune.cli import main
from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.export import export_merged
from sidetune.methods.lora import LoRALinear, lora_layers, merge_and_unwrap
from sidetune.rundir import load_run, save_trainable
from sidetune.session import build


def _run(tmp_path, *overrides, seed=1):
    """A finished run with trained-looking weights: LoRA B (and any head) randomised, saved like the trainer does."""
    cfg = load_config(None, ["method.name=lora", "method.targets=all-linear", f"train.output_dir={tmp_path}/run",
                             *overrides])
    cfg.data.num_labels = 2 if cfg.data.task == "classification" else None
    model = build(cfg, torch.device("cpu"), with_data=False).model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    save_trainable(model, cfg, tmp_path / "run" / "final")
    return tmp_path / "run", model


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_qlora_merge_equals_the_run_and_dequantizing_is_the_right_base(tmp_path):
    run, _ = _run(tmp_path, "model.name=tiny-llama", "model.quantize=nf4", "data.task=causal_lm")
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (out / "tokenizer.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(type(m) is not LoRALinear and "4bit" not in type(m).__name__ for m in merged.modules())
    unmerged, _ = load_run(run)  # the 4-bit base + LoRA, as trained and evaluated
    batch = batch_for(merged, "causal_lm")
    expected = _logits(unmerged, batch)
    assert_close(_logits(merged, batch), expected, rtol=1e-4, atol=1e-4)

    # The merge did something: without LoRA the dequantized base is far off ...
    plain, _ = load_run(run)
    for layer in lora_layers(plain):
        layer.lora_B.weight.data.zero_()
    assert (_logits(plain, batch) - expected).abs().max() > 1e-2
    # ... and merging into the ORIGINAL high-precision weights instead of the dequantized ones misses the run by the
    # NF4 rounding error, orders of magnitude more than the export's float error.
    original, _ = _run(tmp_path / "fp", "model.name=tiny-llama", "data.task=causal_lm")
    original_model = merge_and_unwrap(load_run(original)[0])
    miss = (_logits(original_model, batch) - expected).abs().max()
    ours = (_logits(merged, batch) - expected).abs().max()
    print(f"export error {ours:.2e}, original-weights merge error {miss:.2e}")
    assert miss > 100 * ours and miss > 1e-3, (miss, ours)


@pytest.mark.parametrize("preset,task,quantize", [("tiny-llama", "classification", "nf4"),
                                                  ("tiny-bert", "classification", None),
                                                  ("tiny-gpt2", "causal_lm", None)])  # GPT-2: Conv1D, W stored as W^T
def test_export_per_family_keeps_the_trained_head(tmp_path, preset, task, quantize):
    extra = [f"model.quantize={quantize}"] if quantize else []
    run, _ = _run(tmp_path, f"model.name={preset}", f"data.task={task}", *extra)
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", str(out)]) == 0
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    merged = auto.from_pretrained(out).eval()
    unmerged, _ = load_run(run)
    batch = batch_for(merged, task)
    assert_close(_logits(merged, batch), _logits(unmerged, batch), rtol=1e-4, atol=1e-4)


def test_bf16_export_within_rounding(tmp_path):
    run, _ = _run(tmp_path, "model.name=tiny-llama", "model.quantize=nf4", "data.task=causal_lm")
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", str(out), "--dtype", "bfloat16"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.get_input_embeddings().weight.dtype == torch.bfloat16
    unmerged, _ = load_run(run)
    batch = batch_for(merged, "causal_lm")
    expected = _logits(unmerged, batch)
    actual = _logits(merged.float(), batch)  # bf16 weights, computed in fp32
    assert (actual - expected).abs().max() < 0.02 * expected.abs().max()


def test_non_mergeable_methods_and_bad_targets_fail_in_one_line(tmp_path, capsys):
    cfg = load_config(None, ["model.name=tiny-llama", "method.name=adapter", "data.task=causal_lm"])
    model = build(cfg, torch.device("cpu"), with_data=False).model
    save_trainable(model, cfg, tmp_path / "adapter" / "final")
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "adapter"), "--merge", str(out)]) == 2  # the CLI's exit status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sidetune: error: method 'adapter' cannot be merged"), err
    assert not out.exists()

    run, _ = _run(tmp_path, "model.name=tiny-llama", "data.task=causal_lm")
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SidetuneError, match="exists and is not empty"):
        export_merged(run, out)
    assert main(["export", str(tmp_path / "nope"), "--merge", str(out)]) == 2


def test_int8_base_export(tmp_path):
    # LLM.int8 also quantizes the activations in the unmerged model, so the float export differs by that rounding.
    run, _ = _run(tmp_path, "model.name=tiny-llama", "model.quantize=int8", "data.task=causal_lm")
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    unmerged, _ = load_run(run)
    batch = batch_for(merged, "causal_lm")
    expected = _logits(unmerged, batch)
    assert (_logits(merged, batch) - expected).abs().max() < 0.02 * expected.abs().max()
