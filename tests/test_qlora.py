"""QLoRA = LoRA on a 4-bit base: no fp32 upcast of embeddings / LM head, gradient checkpointing that really trains
LoRA (the peft #137 trap), forward equal to PEFT's QLoRA, the bitsandbytes optimizers, and a CLI run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, batch_for, ctx, read_metrics, run_cli, tiny
from torch.testing import assert_close

from sidetune.config import ModelConfig, TrainConfig, load_config
from sidetune.methods.lora import LoRA, LoRAConfig, lora_layers
from sidetune.models import load_model, load_tokenizer
from sidetune.session import build, make_optimizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """tiny-llama saved as an ordinary bf16 checkpoint (+ tokenizer): loading it with model.quantize=nf4 goes through
    transformers' bitsandbytes quantizer, like a real model would."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("tiny-llama", "causal_lm", dtype="bfloat16").save_pretrained(path)
    load_tokenizer(ModelConfig(name="tiny-llama")).save_pretrained(path)
    return path


def _float_bytes(model, frozen_only: bool = False) -> dict[str, int]:
    return {n: p.numel() * p.element_size() for n, p in model.named_parameters()
            if p.is_floating_point() and not (frozen_only and p.requires_grad)}


@pytest.mark.parametrize("source", ["preset", "checkpoint"])
def test_no_fp32_upcast_of_embeddings_or_head(source, llama_dir):
    name = "tiny-llama" if source == "preset" else str(llama_dir)
    loaded = load_model(ModelConfig(name=name, quantize="nf4", dtype="bfloat16"), "causal_lm", None, "cpu")
    before = _float_bytes(loaded)
    assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16
    # The trainer's path: session.build() (load + LoRA all-linear) and its non-reentrant gradient checkpointing.
    cfg = load_config(None, [f"model.name={name}", "model.quantize=nf4", "model.dtype=bfloat16", "method.name=lora",
                             "method.targets=all-linear", "data.task=causal_lm", "train.gradient_checkpointing=true"])
    s = build(cfg, torch.device("cpu"), with_data=False)
    model = s.model
    s.module.train()(**batch_for(model, "causal_lm")).loss.backward()
    after = {n.replace(".base.", "."): b for n, b in _float_bytes(model, frozen_only=True).items()}
    assert after == before  # every frozen float tensor kept its dtype: not one byte of upcast
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        assert module.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA's fp32 master weights
    assert all(p.dtype == torch.uint8 for n, p in model.named_parameters() if ".base.weight" in n)  # still 4-bit

    # What the check guards against: PEFT's k-bit preparation upcasts every bf16 tensor (bitsandbytes #1569).
    peft = pytest.importorskip("peft")
    prepared = peft.prepare_model_for_kbit_training(
        load_model(ModelConfig(name=name, quantize="nf4", dtype="bfloat16"), "causal_lm", None, "cpu"),
        gradient_checkpointing_kwargs={"use_reentrant": False})
    assert prepared.get_input_embeddings().weight.dtype == torch.float32
    assert sum(_float_bytes(prepared).values()) > 1.9 * sum(before.values())


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_trains_lora_without_the_input_grad_trap():
    base = tiny("tiny-llama", "causal_lm", quantize="nf4")
    batch = batch_for(base, "causal_lm")
    runs = {}
    for mode in ("off", "non-reentrant", "reentrant"):
        torch.manual_seed(0)  # the same LoRA A init in every run
        model = LoRA(LoRAConfig(targets=["all-linear"])).apply(copy.deepcopy(base), ctx(base)).train()
        if mode != "off":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
            # transformers 5.x now always forces requires_grad on the embeddings' output (the peft #137 workaround,
            # which makes backward compute an input gradient nobody needs). Non-reentrant checkpointing must not
            # need it.
            model.disable_input_require_grads()
        loss = model(**batch).loss
        if mode == "reentrant":
            # The trap this avoids (peft #137): a reentrant checkpoint whose inputs need no grad cuts the graph, so
            # no LoRA weight is reachable from the loss at all.
            assert not loss.requires_grad
            continue
        loss.backward()
        runs[mode] = model
    off, ours = _grads(runs["off"]), _grads(runs["non-reentrant"])
    b_names = [n for n in off if "lora_B" in n]
    assert b_names and all(off[n].abs().sum() > 0 for n in b_names)  # B = 0 at init, so only B has a gradient yet
    for name in off:
        assert_close(ours[name], off[name], rtol=1e-4, atol=1e-7)

    # One optimizer step through the trainer's optimizer really moves the LoRA weights.
    model = runs["non-reentrant"]
    optimizer = make_optimizer(model, LoRA(LoRAConfig()), TrainConfig(lr=1e-2), torch.device("cpu"))
    optimizer.step()
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(model))


def test_lora_on_4bit_base_matches_peft_qlora(llama_dir):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    cfg = ModelConfig(name=str(llama_dir), quantize="nf4", compute_dtype="float32")
    base = load_model(cfg, "causal_lm", None, "cpu").eval()
    ours = LoRA(LoRAConfig(targets=["all-linear"], r=4, alpha=8)).apply(load_model(cfg, "causal_lm", None, "cpu"), ctx("causal_lm"))
    ref = peft.get_peft_model(load_model(cfg, "causal_lm", None, "cpu"),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    ref_layers = {n.removeprefix("base_model.model."): m for n, m in ref.named_modules() if hasattr(m, "lora_A")}
    assert ref_layers and all(isinstance(m, PeftLinear4bit) for m in ref_layers.values())  # PEFT's QLoRA layer
    ours_layers = {n: m for n, m in ours.named_modules() if m in lora_layers(ours)}
    assert set(ours_layers) == set(ref_layers) and len(ours_layers) == 4 * 7
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in ours_layers.items():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
            ref_layers[name].lora_A["default"].weight.copy_(layer.lora_A.weight)
            ref_layers[name].lora_B["default"].weight.copy_(layer.lora_B.weight)
    batch = batch_for(base, "causal_lm")
    batch.pop("labels")
    with torch.no_grad():
        actual, expected = ours.eval()(**batch).logits, ref.eval()(**batch).logits
        assert (actual - base(**batch).logits).abs().max() > 1e-2
    assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,expected", [("paged_adamw_32bit", "AdamW"), ("adamw_8bit", "AdamW8bit"),
                                           ("paged_adamw_8bit", "AdamW8bit")])
def test_bitsandbytes_optimizers_fall_back_on_cpu_and_step(name, expected):
    model = LoRA(LoRAConfig(targets=["all-linear"])).apply(tiny("tiny-llama", "causal_lm", quantize="nf4"), ctx("causal_lm"))
    optimizer = make_optimizer(model, LoRA(LoRAConfig()), TrainConfig(optimizer=name, lr=1e-2), torch.device("cpu"))
    assert type(optimizer).__name__ == expected
    model(**batch_for(model, "causal_lm")).loss.backward()
    optimizer.step()
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(model))


def test_qlora_trains_through_the_cli(tmp_path, sst2_small):
    # python -m sidetune train with the QLoRA recipe on tiny-llama: nf4, all-linear, paged AdamW (CPU fallback),
    # gradient checkpointing, chunked loss. The loss falls and every LoRA B has moved off zero.
    out = tmp_path / "run"
    result = run_cli(
        "train", str(RECIPES / "smollm2_qlora.yaml"),
         "model.name=tiny-llama",
         f"data.train={sst2_small['train']}", f"data.eval={sst2_small['dev']}", "data.max_length=32",
         "data.max_train_samples=16", "data.max_eval_samples=8", "train.max_steps=12", "train.batch_size=8",
         "train.lr=1e-2", "train.log_every=1", "train.eval_every=0", "train.progress=false",
         f"train.output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "paged_adamw_32bit needs CUDA" in result.stdout
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    # A random tiny Llama's tied head has tiny logits (embeddings of std 0.02), so the loss can only fall slowly.
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4]) - 0.4, losses
    from safetensors.torch import load_file

    saved = load_file(out / "final" / "trainable.safetensors")
    b = [v for k, v in saved.items() if k.endswith("lora_B.weight")]
    assert len(b) == 4 * 7 and all(v.abs().sum() > 0 for v in b)
