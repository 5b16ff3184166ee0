"""LoRA-GA (method.init=lora_ga): the hook gradient equals autograd's, A and B are the gradient's singular vectors at
the stable scale, step 0 equals the base (the offset is in the frozen weight), the first step gains more than the
standard init's, and missing calibration data or a 4-bit base is refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, tiny
from torch.testing import assert_close

from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.methods import Context, build_method, trainable_parameters
from sidetune.methods._inject import find_targets
from sidetune.methods._lora_ga import mean_gradients
from sidetune.methods.lora import LoRA, LoRAConfig, lora_layers
from sidetune.rundir import load_run, save_trainable
from sidetune.session import build

CASES = [("tiny-llama", "causal_lm"), ("tiny-llama", "classification"), ("tiny-gpt2", "causal_lm"),
         ("tiny-bert", "classification")]


def _ga(base, task, batches, **cfg):
    cfg = {"init": "lora_ga", "targets": ["all-linear"], **cfg}
    ctx = Context.for_task(task, calibration=batches)
    return LoRA(LoRAConfig(**cfg)).apply(copy.deepcopy(base), ctx)


def _reference_grads(base, names, batches):
    """dL/dW by plain autograd, with the target weights temporarily trainable, averaged over the batches."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    for batch in batches:
        model(**batch).loss.backward()
    out = {}
    for n, w in weights.items():
        g = w.grad / len(batches)
        out[n] = g.T if type(model.get_submodule(n)).__name__ == "Conv1D" else g
    return out


@pytest.mark.parametrize("preset,task", CASES)
def test_hook_gradient_equals_autograd(preset, task):
    base = tiny(preset, task).eval()
    batches = [batch_for(base, task, seed=s) for s in range(2)]
    names = find_targets(base, ["all-linear"])
    before = {n: (p.requires_grad, p.grad) for n, p in base.named_parameters()}
    got = mean_gradients(base, {n: base.get_submodule(n) for n in names}, batches)
    # Nothing about the parameters changed: no grad written, requires_grad as it was.
    assert {n: (p.requires_grad, p.grad) for n, p in base.named_parameters()} == before
    expected = _reference_grads(base, names, batches)
    for n in names:
        assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset,task", CASES)
def test_step0_equals_base(preset, task):
    base = tiny(preset, task).eval()
    batch = batch_for(base, task)
    model = _ga(base, task, [batch_for(base, task, seed=1)]).eval()
    layers = lora_layers(model)
    assert layers and all(layer.lora_B.weight.abs().sum() > 0 for layer in layers)  # a real, non-zero B A
    with torch.no_grad():
        expected, actual = base(**batch), model(**batch)
    assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)
    # ... and the base weight really carries the offset: W' + s B A = W.
    for name, layer in zip(find_targets(base, ["all-linear"]), layers):
        assert_close(layer.base.weight + layer.delta_weight(), base.get_submodule(name).weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr"])
def test_factors_are_the_gradients_singular_vectors_at_the_stable_scale(direction):
    base = tiny("tiny-llama", "causal_lm").eval()
    batches = [batch_for(base, "causal_lm")]
    r, gamma = 4, 9.0
    model = _ga(base, "causal_lm", batches, r=r, ga_gamma=gamma, ga_direction=direction, targets=["q_proj"])
    name = find_targets(base, ["q_proj"])[0]
    g = _reference_grads(base, [name], batches)[name]
    u, _, vh = torch.linalg.svd(g)
    layer = lora_layers(model)[0]
    a, b = layer.lora_A.weight, layer.lora_B.weight
    c2 = g.shape[0] ** 0.5 / gamma
    assert_close(a @ a.T, c2 * torch.eye(r), atol=1e-5, rtol=0)
    assert_close(b.T @ b, c2 * torch.eye(r), atol=1e-5, rtol=0)
    a_rows, b_cols = (slice(0, r), slice(r, 2 * r)) if direction == "ArB2r" else (slice(r, 2 * r), slice(0, r))
    # Same subspaces (singular vectors are defined up to sign): the projections agree.
    assert_close(a.T @ a / c2, vh[a_rows].T @ vh[a_rows], atol=1e-4, rtol=0)
    assert_close(b @ b.T / c2, u[:, b_cols] @ u[:, b_cols].T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adamw", 1e-3)])
def test_first_step_gains_more_than_standard_init(optimizer, lr):
    base = tiny("tiny-llama", "causal_lm").eval()
    batch = batch_for(base, "causal_lm", batch=4, seq=16)
    gains = {}
    for init in ("standard", "lora_ga"):
        torch.manual_seed(0)
        model = _ga(base, "causal_lm", [batch], init=init).eval()
        params = list(trainable_parameters(model).values())
        opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr)
        loss0 = model(**batch).loss
        loss0.backward()
        opt.step()
        with torch.no_grad():
            gains[init] = (loss0 - model(**batch).loss).item()
    # Measured: sgd 0.213 vs 0.065, adamw 0.135 vs 0.043.
    assert gains["standard"] > 0 and gains["lora_ga"] > 1.5 * gains["standard"], gains


def test_calibration_hook_and_missing_data_is_one_line():
    assert build_method(LoRAConfig(init="lora_ga", calibration_batches=3)).calibration_batches() == 3
    assert build_method(LoRAConfig()).calibration_batches() == 0
    base = tiny("tiny-llama", "causal_lm")
    with pytest.raises(SidetuneError, match="needs calibration batches") as e:
        _ga(base, "causal_lm", [])
    assert "\n" not in str(e.value)


def test_bad_settings_fail_when_parsed():
    for bad in ("method.calibration_batches=0", "method.ga_gamma=0", "method.ga_direction=Ar"):
        with pytest.raises(SidetuneError):
            load_config(None, ["method.name=lora", bad])
    base = tiny("tiny-llama", "causal_lm")
    with pytest.raises(SidetuneError, match=r"2 \* method.r"):
        _ga(base, "causal_lm", [batch_for(base, "causal_lm")], r=64)


def test_quantized_base_is_refused_in_one_line():
    base = tiny("tiny-llama", "causal_lm", quantize="nf4", dtype="bfloat16")
    with pytest.raises(SidetuneError, match="needs a float base") as e:
        _ga(base, "causal_lm", [batch_for(base, "causal_lm")], targets=["q_proj"])
    assert "\n" not in str(e.value)


def test_build_feeds_calibration_batches_from_the_training_data(sst2_small):
    cfg = load_config(None, [
        "model.name=tiny-llama", "data.task=classification", f"data.train={sst2_small['train']}",
        "data.max_length=16", "train.batch_size=4", "method.name=lora", "method.init=lora_ga",
        "method.calibration_batches=2"])
    s = build(cfg, "cpu")
    layers = lora_layers(s.model)
    assert layers and all(layer.lora_B.weight.abs().sum() > 0 for layer in layers)


def test_a_saved_run_reloads_with_the_same_offset_base(tmp_path, sst2_small):
    """The offset s B_0 A_0 lives in the frozen base weight: the run stores the changed weights
    (changed_base.safetensors) and a reload copies them back instead of recomputing the init (which would need the
    training data, and whose SVD depends on the device), so the reloaded model is the trained one (not W + s B A)."""
    cfg = load_config(None, [
        "model.name=tiny-llama", "data.task=causal_lm", f"data.train={sst2_small['train']}", "data.max_length=16",
        "train.batch_size=4", "method.name=lora", "method.init=lora_ga", "method.calibration_batches=1"])
    trained = build(cfg, "cpu").model.eval()
    with torch.no_grad():
        for p in trainable_parameters(trained).values():  # stand-in for training: B A != B_0 A_0
            p.add_(0.05)
    save_trainable(trained, cfg, tmp_path / "final")
    assert (tmp_path / "final" / "changed_base.safetensors").is_file()
    import sidetune.methods._lora_ga as ga

    def no_recompute(*a, **k):
        raise AssertionError("a reload recomputed the LoRA-GA init")

    ga.mean_gradients, saved = no_recompute, ga.mean_gradients
    try:
        reloaded, _ = load_run(tmp_path)
    finally:
        ga.mean_gradients = saved
    ids = torch.randint(3, 1000, (2, 8))
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)


def test_a_lora_ga_run_exports_merged_and_as_peft_without_its_data(tmp_path, sst2_small):
    """A trained LoRA-GA run (its training file deleted afterwards: nothing re-reads it) exports with --merge (into
    the changed base: W - s B0 A0 + s B A) and with --peft (a plain rank-2r LoRA on the original base, as PEFT
    converts LoRA-GA), and both give sidetune's logits; checkpoints store the changed base too."""
    import shutil

    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import sidetune
    from sidetune.export import export_merged
    from sidetune.peft_io import export_peft
    from sidetune.train import train

    data = tmp_path / "train.tsv"
    shutil.copy(sst2_small["train"], data)
    run = tmp_path / "run"
    train(load_config(None, [
        "model.name=tiny-llama", "data.task=causal_lm", f"data.train={data}", "data.eval=null", "data.max_length=16",
        "data.max_train_samples=16", "train.batch_size=4", "method.name=lora", "method.init=lora_ga",
        "method.r=2", "method.targets=[q_proj,v_proj]", "method.calibration_batches=1", "train.max_steps=2",
        "train.save_every=2", "train.lr=1e-2", "train.progress=false", f"train.output_dir={run}"]))
    data.unlink()
    ckpt = load_file(str(run / "checkpoints" / "step-0000002" / "changed_base.safetensors"))
    assert ckpt.keys() == load_file(str(run / "final" / "changed_base.safetensors")).keys() and len(ckpt) == 8

    ours, _ = sidetune.load(run)
    ids = torch.randint(3, 1000, (2, 8))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(export_merged(run, tmp_path / "merged", "float32")).eval()
        assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        out = export_peft(run, tmp_path / "adapter")
        config = peft.PeftConfig.from_pretrained(out)
        assert config.r == 4 and config.lora_alpha == 2 * LoRAConfig().alpha
        base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
        theirs = peft.PeftModel.from_pretrained(base, out).eval()
        assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        # The original base alone is not the run's model: the conversion carries the offset.
        plain = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path).eval()
        assert (plain(input_ids=ids).logits - expected).abs().max() > 1e-3


def test_a_lora_ga_run_resumes_bit_identical_from_its_stored_base(tmp_path, sst2_small):
    """train.resume loads the checkpoint's changed base instead of recomputing the init (the build skips it), and
    the resumed run ends exactly where the uninterrupted one does."""
    from safetensors.torch import load_file

    from sidetune.train import train

    def run(out, *extra):
        train(load_config(None, [
            "model.name=tiny-llama", "data.task=causal_lm", f"data.train={sst2_small['train']}", "data.eval=null",
            "data.max_length=16", "data.max_train_samples=16", "train.batch_size=4", "method.name=lora",
            "method.init=lora_ga", "method.r=2", "method.targets=[q_proj,v_proj]", "method.calibration_batches=1",
            "train.max_steps=3", "train.save_every=1", "train.lr=1e-2", "train.scheduler=constant",
            "train.warmup_steps=0", "train.progress=false", f"train.output_dir={out}", *extra]))
        return out

    whole = run(tmp_path / "whole")
    part = run(tmp_path / "part", "train.max_steps=1")
    import sidetune.methods._lora_ga as ga

    def no_recompute(*a, **k):
        raise AssertionError("a resume recomputed the LoRA-GA init")

    ga.mean_gradients, saved = no_recompute, ga.mean_gradients
    try:
        run(part, "train.resume=latest")
    finally:
        ga.mean_gradients = saved
    for name in ("trainable.safetensors", "changed_base.safetensors"):
        a, b = load_file(str(whole / "final" / name)), load_file(str(part / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
