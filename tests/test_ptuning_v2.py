"""P-tuning v2: forward equals PEFT's prefix tuning with the same prefix, step 0 is exact with zero-init attention
(and provably not with a zero prefix under the joint softmax), only the prefix and the head train, gradient
checkpointing keeps the prefix, the chunked LM loss and the CLI work."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import RECIPES, batch_for, ctx, read_metrics, run_cli, tiny
from prefix_oracle import peft_prefix_reference
from torch.testing import assert_close

from sidetune.errors import SidetuneError
from sidetune.losses import ChunkedLMLoss
from sidetune.memory import SavedTensorTracker, module_roles, snapshot_modules
from sidetune.methods.ptuning_v2 import PTuningV2, PTuningV2Config

CASES = [("tiny-llama", "causal_lm"), ("tiny-llama", "classification"), ("tiny-gpt2", "causal_lm"),
         ("tiny-bert", "classification")]


def _apply(base, **kw):
    return PTuningV2(PTuningV2Config(num_virtual_tokens=kw.pop("p", 5), **kw)).apply(copy.deepcopy(base), ctx(base))


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("preset,task", CASES)
def test_forward_equals_peft_prefix_tuning(preset, task, projection):
    pytest.importorskip("peft")
    base = tiny(preset, task).eval()
    # PEFT (like THUDM's code) leaves the real tokens at positions P..P+T-1: shift_positions reproduces that.
    ours = _apply(base, shift_positions=True, prefix_projection=projection, projection_dim=32).eval()
    batch = batch_for(base, task)
    # Llama classification: PEFT refuses it; the oracle is PEFT on the causal body plus our score head.
    expected = peft_prefix_reference(base, ours, task, batch, 32 if projection else None)
    with torch.no_grad():
        actual, plain = ours(**batch), base(**batch)
    assert (actual.logits - plain.logits).abs().max() > 1e-3  # the prefix really acts
    assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("preset,task", CASES)
def test_zero_init_attention_makes_step0_exact(preset, task, projection):
    base = tiny(preset, task).eval()
    batch = batch_for(base, task)
    model = _apply(base, zero_init_attention=True, prefix_projection=projection, projection_dim=32).eval()
    with torch.no_grad():
        assert_close(model(**batch).logits, base(**batch).logits, rtol=1e-6, atol=1e-6)
        # Not a dead prefix: with non-zero values the prefix changes the output.
        last = model.prefix.transform[-1] if projection else model.prefix.embedding
        last.weight.normal_()
        assert (model(**batch).logits - base(**batch).logits).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_generate_with_the_prefix(preset):
    base = tiny(preset, "causal_lm").eval()
    batch = batch_for(base, "causal_lm", batch=2, seq=8)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model = _apply(base, zero_init_attention=True).eval()
    with torch.no_grad():
        # A zero-init-attention prefix is exactly invisible at step 0: transformers' own cached greedy decoding of
        # the base model is the oracle.
        expected = base.generate(ids[1:], max_new_tokens=5, do_sample=False, min_new_tokens=5)
        assert torch.equal(model.generate(ids[1:], max_new_tokens=5, eos_token_id=[]), expected)
        # A trained prefix changes what is generated, each new token being the argmax of the full forward, and a
        # padded row decodes as it does alone.
        model.prefix.embedding.weight.normal_(std=3.0)
        out = model.generate(ids, mask, max_new_tokens=4, eos_token_id=[])
        real = int(mask[0].sum())
        alone = model.generate(ids[:1, :real], max_new_tokens=4, eos_token_id=[])
        assert torch.equal(out[0, : real + 4], alone[0])
        first = model(input_ids=ids[1:]).logits[0, -1].argmax()
        assert out[1, ids.shape[1]] == first and not torch.equal(out[1:], expected[:, : ids.shape[1] + 4])
    with pytest.raises(SidetuneError, match="generate needs a causal LM"):
        _apply(tiny("tiny-bert", "classification")).generate(ids)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("shift_positions", [False, True])
def test_cached_generate_equals_the_full_forward_per_token(preset, shift_positions):
    """The growing prefix cache (prefix, then every token seen) decodes exactly what rerunning the full forward the
    model trained with decodes; and it is a cache: the model sees one new token per step."""
    base = tiny(preset, "causal_lm").eval()
    batch = batch_for(base, "causal_lm", batch=2, seq=8)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model = _apply(base, shift_positions=shift_positions).eval()
    with torch.no_grad():
        model.prefix.embedding.weight.normal_(std=3.0)
        uncached = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], use_cache=False)
        seen = []
        hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]),
                                                     with_kwargs=True)
        cached = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
        hook.remove()
    assert torch.equal(cached, uncached)
    real = [int(m.sum()) for m in mask]
    assert seen == [real[0], 1, 1, 1, 1, 1, real[1], 1, 1, 1, 1, 1]


@pytest.mark.parametrize("preset,task", [("tiny-llama", "causal_lm"), ("tiny-bert", "classification")])
def test_a_zero_prefix_is_not_invisible_under_the_joint_softmax(preset, task):
    # Why zero_init_attention exists: q.0 = 0 adds e^0 terms to each softmax denominator.
    base = tiny(preset, task).eval()
    batch = batch_for(base, task)
    model = _apply(base)
    with torch.no_grad():
        model.prefix.embedding.weight.zero_()
        assert (model.eval()(**batch).logits - base(**batch).logits).abs().max() > 1e-4


def test_zero_init_attention_equals_a_hand_written_separate_softmax():
    base = tiny("tiny-llama", "causal_lm").eval()
    model = _apply(base, zero_init_attention=True, p=3).eval()
    torch.nn.init.normal_(model.prefix.embedding.weight)
    attn = model.model.model.layers[0].self_attn
    seen = {}
    attn.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out[0]))
    attn.o_proj.register_forward_hook(lambda m, args, out: seen.__setitem__("o_in", args[0]))
    captured = {}
    attn.q_proj.register_forward_hook(lambda m, args, out: captured.__setitem__("q", out))
    attn.k_proj.register_forward_hook(lambda m, args, out: captured.__setitem__("k", out))
    attn.v_proj.register_forward_hook(lambda m, args, out: captured.__setitem__("v", out))
    ids = torch.randint(3, 1000, (1, 6))
    with torch.no_grad():
        model(input_ids=ids)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q = captured["q"].view(1, 6, 4, 16).transpose(1, 2)
        k = captured["k"].view(1, 6, 2, 16).transpose(1, 2)
        v = captured["v"].view(1, 6, 2, 16).transpose(1, 2)
        cos, sin = model.model.model.rotary_emb(q, torch.arange(6)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kp, vp = model.prefix()[0]
        k, v, kp, vp = (t.repeat_interleave(2, dim=-3) for t in (k, v, kp, vp))
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        tokens = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(~causal, float("-inf")), -1) @ v
        prefix = torch.softmax(q @ kp.transpose(-1, -2) / 4, -1) @ vp
        expected = (tokens + prefix).transpose(1, 2).reshape(1, 6, 64)
        assert_close(seen["o_in"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,task", CASES)
def test_only_the_prefix_and_head_get_gradients(preset, task):
    model = _apply(tiny(preset, task), prefix_projection=True, projection_dim=16).train()
    model(**batch_for(model, task)).loss.backward()
    head = tuple(f"model.{h}." for h in model.model.sidetune_head)
    for name, p in model.named_parameters():
        if name.startswith("prefix.") or name.startswith(head):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("preset,task", CASES)
@pytest.mark.parametrize("zero_init", [False, True])
def test_gradient_checkpointing_keeps_the_prefix(preset, task, zero_init):
    base = tiny(preset, task)
    batch = batch_for(base, task)
    runs = {}
    for checkpointing in (False, True):
        model = _apply(base, zero_init_attention=zero_init).train()
        torch.manual_seed(0)
        torch.nn.init.normal_(model.prefix.embedding.weight)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        roles = module_roles(model, snapshot_modules(model.model), model.model)
        with SavedTensorTracker(model, roles) as tracker:
            loss = model(**batch).loss
        loss.backward()
        runs[checkpointing] = (loss.detach(), model.prefix.embedding.weight.grad, tracker.by_role()["backbone"])
    (loss0, grad0, saved0), (loss1, grad1, saved1) = runs[False], runs[True]
    assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)  # the prefix is still there under checkpointing ...
    assert_close(grad1, grad0, rtol=1e-5, atol=1e-7)  # ... and gets the same gradient
    assert grad0.abs().sum() > 0
    assert saved1 < saved0 / 4  # and the backbone really is checkpointed


def test_reentrant_checkpointing_is_refused():
    model = _apply(tiny("tiny-llama", "causal_lm"))
    with pytest.raises(SidetuneError, match="non-reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_chunked_lm_loss_sees_the_prefix():
    base = tiny("tiny-llama", "causal_lm")
    model = _apply(base).eval()
    batch = batch_for(base, "causal_lm")
    with torch.no_grad():
        assert_close(ChunkedLMLoss(model, chunk_size=7)(**batch).loss, model(**batch).loss, rtol=1e-5, atol=1e-5)


def test_unsupported_models_and_bad_configs_fail_in_one_line():
    with pytest.raises(SidetuneError, match="not encoder-decoder t5"):
        PTuningV2(PTuningV2Config()).apply(tiny("tiny-t5", "seq2seq"), ctx("seq2seq"))
    with pytest.raises(SidetuneError, match="num_virtual_tokens must be >= 1"):
        PTuningV2(PTuningV2Config(num_virtual_tokens=0))
    with pytest.raises(SidetuneError, match="attn_implementation sdpa or eager"):
        PTuningV2(PTuningV2Config(zero_init_attention=True)).apply(
            tiny("tiny-llama", "causal_lm", attn_implementation="flex_attention"), ctx("causal_lm"))


def test_eager_attention_zero_init_matches_sdpa():
    batch = batch_for(tiny("tiny-gpt2", "causal_lm"), "causal_lm")
    outs = []
    for impl in ("eager", "sdpa"):
        model = _apply(tiny("tiny-gpt2", "causal_lm", attn_implementation=impl), zero_init_attention=True).eval()
        torch.manual_seed(0)
        torch.nn.init.normal_(model.prefix.embedding.weight)
        with torch.no_grad():
            outs.append(model(**batch).logits)
    assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_trains_through_the_cli_with_gradient_checkpointing(tmp_path, sst2_small):
    # python -m sidetune train: a tiny Llama as a causal LM with label completions, checkpointed, chunked loss.
    out = tmp_path / "run"
    result = run_cli(
        "train", str(RECIPES / "smollm2_lora.yaml"),
         "model.name=tiny-llama",
         "method.name=ptuning_v2", "method.num_virtual_tokens=8", "method.prefix_projection=true",
         "method.projection_dim=32", f"data.train={sst2_small['train']}", f"data.eval={sst2_small['dev']}",
         "data.max_length=32", "data.max_train_samples=16", "data.max_eval_samples=8", "train.max_steps=12",
         "train.batch_size=8", "train.lr=1e-2", "train.log_every=1", "train.eval_every=0", "train.progress=false",
         "train.gradient_checkpointing=true", "train.loss_chunk_size=64", f"train.output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    # A random tiny Llama's tied head has tiny logits (embeddings of std 0.02), so the loss can only fall slowly.
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4]) - 0.4, losses
    assert "eval_accuracy" in rows[-1] and "eval_loss" in rows[-1]
    from safetensors.torch import load_file

    assert all(k.startswith("prefix.") for k in load_file(out / "final" / "trainable.safetensors"))


# ----- the readout (method.pooling) and the head's own lr (method.head_lr), shared with prefix_tuning


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_pooling_reads_the_hidden_states_not_the_pooler(pooling):
    # At an exact step 0 the prefix model's hidden states are the frozen model's, so the oracle is the plain BERT:
    # its last hidden states pooled over the real tokens, straight into the classifier (its pooler bypassed).
    base = tiny("tiny-bert", "classification").eval()
    batch = batch_for(base, "classification")
    model = _apply(base, zero_init_attention=True, pooling=pooling).eval()
    with torch.no_grad():
        out = model(**batch)
        hidden = base.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        pooled = (hidden * m).sum(1) / m.sum(1) if pooling == "mean" else hidden[:, 0]
        expected = base.classifier(pooled)
        assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
        assert_close(out.loss, torch.nn.functional.cross_entropy(expected, batch["labels"]), rtol=1e-5, atol=1e-6)
        # not the model's own head, and the padding is masked out of the mean
        assert (out.logits - base(**batch).logits).abs().max() > 1e-4
        if pooling == "mean":
            assert (expected[0] - base.classifier(hidden[0].mean(0))).abs().max() > 1e-5


def test_pooling_last_is_a_decoders_own_readout():
    base = tiny("tiny-llama", "classification").eval()
    batch = batch_for(base, "classification")
    # Llama's own head finds the last real token by pad id, ours by the mask: pad as a collator would.
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, base.config.pad_token_id)
    model = _apply(base, zero_init_attention=True, pooling="last").eval()
    with torch.no_grad():
        out, ref = model(**batch), base(**batch)
    assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_pooling_mean_trains_the_prefix_and_the_classifier_only():
    model = _apply(tiny("tiny-bert", "classification"), pooling="mean").train()
    model(**batch_for(model, "classification")).loss.backward()
    for name, p in model.named_parameters():
        trains = name.startswith(("prefix.", "model.classifier."))
        assert p.requires_grad == trains and (p.grad is not None and p.grad.abs().sum() > 0) == trains, name


def test_head_lr_puts_the_head_in_its_own_group():
    from sidetune.config import TrainConfig
    from sidetune.session import make_optimizer

    method = PTuningV2(PTuningV2Config(num_virtual_tokens=5, head_lr=1e-2, train_pooler=True))
    model = method.apply(tiny("tiny-bert", "classification"), ctx("classification"))
    opt = make_optimizer(model, method, TrainConfig(lr=1e-4), torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == (1e-4 if name.startswith("prefix.") else 1e-2), name
    assert {n for n, p in model.named_parameters() if lr_of.get(id(p)) == 1e-2} >= {
        "model.classifier.weight", "model.bert.pooler.dense.weight"}
    assert PTuningV2(PTuningV2Config()).param_groups(model, 1e-4) is None  # default: one group at train.lr


def test_readout_configs_fail_in_one_line():
    with pytest.raises(SidetuneError, match="bypasses it"):
        PTuningV2Config(train_pooler=True, pooling="mean")
    with pytest.raises(SidetuneError, match="has none, so set"):
        _apply(tiny("tiny-llama", "causal_lm"), pooling="mean")
    with pytest.raises(SidetuneError, match="head_lr must be > 0"):
        PTuningV2Config(head_lr=0.0)
    with pytest.raises(SidetuneError, match="is not allowed"):
        from sidetune.config import load_config

        load_config(None, ["method.name=ptuning_v2", "method.pooling=max"])
