"""LoRA variants with PEFT as the oracle: DoRA (method.dora) forward and gradients equal PEFT's `use_dora=True`,
PiSSA / OLoRA (method.init) equal PEFT's inits on the same weights, step 0 equals the base, merges fold DoRA in, and
trained runs round-trip through `export --peft` / `--merge` / sidetune.load with equal logits."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from conftest import batch_for, ctx, run_cli, tiny
from torch import nn
from torch.testing import assert_close

from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.methods.lora import LoRA, LoRAConfig, lora_layers, merge_and_unwrap


class Toy(nn.Module):
    """Shapes no preset has: a wide layer with bias, a narrow one without."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 13, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _peft_model(base, targets, r, alpha, rslora=False, **kw):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                             **kw)
    return peft.get_peft_model(copy.deepcopy(base), config)


def _ours(base, targets, **cfg):
    return LoRA(LoRAConfig(targets=targets, **cfg)).apply(copy.deepcopy(base), ctx("causal_lm"))


def _copy_into_peft(ours, theirs, names):
    """Random A, B, m into ours, the same into PEFT's."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in names:
            layer = ours.get_submodule(name)
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(layer.lora_magnitude_vector.shape, generator=g))
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_forward_and_gradients_equal_peft(rslora):
    base = Toy()
    names = ["up", "down"]
    ours = _ours(base, names, r=3, alpha=5.0, rslora=rslora, dora=True)
    theirs = _peft_model(base, names, 3, 5.0, rslora, use_dora=True)
    # The magnitude starts as PEFT's: the row norms of W (B = 0).
    for name in names:
        assert_close(ours.get_submodule(name).lora_magnitude_vector,
                     theirs.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight)
    _copy_into_peft(ours, theirs, names)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    y_ours, y_theirs = ours(x), theirs(x)
    assert (y_ours - base(x)).abs().max() > 1e-2  # a real update, not the base
    assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    (y_ours ** 2).sum().backward()
    (y_theirs ** 2).sum().backward()
    for name in names:
        layer, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        assert_close(layer.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad,
                     rtol=1e-5, atol=1e-6)
        assert_close(layer.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
        assert_close(layer.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)


def test_dora_with_dropout_in_training_equals_peft():
    """With dropout active, DoRA's base term is W dropout(x), not the base layer's output (PEFT does the same)."""
    base = Toy()
    ours = _ours(base, ["up"], r=2, alpha=3.0, dora=True, dropout=0.3).train()
    config = peft.LoraConfig(r=2, lora_alpha=3.0, target_modules=["up"], lora_dropout=0.3, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).train()
    _copy_into_peft(ours, theirs, ["up"])
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    y_ours = ours(x)
    torch.manual_seed(11)
    y_theirs = theirs(x)
    ours.eval()
    assert (y_ours - ours(x)).abs().max() > 1e-3  # the dropout really acted
    assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)


def test_dora_on_gpt2_conv1d_equals_peft():
    base = tiny("tiny-gpt2", "causal_lm").eval()
    names = [n for n, _ in base.named_modules() if n.endswith("c_attn") or n.endswith("c_fc")]
    ours = _ours(base, ["c_attn", "c_fc"], r=2, alpha=4.0, dora=True).eval()
    theirs = _peft_model(base, ["c_attn", "c_fc"], 2, 4.0, use_dora=True, fan_in_fan_out=True).eval()
    _copy_into_peft(ours, theirs, names)
    batch = batch_for(base, "causal_lm")
    with torch.no_grad():
        assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-5)
        merged = merge_and_unwrap(copy.deepcopy(ours))  # the merge folds m / n into the weights
        assert_close(merged(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,quantize", [("tiny-llama", None), ("tiny-llama", "nf4"), ("tiny-bert", None)])
def test_dora_step0_equals_base_and_merge_unmerge(preset, quantize):
    task = "causal_lm" if preset == "tiny-llama" else "classification"
    kwargs = {"quantize": quantize, "dtype": "bfloat16"} if quantize else {}
    base = tiny(preset, task, **kwargs).eval()
    batch = batch_for(base, task)
    with torch.no_grad():
        expected = base(**batch).logits
        model = LoRA(LoRAConfig(targets=["all-linear"], dora=True)).apply(copy.deepcopy(base), ctx(task)).eval()
        assert all(layer.lora_magnitude_vector is not None for layer in lora_layers(model))
        assert_close(model(**batch).logits, expected, rtol=1e-4 if quantize else 1e-5, atol=1e-4 if quantize else 1e-5)
        if quantize:
            return
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
            layer.lora_magnitude_vector.mul_(1.1)
        trained = model(**batch).logits
        assert (trained - expected).abs().max() > 1e-3
        weights = {n: p.clone() for n, p in model.named_parameters()}
        for layer in lora_layers(model):
            layer.merge()
        assert_close(model(**batch).logits, trained, rtol=1e-5, atol=1e-5)
        for layer in lora_layers(model):
            layer.unmerge()
        for n, p in model.named_parameters():
            assert_close(p, weights[n], rtol=1e-5, atol=1e-6, msg=n)


def test_dora_trains_the_magnitude():
    model = LoRA(LoRAConfig(dora=True)).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm")).train()
    model(**batch_for(model, "causal_lm")).loss.backward()
    for layer in lora_layers(model):
        assert layer.lora_magnitude_vector.requires_grad and layer.lora_magnitude_vector.grad.abs().sum() > 0


def test_dora_on_a_fused_qkv_layer_is_refused_in_one_line():
    with pytest.raises(SidetuneError, match=r"method\.dora adapts whole layers") as e:
        LoRA(LoRAConfig(dora=True)).apply(tiny("tiny-gpt2", "causal_lm"), ctx("causal_lm"))
    assert "\n" not in str(e.value) and "method.targets=[c_attn]" in str(e.value)


def _peft_init(base, names, r, alpha, init):
    return _peft_model(base, names, r, alpha, init_lora_weights=init).base_model.model


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_3"])
@pytest.mark.parametrize("r,alpha", [(3, 5.0), (5, 5.0)])
def test_weight_inits_equal_peft(init, r, alpha, monkeypatch):
    import peft.tuners.lora.layer as peft_layer

    # Randomized SVD: the same draws on both sides (sidetune seeds 0 around its call; PEFT uses the global RNG).
    def seeded(*args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return torch.svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)
    base = Toy()
    names = ["up", "down"]
    kind, _, niter = init.partition("_niter_")
    ours = _ours(base, names, r=r, alpha=alpha, init=kind, pissa_niter=int(niter or 0))
    theirs = _peft_init(base, names, r, alpha, init)
    for name in names:
        layer, ref = ours.get_submodule(name), theirs.get_submodule(name)
        assert_close(layer.lora_A.weight, ref.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        assert_close(layer.lora_B.weight, ref.lora_B["default"].weight, rtol=1e-4, atol=1e-5)
        assert_close(layer.base.weight, ref.base_layer.weight, rtol=1e-4, atol=1e-5)  # the residual
        assert layer.lora_B.weight.abs().sum() > 0
    x = torch.randn(4, 24)
    with torch.no_grad():
        assert_close(ours(x), base(x), rtol=1e-5, atol=1e-5)  # step 0 equals the base


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("preset,targets", [("tiny-llama", ["all-linear"]), ("tiny-gpt2", None)])
def test_weight_inits_step0_equals_base(init, preset, targets):
    base = tiny(preset, "causal_lm").eval()
    batch = batch_for(base, "causal_lm")
    model = _ours(base, targets, r=4, init=init, dora=targets is not None).eval()
    layers = lora_layers(model)
    assert layers and all(layer.lora_B.weight.abs().sum() > 0 for layer in layers)
    if layers[0].row_mask is not None:  # gpt2's fused c_attn: the key rows of B stay 0
        assert (layers[0].lora_B.weight * (1 - layers[0].row_mask)).abs().sum() == 0
    with torch.no_grad():
        assert_close(model(**batch).logits, base(**batch).logits, rtol=1e-5, atol=1e-5)


def test_weight_inits_refuse_a_quantized_base_and_bad_settings():
    base = tiny("tiny-llama", "causal_lm", quantize="nf4", dtype="bfloat16")
    before = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(SidetuneError, match=r"method\.init=pissa needs a float base") as e:
        LoRA(LoRAConfig(init="pissa")).apply(base, ctx("causal_lm"))
    assert "\n" not in str(e.value)
    assert {n: type(m) for n, m in base.named_modules()} == before  # nothing wrapped
    with pytest.raises(SidetuneError, match=r"method.r <="):
        _ours(tiny("tiny-llama", "causal_lm"), ["q_proj"], r=4096, init="olora")
    for bad in ("method.pissa_niter=-1", "method.init=loftq", "method.dora=maybe"):
        with pytest.raises(SidetuneError):
            load_config(None, ["method.name=lora", bad])
    with pytest.raises(SidetuneError, match="loads plain LoRA adapters"):
        load_config(None, ["method.name=lora", "method.dora=true", "method.init_from=/nonexistent"])


@pytest.mark.parametrize("extra", [["method.dora=true"], ["method.init=pissa"], ["method.init=olora",
                                                                                    "method.dora=true"]])
def test_a_trained_run_round_trips_through_peft_merge_and_load(extra, tmp_path, sst2_small):
    """Train 2 steps, then: sidetune.load reads the stored residual base (no recompute), `export --peft` loads in PEFT
    (a changed base as a plain rank-2r LoRA on the original weights; DoRA as use_dora with lora_magnitude_vector),
    `export --merge` loads in transformers; all with the run's logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import sidetune
    import sidetune.methods._lora_weight_init as wi
    from sidetune.export import export_merged
    from sidetune.train import train

    run = tmp_path / "run"
    train(load_config(None, [
        "model.name=tiny-llama", "data.task=causal_lm", f"data.train={sst2_small['train']}", "data.eval=null",
        "data.max_length=16", "data.max_train_samples=16", "train.batch_size=4", "method.name=lora", "method.r=2",
        "method.targets=[q_proj,v_proj]", "train.max_steps=2", "train.lr=1e-2", "train.progress=false",
        f"train.output_dir={run}", *extra]))
    changes_base = any("init=" in e for e in extra)
    assert (run / "final" / "changed_base.safetensors").is_file() == changes_base

    def no_recompute(*a, **k):
        raise AssertionError("a reload recomputed the init")

    wi.apply_init, saved = no_recompute, wi.apply_init
    try:
        ours, _ = sidetune.load(run)
    finally:
        wi.apply_init = saved
    ids = torch.randint(3, 1000, (2, 8))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(export_merged(run, tmp_path / "merged", "float32")).eval()
        assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        cli = run_cli("export", run, "--peft", tmp_path / "adapter")
        assert cli.returncode == 0, cli.stderr
        dora = "method.dora=true" in extra
        assert ("vLLM does not serve DoRA" in cli.stdout) == dora
        out = tmp_path / "adapter"
        config = json.loads((out / "adapter_config.json").read_text())
        assert config.get("use_dora", False) == dora and config["r"] == (4 if changes_base else 2)
        keys = load_file(str(out / "adapter_model.safetensors"))
        assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == (8 if dora else 0)
        assert config["modules_to_save"] is None
        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        theirs = peft.PeftModel.from_pretrained(base, out).eval()
        assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        original = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
        assert (original(input_ids=ids).logits - expected).abs().max() > 1e-3  # trained, not the base


def test_pissa_on_a_fused_qkv_layer_exports_to_peft(tmp_path, sst2_small):
    """GPT-2's c_attn adapted on its q and v rows: PiSSA reads those rows of W only; the residual's key rows are W's,
    and `--peft` writes a whole-layer rank-2r LoRA whose key rows are 0, with the run's logits."""
    from transformers import AutoModelForCausalLM

    import sidetune
    from sidetune.peft_io import export_peft
    from sidetune.train import train

    run = tmp_path / "run"
    train(load_config(None, [
        "model.name=tiny-gpt2", "data.task=causal_lm", f"data.train={sst2_small['train']}", "data.eval=null",
        "data.max_length=16", "data.max_train_samples=8", "train.batch_size=4", "method.name=lora", "method.r=2",
        "method.init=pissa", "train.max_steps=2", "train.lr=1e-2", "train.progress=false",
        f"train.output_dir={run}"]))
    ours, _ = sidetune.load(run)
    out = export_peft(run, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                            out).eval()
    original = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    n = original.config.n_embd
    w0, w = original.transformer.h[0].attn.c_attn.weight, ours.transformer.h[0].attn.c_attn.base.weight
    assert torch.equal(w[:, n:2 * n], w0[:, n:2 * n]) and (w[:, :n] - w0[:, :n]).abs().max() > 1e-3  # Conv1D: (in, out)
    ids = torch.randint(3, 1000, (2, 8))
    with torch.no_grad():
        assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
