"""LST and Q-LST: no gradient and no saved tensor in the backbone, step 0 = the frozen model, pruned init, save/load,
generation, memory levers. Tiny random presets of every supported family, also on a 4-bit (nf4, CPU fp32) base."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import adam_losses, batch_for, ctx, tiny
from torch.testing import assert_close

import sidetune
from sidetune import cli
from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.losses import ChunkedLMLoss
from sidetune.memory import SavedTensorTracker, module_roles, snapshot_modules
from sidetune.methods import trainable_parameters
from sidetune.methods.lst import LST, LSTConfig, LSTModel, tapped_layers
from sidetune.rundir import save_trainable
from sidetune.session import build
from sidetune.train import train

FAMILIES = [("tiny-llama", "causal_lm"), ("tiny-gpt2", "causal_lm"), ("tiny-bert", "classification"),
            ("tiny-t5", "seq2seq")]
# Every family on a full-precision base, and Q-LST (nf4 base) on each family too.
CASES = [pytest.param(p, t, None, id=f"{p}-{t}") for p, t in FAMILIES] + [
    pytest.param(p, t, "nf4", id=f"{p}-{t}-nf4") for p, t in FAMILIES] + [
    pytest.param("tiny-llama", "classification", None, id="tiny-llama-classification"),
    pytest.param("tiny-gpt2", "classification", None, id="tiny-gpt2-classification")]


def _lst(preset, task, quantize=None, **cfg):
    base = tiny(preset, task, quantize=quantize)
    backbone = snapshot_modules(base)
    method = LST(LSTConfig(**cfg))
    model = method.apply(base, ctx(base))
    return model, base, module_roles(model, backbone, base, method.head_modules(model))


def _randomize_trainable(model, seed=0):
    """Stand-in for training: every trainable tensor gets new values (up != 0, so the side output matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 0.1)  # drawn on CPU: any device


@pytest.mark.parametrize("preset,task,quantize", CASES)
def test_backbone_gets_no_grad_and_stores_nothing(preset, task, quantize):
    model, base, roles = _lst(preset, task, quantize, side_layers="every:2")
    _randomize_trainable(model)
    model.train()
    batch = batch_for(base, task)
    with SavedTensorTracker(model, roles) as tracker:
        loss = model(**batch).loss
    loss.backward()
    for name, p in model.named_parameters():
        role = roles[id(model.get_submodule(name.rpartition(".")[0]))]
        if role == "backbone":
            assert p.grad is None and not p.requires_grad, name
        elif p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    saved = tracker.by_role()
    assert saved["backbone"] == 0, tracker.by_module("backbone")
    # The side network keeps at least its ladder inputs: one B x T x d tensor per tapped block plus the embeddings.
    b, t = batch["input_ids"].shape
    d = base.config.hidden_size if hasattr(base.config, "hidden_size") else base.config.d_model
    taps = sum(len(s.tapped) + 1 for s in (model.side_encoder, model.side) if s is not None)
    assert saved["method"] >= taps * b * t * d * 4 * (0.5 if task == "seq2seq" else 1)
    assert saved["head"] > 0
    if task != "classification":  # logits and loss are the head's cost, not the side network's
        assert saved["head"] >= b * (t // 2 if task == "seq2seq" else t - 1) * base.config.vocab_size * 4
        assert saved["method"] < b * t * base.config.vocab_size * 4
    # Backbone dropout is off: the backbone stays in eval mode while the side network trains.
    assert not model.backbone.training and model.side.training


@pytest.mark.parametrize("preset,task,quantize", [c for c in CASES if c.values[1] != "classification"])
def test_step0_equals_frozen_model(preset, task, quantize):
    base = tiny(preset, task, quantize=quantize).eval()
    batch = batch_for(base, task)
    with torch.no_grad():
        expected = base(**batch)
        actual = LST(LSTConfig()).apply(base, ctx(base)).eval()(**batch)
    assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    assert_close(actual.loss, expected.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset,task", FAMILIES)
def test_pruned_side_network_at_r1_reproduces_the_backbone(preset, task):
    """At r=1 pruning keeps everything, so with every gate closed on the side state (g=1) the side network is the
    backbone itself: its output equals the backbone's final hidden state at every real token. This checks the side
    blocks (norms, attention, RoPE/relative bias, masks, MLP) and the weight mapping for each family at once."""
    base = tiny(preset, task).eval()
    batch = batch_for(base, task)
    model = LST(LSTConfig(r=1)).apply(base, ctx(base)).eval()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        for side in (model.side_encoder, model.side):
            if side is not None:
                side.alpha.fill_(100.0)  # g = sigmoid(1000) = 1: the ladders contribute exactly 0
        if task == "classification":
            model.side.norm = torch.nn.Identity()  # BERT has no final norm; the side adds a fresh one
        if task == "seq2seq":
            enc, side_enc = model.encode(batch["input_ids"], batch["attention_mask"])
            assert_close(side_enc[real], enc[real], rtol=1e-5, atol=1e-5)
            dec_ids = base.prepare_decoder_input_ids_from_labels(batch["labels"])
            final, taps = model._backbone(1, base.decoder, dict(input_ids=dec_ids, encoder_hidden_states=enc,
                                                                encoder_attention_mask=batch["attention_mask"]))
            side = model.side(taps[0], taps[1:], None, enc=side_enc, enc_mask=batch["attention_mask"])
            assert_close(side, final, rtol=1e-5, atol=1e-5)
            return
        final, taps = model._backbone(0, base.base_model, {k: batch[k] for k in ("input_ids", "attention_mask")})
        side = model.side(taps[0], taps[1:], batch["attention_mask"])
    assert_close(side[real], final[real], rtol=1e-5, atol=1e-5)


def test_pruning_keeps_the_dims_with_the_largest_weights():
    base = tiny("tiny-llama", "causal_lm")
    strong = [5, 17, 40]  # make these residual dims dominate every layer's weights
    heavy_units = [3, 100]
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight[:, strong] *= 50
            layer.mlp.down_proj.weight[:, heavy_units] *= 50
    model = LST(LSTConfig(r=8)).apply(base, ctx(base))  # d=64 -> 8 kept dims
    block, layer = model.side.blocks[0], base.model.layers[0]
    kept = model.side.ladders[0].weight.argmax(1)  # ladders start as the selection of the kept dims
    assert set(strong) <= set(kept.tolist())
    assert_close(block.ln1.weight, layer.input_layernorm.weight[kept])
    # The MLP keeps the heaviest units, sliced to the kept dims.
    up = layer.mlp.up_proj.weight[:, kept]
    matches = [int((up - row).abs().sum(1).argmin()) for row in block.mlp.up.weight]
    assert set(heavy_units) <= set(matches)
    assert_close(block.mlp.down.weight, layer.mlp.down_proj.weight[kept][:, matches])


def test_gates_start_at_one_half_and_train():
    model, base, _ = _lst("tiny-llama", "causal_lm", side_layers=[0, -1], gate_temperature=0.1)
    assert model.side.tapped == [0, 3]
    assert_close(torch.sigmoid(model.side.alpha / 0.1), torch.full((2,), 0.5))
    _randomize_trainable(model)
    model(**batch_for(base, "causal_lm")).loss.backward()
    assert model.side.alpha.grad.abs().min() > 0


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_lr_ratios_give_each_part_its_own_group(task):
    cfg = dict(up_lr_ratio=4.0, ladder_lr_ratio=2.0, block_lr_ratio=0.5)
    model, _, _ = _lst("tiny-llama", task, **cfg)
    groups = LST(LSTConfig(**cfg)).param_groups(model, 1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in trainable_parameters(model).values())  # each once, none missed
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model.up.weight)] == pytest.approx(4e-3)
    assert lr_of[id(model.side.alpha)] == lr_of[id(model.side.ladders[1].weight)] == pytest.approx(2e-3)
    assert lr_of[id(model.side.blocks[0].attn.q.weight)] == lr_of[id(model.side.norm.weight)] == pytest.approx(5e-4)
    if task == "classification":  # the classifier stays at train.lr
        assert 1e-3 in [g["lr"] for g in groups]
    assert LST(LSTConfig()).param_groups(model, 1e-3) is None  # default: one group


def test_side_layers_forms_and_errors():
    assert tapped_layers("all", 4) == [0, 1, 2, 3]
    assert tapped_layers("every:2", 4) == [1, 3]
    assert tapped_layers("every:3", 12) == [2, 5, 8, 11]
    assert tapped_layers([0, -1, 0], 6) == [0, 5]
    for bad in ("some", "every:0", "every:x", []):
        with pytest.raises(SidetuneError, match="side_layers"):
            tapped_layers(bad, 4)
    with pytest.raises(SidetuneError, match="names block 9"):
        LST(LSTConfig(side_layers=[9])).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm"))
    cfg = load_config(None, ["method.name=lst", "method.side_layers=[1,3]", "method.r=4"])
    assert cfg.method.side_layers == [1, 3] and cfg.method.r == 4
    with pytest.raises(SidetuneError, match=r"method\.side_layers=.every-2."):
        load_config(None, ["method.name=lst", "method.side_layers=every-2"])
    with pytest.raises(SidetuneError, match=r"method\.r must be >= 1"):
        load_config(None, ["method.name=lst", "method.r=0"])


def test_chunked_loss_equals_plain_loss_with_the_same_gradients():
    model, base, roles = _lst("tiny-llama", "causal_lm", quantize="nf4")
    _randomize_trainable(model)
    batch = batch_for(base, "causal_lm", seq=16)
    params = trainable_parameters(model)
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    chunked = ChunkedLMLoss(model, chunk_size=5)
    with SavedTensorTracker(chunked, {**roles, id(chunked): "head"}) as tracker:
        loss = chunked(**batch).loss
    loss.backward()
    assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-5)
    for name, p in params.items():
        assert_close(p.grad, plain[name], rtol=1e-4, atol=1e-6)
    assert tracker.by_role()["backbone"] == 0


def test_side_gradient_checkpointing_saves_less_with_the_same_gradients():
    def run(checkpointing, **cfg):
        model, base, roles = _lst("tiny-llama", "causal_lm", dropout=0.0, gradient_checkpointing=False, **cfg)
        _randomize_trainable(model)
        if checkpointing:
            model.gradient_checkpointing_enable()  # what train.gradient_checkpointing=true calls
        with SavedTensorTracker(model, roles) as tracker:
            model(**batch_for(base, "causal_lm", seq=32)).loss.backward()
        return tracker.by_role()["method"], {n: p.grad for n, p in trainable_parameters(model).items()}

    saved_plain, grads_plain = run(False)
    saved_ckpt, grads_ckpt = run(True)
    assert saved_ckpt < 0.7 * saved_plain, (saved_ckpt, saved_plain)
    for name, grad in grads_plain.items():
        assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7)
    assert LSTConfig().gradient_checkpointing  # the default: exact, and it saves this much
    # int8 ladder inputs: a quarter of the fp32 ladder inputs; only the ladders' weight gradients change, slightly.
    saved_int8, grads_int8 = run(True, ladder_grad_input="int8")
    model, base, _ = _lst("tiny-llama", "causal_lm")
    b, t, d, taps = 2, 32, base.config.hidden_size, len(model.side.tapped) + 1
    assert saved_ckpt - saved_int8 >= 0.7 * taps * b * t * d * 3, (saved_ckpt, saved_int8)
    for name, grad in grads_ckpt.items():
        if ".ladders." in name and name.endswith("weight"):
            assert 0 < (grads_int8[name] - grad).norm() <= 0.02 * grad.norm(), name
        else:
            assert_close(grads_int8[name], grad, rtol=1e-4, atol=1e-6)


def test_int8_ladders_keep_the_forward_exact():
    model, base, _ = _lst("tiny-llama", "causal_lm", ladder_grad_input="int8")
    ref, _, _ = _lst("tiny-llama", "causal_lm")
    _randomize_trainable(model)
    _randomize_trainable(ref)
    batch = batch_for(base, "causal_lm")
    assert_close(model.train()(**batch).loss, ref.train()(**batch).loss, rtol=0, atol=0)


def test_bf16_autocast_keeps_fp32_master_weights():
    model, base, _ = _lst("tiny-llama", "causal_lm")
    _randomize_trainable(model)
    batch = batch_for(base, "causal_lm")
    reference = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.05 * reference.item()
    for p in trainable_parameters(model).values():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32


def test_bf16_backbone_without_autocast():
    base = tiny("tiny-llama", "causal_lm", dtype="bfloat16")
    model = LST(LSTConfig()).apply(base, ctx(base))
    loss = model(**batch_for(base, "causal_lm")).loss
    loss.backward()
    assert model.side.blocks[0].attn.q.weight.dtype == torch.float32
    assert model.side.blocks[0].attn.q.weight.grad is not None


def test_compiled_side_blocks_match(monkeypatch):
    model, base, _ = _lst("tiny-llama", "causal_lm", init="random")
    _randomize_trainable(model)
    batch = batch_for(base, "causal_lm")
    expected = model(**batch).logits
    # The eager backend checks that dynamo traces the side blocks without inductor's C++ build (~40 s on this CPU;
    # the default backend gave the same logits to 1.4e-6 when tried by hand).
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend="eager"))
    compiled = LST(LSTConfig(init="random", compile=True)).apply(base, ctx(base))
    compiled.load_state_dict(model.state_dict())
    assert all(b._compiled_call_impl is not None for b in compiled.side.blocks)
    assert_close(compiled(**batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,task,quantize", [
    ("tiny-llama", "causal_lm", None), ("tiny-gpt2", "classification", None), ("tiny-bert", "classification", None),
    ("tiny-t5", "seq2seq", None), ("tiny-llama", "causal_lm", "nf4"), ("tiny-bert", "classification", "nf4"),
    ("tiny-t5", "seq2seq", "nf4")])
def test_save_then_load_gives_identical_logits(tmp_path, preset, task, quantize):
    overrides = [f"model.name={preset}", "method.name=lst", "method.side_layers=every:2", f"data.task={task}"]
    if quantize:
        overrides.append(f"model.quantize={quantize}")
    if task == "classification":
        overrides.append("data.num_labels=2")
    cfg = load_config(None, overrides)
    model = build(cfg, torch.device("cpu"), with_data=False).model  # the model a run trains, built as load_run does
    base = model.backbone
    _randomize_trainable(model)
    save_trainable(model, cfg, tmp_path / "final")
    loaded, _ = sidetune.load(tmp_path)
    assert isinstance(loaded, LSTModel) and not loaded.training
    batch = batch_for(base, task)
    with torch.no_grad():
        expected = model.eval()(**batch)
        actual = loaded(**batch)
    assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    assert_close(actual.loss, expected.loss, rtol=0, atol=0)


@pytest.mark.parametrize("preset,task", [("tiny-llama", "causal_lm"), ("tiny-gpt2", "causal_lm"),
                                         ("tiny-t5", "seq2seq")])
def test_generate_equals_transformers_greedy_at_step0(preset, task):
    base = tiny(preset, task).eval()
    ids = batch_for(base, task, batch=1, seq=6)["input_ids"]
    with torch.no_grad():
        expected = base.generate(ids, max_new_tokens=5, do_sample=False)
    model = LST(LSTConfig()).apply(base, ctx(base)).eval()
    actual = model.generate(ids, max_new_tokens=5)
    assert torch.equal(actual, expected)


def test_generate_uses_the_side_network_and_ignores_padding():
    model, base, _ = _lst("tiny-llama", "causal_lm")
    _randomize_trainable(model)
    with torch.no_grad():
        model.up.weight.normal_(std=3.0)  # a side output large enough to change the argmax tokens
    model.eval()
    batch = batch_for(base, "causal_lm", batch=2, seq=8)
    out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=4, eos_token_id=[])
    alone = model.generate(batch["input_ids"][:1, :5], max_new_tokens=4, eos_token_id=[])  # row 0 without its padding
    assert torch.equal(out[0, :9], alone[0])
    with torch.no_grad():
        frozen = base.generate(batch["input_ids"][1:], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert not torch.equal(out[1:], frozen)  # the trained side network changes what is generated


def test_unsupported_inputs_are_one_line_errors():
    with pytest.raises(SidetuneError, match="seq2seq only"):
        LST(LSTConfig()).apply(tiny("tiny-t5", "classification"), ctx("classification"))
    with pytest.raises(SidetuneError, match=r"method\.r=128 leaves no width"):
        LST(LSTConfig(r=128)).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm"))
    model, _, _ = _lst("tiny-bert", "classification")
    with pytest.raises(SidetuneError, match="generate needs"):
        model.generate(torch.ones(1, 3, dtype=torch.long))


def test_train_then_cli_eval(tmp_path, sst2_small, capsys):
    """The whole path: train through the one loop (chunked loss, side checkpointing), final/, `sidetune eval`."""
    out = tmp_path / "run"
    cfg = load_config(None, [
        "model.name=tiny-llama", "method.name=lst", "method.side_layers=every:2", "train.gradient_checkpointing=true",
        "data.task=causal_lm", f"data.train={sst2_small['train']}", f"data.eval={sst2_small['dev']}",
        "data.max_train_samples=64", "data.max_eval_samples=32", "data.max_length=24", "train.batch_size=8",
        "train.max_steps=8", "train.lr=1e-2", "train.eval_every=4", "train.log_every=1", "train.loss_chunk_size=32",
        "train.progress=false", f"train.output_dir={out}"])
    metrics = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0], evals
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(again["eval_loss"] - metrics["eval_loss"]) < 1e-5, (again, metrics)


def test_deepcopy_and_trainable_names():
    model, _, _ = _lst("tiny-t5", "seq2seq")
    names = set(trainable_parameters(model))
    assert names and all(n.startswith(("side.", "side_encoder.", "up.")) for n in names)
    clone = copy.deepcopy(model)
    assert set(trainable_parameters(clone)) == names


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_recipes_are_valid_configs():
    for name in ("sst2_lst.yaml", "smollm2_lst.yaml", "llama8b_qlst.yaml"):
        cfg = load_config(RECIPES / name)
        assert cfg.method.name == "lst"
    qlst = load_config(RECIPES / "llama8b_qlst.yaml")
    assert qlst.model.quantize == "nf4" and qlst.train.loss_chunk_size > 0 and qlst.train.mixed_precision == "bf16"
    with pytest.raises(SidetuneError, match="does not exist"):  # the placeholder path says what to do
        build(qlst, torch.device("cpu"), with_data=False)


@pytest.mark.slow
def test_lst_smollm2_lowers_eval_loss(tmp_path, all_cores):
    """Real SmolLM2-135M weights: pruned side network, chunked loss; the held-out loss goes down in a few steps."""
    train(load_config(RECIPES / "smollm2_lst.yaml", [
        "train.max_steps=6", "train.batch_size=8", "train.eval_every=3", "data.max_eval_samples=16",
        "data.max_length=48", "train.progress=false", f"train.output_dir={tmp_path}"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0], evals


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlst_on_cuda_bf16():
    """Q-LST as on a GPU: NF4 base with bf16 compute, bf16 autocast, chunked loss; nothing saved in the backbone and
    step 0 equal to the frozen model's forward."""
    from sidetune.config import ModelConfig
    from sidetune.models import load_model

    base = load_model(ModelConfig(name="tiny-llama", quantize="nf4"), "causal_lm", device="cuda").eval()
    backbone = snapshot_modules(base)
    batch = {k: v.cuda() for k, v in batch_for(base, "causal_lm", seq=64).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = base(**batch).logits
    model = LST(LSTConfig(side_layers="every:2")).apply(base, ctx(base))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert_close(model.eval()(**batch).logits, expected, rtol=1e-3, atol=1e-3)
    model.train()
    _randomize_trainable(model)
    chunked = ChunkedLMLoss(model, chunk_size=32)
    roles = {**module_roles(model, backbone, base, [model.head]), id(chunked): "head"}
    with SavedTensorTracker(chunked, roles) as tracker, torch.autocast("cuda", dtype=torch.bfloat16):
        loss = chunked(**batch).loss
    loss.backward()
    assert tracker.by_role()["backbone"] == 0 and torch.isfinite(loss)
    for p in trainable_parameters(model).values():
        assert p.dtype == torch.float32 and p.is_cuda and p.grad is not None and torch.isfinite(p.grad).all()


# ----- init: pruned_fisher


def _fisher_lst(base, batches, **cfg):
    from sidetune.methods.base import Context

    c = ctx(base)
    method = LST(LSTConfig(init="pruned_fisher", fisher_batches=len(batches), **cfg))
    assert method.calibration_batches() == len(batches)
    return method.apply(base, Context(c.task, label_names=c.label_names, calibration=batches))


def test_fisher_scores_are_squared_per_example_mask_gradients():
    # Oracle: an explicit mask parameter of ones, shared by the batch, on one example at a time; the Fisher of a
    # two-example batch must be the sum of its rows' squared mask gradients (mean of squares, not square of mean).
    from sidetune.methods._lst_prune import fisher_scores

    base = tiny("tiny-llama", "classification").eval()
    batch = batch_for(base, "classification")
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, base.config.pad_token_id)
    model = LST(LSTConfig(r=2)).apply(base, ctx(base)).eval()
    tapped = [model.side.tapped]

    def loss_of(b):
        hidden = base.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        return model.head(hidden, b["labels"], b["attention_mask"]).loss

    scores = fisher_scores(model.stacks, tapped, loss_of, [batch])
    layer = base.model.layers[1]
    expected_ff = expected_hidden = expected_k = 0
    for row in range(2):
        one = {k: v[row:row + 1] for k, v in batch.items()}
        m_ff = torch.ones(layer.mlp.down_proj.in_features, requires_grad=True)
        m_k = torch.ones(layer.self_attn.k_proj.out_features, requires_grad=True)
        m_h = torch.ones(base.config.hidden_size, requires_grad=True)
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, mask=m_ff: (a[0] * mask,)),
                 layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, mask=m_k: o * mask)]
        hooks += [lay.register_forward_hook(
            lambda m, a, o, mask=m_h: (o[0] * mask, *o[1:]) if isinstance(o, tuple) else o * mask)
            for lay in base.model.layers]
        with torch.enable_grad():
            loss_of(one).backward()
        for h in hooks:
            h.remove()
        expected_ff = expected_ff + m_ff.grad ** 2
        expected_k = expected_k + m_k.grad ** 2
        expected_hidden = expected_hidden + m_h.grad ** 2
    assert_close(scores.blocks[0][1]["ff"], expected_ff, rtol=1e-4, atol=1e-10)
    assert_close(scores.blocks[0][1]["k"], expected_k, rtol=1e-4, atol=1e-10)
    assert_close(scores.hidden, expected_hidden, rtol=1e-4, atol=1e-10)
    assert expected_ff.min() >= 0 and expected_ff.max() > 0


def test_pruned_fisher_follows_the_scores_not_the_weights(monkeypatch):
    # The dims and MLP units the weights make heaviest are what magnitude pruning keeps; Fisher scores that rate
    # them zero make pruned_fisher keep others, and the side blocks are then cut at the dims the scores chose.
    import sidetune.methods.lst as lst_mod
    from sidetune.methods._lst_prune import Scores

    base = tiny("tiny-llama", "causal_lm")
    strong, heavy_units = [5, 17, 40], [3, 100]
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight[:, strong] *= 50
            layer.mlp.down_proj.weight[:, heavy_units] *= 50
    d, ff = base.config.hidden_size, base.config.intermediate_size
    kv = base.config.num_key_value_heads * (d // base.config.num_attention_heads)
    fisher_dims, fisher_units = [0, 1, 2, 3, 4, 6, 7, 8], [0, 1, 2, 4, 5, 6, 7, 8]
    hidden = torch.zeros(d)
    hidden[fisher_dims] = 1.0
    units = torch.zeros(ff)
    units[:64] = torch.rand(64) * 0.1  # the rest of the MLP by an arbitrary order below these
    units[fisher_units] = 1.0 + torch.arange(8.0)
    fake = Scores(hidden, [{i: {"ff": units, "k": torch.rand(kv), "v": torch.rand(kv)} for i in range(4)}])
    seen = {}

    def fake_scores(stacks, tapped, loss_of, batches):
        seen["batches"] = len(batches)
        return fake

    monkeypatch.setattr(lst_mod, "fisher_scores", fake_scores)
    magnitude = LST(LSTConfig(r=8)).apply(copy.deepcopy(base), ctx(base))
    fisher = _fisher_lst(copy.deepcopy(base), [batch_for(base, "causal_lm")] * 2, r=8)
    assert seen["batches"] == 2 and fisher.init_used == "pruned_fisher" and magnitude.init_used == "pruned"
    kept_mag = magnitude.side.ladders[0].weight.argmax(1).tolist()
    kept = fisher.side.ladders[0].weight.argmax(1).tolist()
    assert set(strong) <= set(kept_mag) and kept == fisher_dims
    layer, block = base.model.layers[0], fisher.side.blocks[0]
    assert_close(block.ln1.weight, layer.input_layernorm.weight[kept])
    ff_side = block.mlp.up.weight.shape[0]
    want_units = sorted(torch.topk(units, ff_side).indices.tolist())
    assert set(fisher_units) <= set(want_units) and not set(heavy_units) & set(want_units)
    assert_close(block.mlp.up.weight, layer.mlp.up_proj.weight[want_units][:, kept])
    assert_close(block.mlp.down.weight, layer.mlp.down_proj.weight[kept][:, want_units])


@pytest.mark.parametrize("preset,task", [*FAMILIES, ("tiny-bert", "classification")])
def test_pruned_fisher_builds_on_every_family_and_trains(preset, task):
    # Real scores: fused qkv (GPT-2), cross-attention (T5), an encoder classifier (BERT). They pick another side
    # network than the weight magnitudes here, and it trains.
    base = tiny(preset, task)
    batches = [batch_for(base, task, batch=4, seed=s) for s in range(2)]
    model = _fisher_lst(copy.deepcopy(base), batches, r=4)
    magnitude = LST(LSTConfig(r=4)).apply(copy.deepcopy(base), ctx(base))
    assert model.init_used == "pruned_fisher"
    differs = any((a - b).abs().max() > 0 for a, b in zip(model.side.parameters(), magnitude.side.parameters())
                  if a.shape == b.shape)
    assert differs
    _randomize_trainable(model)  # up != 0: the side network's output matters
    model.train()
    losses = adam_losses(model, batches[0], steps=15, lr=1e-2)
    assert losses[-1] < losses[0] - 0.2, losses


def test_pruned_fisher_needs_calibration_batches():
    with pytest.raises(SidetuneError, match="needs calibration batches"):
        LST(LSTConfig(init="pruned_fisher")).apply(tiny("tiny-llama", "causal_lm"), ctx("causal_lm"))
    with pytest.raises(SidetuneError, match="fisher_batches must be >= 1"):
        LSTConfig(init="pruned_fisher", fisher_batches=0)
    assert LST(LSTConfig()).calibration_batches() == 0


@pytest.mark.parametrize("storage", ["full", "int8"])
def test_ladder_offload_is_exact_and_keeps_the_ladder_inputs_in_host_memory(storage):
    """ladder_offload (CUDA): what the ladders save for their weight gradients goes to host memory and comes back in
    backward, gradients the same to the bit. On the CPU it runs as a CUDA prediction runs it (memory.simulating):
    the copies are made as host memory, which the live tracker counts apart from the device's bytes, and the
    saved-tensor accounting no longer sees them on the device."""
    from sidetune import memory as mem

    def run(offload, simulate):
        model, base, roles = _lst("tiny-llama", "causal_lm", ladder_grad_input=storage, ladder_offload=offload)
        _randomize_trainable(model)
        batch = batch_for(base, "causal_lm", seq=32)
        tracker = mem.LiveTracker()
        with tracker, mem.simulating("cuda") if simulate else contextlib.nullcontext(), \
                SavedTensorTracker(model, roles) as saved:
            model.train()(**batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in trainable_parameters(model).items()}
        return grads, tracker.host_peak, saved.by_role()["method"], model, base

    plain, host_plain, method_plain, model, base = run(False, True)
    b, t, d, taps = 2, 32, base.config.hidden_size, len(model.side.tapped) + 1
    per_row = 4 * d if storage == "full" else d + 4  # fp32 rows, or int8 rows and one fp32 scale each
    for offload, simulate in ((True, True), (True, False)):
        grads, host, method, _, _ = run(offload, simulate)
        assert grads.keys() == plain.keys()
        for name, grad in plain.items():
            assert torch.equal(grads[name], grad), name
        if simulate:  # a CUDA step: every ladder's saved input in host memory, none on the device
            assert host == taps * b * t * per_row, (host, taps * b * t * per_row)
            assert method == method_plain - host
        else:  # a CPU step: nothing to move
            assert host == 0 and method == method_plain
    assert host_plain == 0


def test_ladder_offload_prediction_for_cuda_counts_host_bytes():
    """The profile's CUDA prediction (fake tensors on the CPU) of the lean Q-LST settings: with ladder_offload the int8
    ladder inputs are host bytes (one int8 row and one fp32 scale per token and ladder) and the device peak drops."""
    from sidetune.profile import measure

    b, t = 2, 64
    rows = {}
    for offload in (False, True):
        # r=2: side head dim 8, so the CUDA prediction and its side recompute both run the fused attention kernel
        cfg = load_config(None, ["model.name=tiny-llama", "data.task=causal_lm", "method.name=lst", "method.r=2",
                                 "method.ladder_grad_input=int8", f"method.ladder_offload={str(offload).lower()}",
                                 f"train.batch_size={b}", f"data.max_length={t}", "train.loss_chunk_size=32"])
        rows[offload] = measure(cfg, True, "cuda", fake=True)
    d, taps = 64, 4 + 1  # tiny-llama: width 64, 4 blocks all tapped, and the embeddings
    assert rows[False]["host_bytes"] == 0
    assert rows[True]["host_bytes"] == taps * b * t * (d + 4)
    assert rows[True]["act_method_bytes"] == rows[False]["act_method_bytes"] - rows[True]["host_bytes"]
    assert rows[True]["peak_bytes"] < rows[False]["peak_bytes"]


@pytest.mark.parametrize("storage", ["full", "int8"])
def test_ladders_projecting_in_the_hooks_equal_projecting_after_the_backbone(storage):
    """Each tap is projected in its hook, while the backbone runs: the loss and every gradient are those of the
    order it replaced (the whole backbone first, holding every tap, then the ladders), to the bit."""
    from sidetune.methods._lst_blocks import capture

    model, base, _ = _lst("tiny-llama", "causal_lm", side_layers="every:2", ladder_grad_input=storage)
    _randomize_trainable(model)
    model.train()
    batch = batch_for(base, "causal_lm")
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable_parameters(model).items()}
    model.zero_grad()
    side = model.side
    with torch.no_grad(), capture(model.stacks[0].layers, side.tapped) as taps:
        final = base.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state
    assert len(taps) == len(side.tapped) + 1  # held at once: what the hooks now spare
    downs = [side.project(0, taps[-1])] + [side.project(j + 1, taps[i]) for j, i in enumerate(side.tapped)]
    hidden = model._merge(final, side(downs[0], downs[1:], batch["attention_mask"]))
    after = model.head(hidden, batch["labels"], batch["attention_mask"]).loss
    after.backward()
    assert torch.equal(after, loss)
    for name, p in trainable_parameters(model).items():
        assert torch.equal(p.grad, grads[name]), name
