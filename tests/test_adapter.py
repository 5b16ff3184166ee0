"""Bottleneck adapters: placement per family (checked against hand-written block arithmetic), step 0 equals the base,
only adapters and the head train, 4-bit base, gradient checkpointing, and a run through the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import RECIPES, batch_for, ctx, read_metrics, run_cli, tiny
from torch.testing import assert_close

from sidetune.errors import SidetuneError
from sidetune.methods.adapter import (
    Adapter,
    AdapterConfig,
    FFNInput,
    ParallelAdapter,
    ParallelOutputAdapter,
    SequentialAdapter,
    adapter_layers,
)

FAMILIES = [("tiny-llama", "causal_lm"), ("tiny-bert", "classification"), ("tiny-gpt2", "causal_lm"),
            ("tiny-t5", "seq2seq")]

# The modules each variant wraps in block 0, per family (T5: encoder block 0; its decoder is checked by count).
EXPECTED = {
    "tiny-llama": {"houlsby": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
                   "pfeiffer": ["model.layers.0.mlp.down_proj"], "parallel": ["model.layers.0.mlp.down_proj"]},
    "tiny-bert": {"houlsby": ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"],
                  "pfeiffer": ["bert.encoder.layer.0.output.dense"],
                  "parallel": ["bert.encoder.layer.0.output.dense"]},
    "tiny-gpt2": {"houlsby": ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"],
                  "pfeiffer": ["transformer.h.0.mlp.c_proj"], "parallel": ["transformer.h.0.mlp.c_proj"]},
    "tiny-t5": {"houlsby": ["encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.1.DenseReluDense.wo"],
                "pfeiffer": ["encoder.block.0.layer.1.DenseReluDense.wo"],
                "parallel": ["encoder.block.0.layer.1.DenseReluDense.wo"]},
}
LAYERS = {"tiny-llama": 4, "tiny-bert": 4, "tiny-gpt2": 4, "tiny-t5": 6}  # T5: 3 encoder + 3 decoder blocks


def _randomize(model, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model):
            for p in layer.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("preset,task", FAMILIES)
def test_wraps_the_right_modules_and_step0_equals_base(preset, task, variant):
    base = tiny(preset, task).eval()
    method = Adapter(AdapterConfig(variant=variant))
    names = method.targets(base)
    per_block = len(EXPECTED[preset][variant])
    assert len(names) == per_block * LAYERS[preset], names
    assert set(EXPECTED[preset][variant]) <= set(names)
    if preset == "tiny-t5":  # the decoder's cross-attention output is never wrapped
        assert not any("EncDecAttention" in n for n in names)
    batch = batch_for(base, task)
    model = method.apply(copy.deepcopy(base), ctx(base)).eval()
    with torch.no_grad():
        assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=0)
        _randomize(model)
        assert (model(**batch).logits - base(**batch).logits).abs().max() > 1e-3


def _bottleneck(layer, h):
    a = layer.adapter
    return a.up(a.act(a.down(h))) * layer.scaling


def test_bert_houlsby_sits_before_residual_and_layernorm():
    model = Adapter(AdapterConfig(variant="houlsby", activation="gelu")).apply(tiny("tiny-bert", "classification"), ctx("classification"))
    _randomize(model)
    block = model.bert.encoder.layer[0].attention.output  # BertSelfOutput: LayerNorm(dropout(dense(x)) + residual)
    assert isinstance(block.dense, SequentialAdapter)
    x, residual = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    block.eval()
    with torch.no_grad():
        o = block.dense.base(x)
        expected = block.LayerNorm(o + _bottleneck(block.dense, o) + residual)
        assert_close(block(x, residual), expected)


def test_bert_parallel_reads_the_ffn_input_and_lands_before_layernorm():
    model = Adapter(AdapterConfig(variant="parallel", scaling=4.0)).apply(tiny("tiny-bert", "classification"), ctx("classification"))
    _randomize(model)
    layer = model.bert.encoder.layer[0]
    # the FFN's first projection records its input x; the adapter at its output projection reads it
    assert isinstance(layer.intermediate.dense, FFNInput) and isinstance(layer.output.dense, ParallelOutputAdapter)
    out = layer.output  # BertOutput: LayerNorm(dropout(dense(h)) + x), x = the FFN input
    x = torch.randn(2, 5, 64)
    layer.eval()
    with torch.no_grad():
        h = layer.intermediate(x)
        expected = out.LayerNorm(out.dense.base(h) + _bottleneck(out.dense, x) + x)
        assert_close(out(h, x), expected)


def test_parallel_with_targets_wraps_the_named_ffn_modules_as_before():
    model = Adapter(AdapterConfig(variant="parallel", targets=["mlp"])).apply(tiny("tiny-llama", "causal_lm"),
                                                                            ctx("causal_lm")).eval()
    _randomize(model)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, ParallelAdapter)
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        assert_close(mlp(x), mlp.base(x) + _bottleneck(mlp, x))


@pytest.mark.parametrize("preset,task,block_path", [("tiny-llama", "causal_lm", "model.layers.0"),
                                                     ("tiny-gpt2", "causal_lm", "transformer.h.0")])
def test_pre_ln_adapters_live_inside_the_residual_branch(preset, task, block_path):
    for variant in ("pfeiffer", "parallel"):
        model = Adapter(AdapterConfig(variant=variant)).apply(tiny(preset, task), ctx(task)).eval()
        _randomize(model)
        block = model.get_submodule(block_path)
        x = torch.randn(1, 4, 64)
        with torch.no_grad():
            if variant == "pfeiffer":  # mlp(x) = down(act(...)) and the adapter follows the down projection
                mlp = block.mlp
                proj = mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj
                assert isinstance(proj, SequentialAdapter)
                inner = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) if hasattr(mlp, "gate_proj") else mlp.act(
                    mlp.c_fc(x))
                o = proj.base(inner)
                assert_close(mlp(x), o + _bottleneck(proj, o))
            else:  # parallel: FFN(x) + s A(x), x being the FFN input (after the pre-FFN norm)
                mlp = block.mlp
                proj = mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj
                assert isinstance(proj, ParallelOutputAdapter)
                with torch.no_grad():
                    for m in adapter_layers(model):
                        m.adapter.up.weight.zero_()
                        m.adapter.up.bias.zero_()
                    plain = mlp(x)  # the FFN alone (every adapter adds 0)
                _randomize(model)
                assert_close(mlp(x), plain + _bottleneck(proj, x))


def test_only_adapters_and_head_get_gradients():
    method = Adapter(AdapterConfig(reduction_factor=8, activation="gelu"))
    model = method.apply(tiny("tiny-bert", "classification"), ctx("classification")).train()
    _randomize(model)  # non-zero up-projections, so that the down-projections get non-zero gradients too
    model(**batch_for(model, "classification")).loss.backward()
    for name, p in model.named_parameters():
        if ".adapter." in name or name.startswith("classifier."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    layer = adapter_layers(model)[0]
    assert layer.adapter.down.out_features == 64 // 8


def test_works_on_a_4bit_base():
    base = tiny("tiny-llama", "causal_lm", quantize="nf4").eval()
    batch = batch_for(base, "causal_lm")
    model = Adapter(AdapterConfig(activation="gelu")).apply(copy.deepcopy(base), ctx(base))  # gelu: no dead units
    assert type(adapter_layers(model)[0].base).__name__ == "Linear4bit"
    with torch.no_grad():
        assert_close(model.eval()(**batch).logits, base(**batch).logits, rtol=0, atol=0)
    _randomize(model)
    model.train()(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".adapter." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients():
    base = tiny("tiny-llama", "causal_lm")
    batch = batch_for(base, "causal_lm")
    grads = []
    for checkpointing in (False, True):
        model = Adapter(AdapterConfig()).apply(copy.deepcopy(base), ctx(base)).train()
        _randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_bad_configs_are_one_line_errors():
    with pytest.raises(SidetuneError, match="reduction_factor=1000 leaves no bottleneck"):
        Adapter(AdapterConfig(reduction_factor=1000)).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm"))
    with pytest.raises(SidetuneError, match=r"method.targets=\['nope'\] matched no module"):
        Adapter(AdapterConfig(targets=["nope"])).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm"))
    with pytest.raises(SidetuneError, match="must be >= 1"):
        Adapter(AdapterConfig(reduction_factor=0))


def test_trains_through_the_cli(tmp_path, sst2_small):
    # python -m sidetune train on a tiny BERT with gradient checkpointing, 16 examples seen 6 times each: the loss falls
    # and the zero-initialised up-projections move.
    out = tmp_path / "run"
    result = run_cli(
        "train", str(RECIPES / "sst2_adapter.yaml"), "model.name=tiny-bert",
         f"data.train={sst2_small['train']}", f"data.eval={sst2_small['dev']}", "data.max_length=32",
         "data.max_train_samples=16", "train.max_steps=12", "train.batch_size=8", "train.lr=1e-2", "train.log_every=1",
         "train.eval_every=0", "train.progress=false", "train.gradient_checkpointing=true",
         f"train.output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4]), losses
    assert "eval_accuracy" in rows[-1]
    from safetensors.torch import load_file

    saved = load_file(out / "final" / "trainable.safetensors")
    ups = [v for k, v in saved.items() if k.endswith("adapter.up.weight")]
    assert len(ups) == 8 and all(v.abs().sum() > 0 for v in ups)
    assert all(".adapter." in k or k.startswith("classifier.") for k in saved)
