"""Prompt tuning and the shared soft-prompt machinery: forward equals PEFT's prompt tuning with the same prompt, a
padded row computes what it computes alone (every classifier's pooled position stays real), only the prompt and the
head train, the three initialisations, the chunked LM loss, generation, and one-line refusals."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import batch_for, ctx, tiny
from torch.testing import assert_close

from sidetune.errors import SidetuneError
from sidetune.losses import ChunkedLMLoss
from sidetune.methods import Context
from sidetune.methods.prompt_tuning import PromptTuning, PromptTuningConfig

TASK_TYPE = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}
CASES = [("tiny-llama", "causal_lm"), ("tiny-gpt2", "causal_lm"), ("tiny-bert", "classification"),
         ("tiny-llama", "classification")]
P = 5


def _apply(base, task, context=None, **kw):
    cfg = PromptTuningConfig(num_virtual_tokens=kw.pop("p", P), **kw)
    return PromptTuning(cfg).apply(copy.deepcopy(base), context or ctx(task))


@pytest.mark.parametrize("preset,task", CASES)
def test_forward_equals_peft_prompt_tuning(preset, task):
    peft = pytest.importorskip("peft")
    base = tiny(preset, task).eval()
    ours = _apply(base, task, init="random").eval()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        num_virtual_tokens=P, task_type=TASK_TYPE[task])).eval()
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(ours.prompt.weight)
    batch = batch_for(base, task)
    if task == "causal_lm":
        # PEFT also scores the first token (predicted from the prompt); the model alone, and sidetune, never do.
        batch["labels"][:, 0] = -100
    if preset == "tiny-llama" and task == "classification":
        # PEFT feeds a decoder classifier inputs_embeds, so transformers pools position -1: a pad in a right-padded
        # row. Compare unpadded rows here; test_padded_rows_compute_what_they_compute_alone covers padding.
        batch["attention_mask"][:] = 1
    with torch.no_grad():
        expected, actual, plain = ref(**batch), ours(**batch), base(**batch)
    # PEFT returns the virtual positions' logits too; ours line up with the input (and its labels).
    expected_logits, actual_logits = expected.logits, actual.logits
    assert actual_logits.shape == plain.logits.shape
    assert (actual_logits - plain.logits).abs().max() > 1e-3  # the prompt really acts
    if task == "causal_lm":  # the real positions (pads see other position ids: their logits are never read)
        real = batch["attention_mask"].bool()
        expected_logits, actual_logits = expected_logits[:, P:][real], actual_logits[real]
    assert_close(actual_logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,task", CASES)
def test_padded_rows_compute_what_they_compute_alone(preset, task):
    base = tiny(preset, task).eval()
    model = _apply(base, task, init="random").eval()
    batch = batch_for(base, task, batch=3)
    batch["attention_mask"][2, :4] = 0  # row 0 right-padded, row 2 left-padded, row 1 unpadded
    if task == "causal_lm":
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row in range(3):
            keep = batch["attention_mask"][row].bool()
            alone = model(input_ids=batch["input_ids"][row:row + 1, keep]).logits
            got = out[row:row + 1, keep] if task == "causal_lm" else out[row:row + 1]
            assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_right_padding_would_pool_a_pad_in_a_decoder_classifier():
    # Why _soft_prompt moves the padding: the naive layout (PEFT's) scores a padded row by a pad position.
    peft = pytest.importorskip("peft")
    base = tiny("tiny-llama", "classification").eval()
    ours = _apply(base, "classification", init="random").eval()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(num_virtual_tokens=P, task_type="SEQ_CLS"))
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(ours.prompt.weight)
        batch = batch_for(base, "classification")  # row 0 has 3 pads at the end
        naive, fixed = ref.eval()(**batch).logits, ours(**batch).logits
    assert_close(fixed[1], naive[1], rtol=1e-5, atol=1e-5)  # unpadded row: the same
    assert (fixed[0] - naive[0]).abs().max() > 1e-3  # padded row: PEFT reads a pad


@pytest.mark.parametrize("preset,task", CASES)
def test_only_the_prompt_and_head_get_gradients(preset, task):
    model = _apply(tiny(preset, task), task).train()
    model(**batch_for(model.model, task)).loss.backward()
    head = tuple(f"model.{h}." for h in model.model.sidetune_head)
    names = []
    for name, p in model.named_parameters():
        if name == "prompt.weight" or name.startswith(head):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            names.append(name)
        else:
            assert not p.requires_grad and p.grad is None, name
    assert "prompt.weight" in names and model.prompt.weight.dtype == torch.float32


def test_training_the_prompt_lowers_the_loss():
    # A causal LM has no new head: the prompt alone is trained (a random tiny Llama's tied head moves slowly).
    base = tiny("tiny-llama", "causal_lm")
    model = _apply(base, "causal_lm", init="random").eval()
    batch = batch_for(base, "causal_lm", batch=4)
    opt = torch.optim.AdamW([model.prompt.weight], lr=3e-2)
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0] - 0.05, losses


class _Tokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [10 + len(w) for w in text.split()]}


def test_initialisations():
    base = tiny("tiny-llama", "causal_lm")
    table = base.get_input_embeddings().weight
    # text: the embeddings of the text's tokens, repeated / cut to P.
    text = _apply(base, "causal_lm", Context.for_task("causal_lm", tokenizer=_Tokenizer()), init="text",
                  init_text="a bb ccc").prompt.weight
    assert_close(text, table[torch.tensor([11, 12, 13, 11, 12])])
    # vocab: P distinct vocabulary rows, the draw follows the (trainer-seeded) global RNG.
    torch.manual_seed(3)
    vocab = _apply(base, "causal_lm", init="vocab").prompt.weight
    rows = [(table == v).all(1).nonzero().flatten().tolist() for v in vocab]
    assert all(len(r) == 1 for r in rows) and len({r[0] for r in rows}) == P
    torch.manual_seed(3)
    assert torch.equal(_apply(base, "causal_lm", init="vocab").prompt.weight, vocab)
    # random: at the scale of the vocabulary embeddings, not N(0, 1).
    random = _apply(base, "causal_lm", init="random", p=200).prompt.weight
    assert 0.8 < random.std().item() / table.std().item() < 1.2


def test_chunked_lm_loss_sees_the_prompt():
    base = tiny("tiny-llama", "causal_lm")
    model = _apply(base, "causal_lm", init="random").eval()
    batch = batch_for(base, "causal_lm")
    with torch.no_grad():
        chunked, full = ChunkedLMLoss(model, chunk_size=7)(**batch).loss, model(**batch).loss
    assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert (full - base.eval()(**batch).loss).abs() > 1e-4


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_generate_with_the_prompt(preset):
    base = tiny(preset, "causal_lm").eval()
    model = _apply(base, "causal_lm", init="random").eval()
    with torch.no_grad():
        model.prompt.weight.mul_(50)  # a prompt strong enough to change what is generated
        batch = batch_for(base, "causal_lm", batch=2, seq=8)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = model.generate(ids, mask, max_new_tokens=4, eos_token_id=[])
        real = int(mask[0].sum())
        assert torch.equal(out[0, : real + 4], model.generate(ids[:1, :real], max_new_tokens=4, eos_token_id=[])[0])
        assert out[1, ids.shape[1]] == model(input_ids=ids[1:]).logits[0, -1].argmax()
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-2
    with pytest.raises(SidetuneError, match="generate needs a causal LM"):
        _apply(tiny("tiny-bert", "classification"), "classification").generate(ids)


def test_unsupported_models_and_bad_configs_fail_in_one_line():
    with pytest.raises(SidetuneError, match="not encoder-decoder t5"):
        _apply(tiny("tiny-t5", "seq2seq"), "seq2seq")
    with pytest.raises(SidetuneError, match="num_virtual_tokens must be >= 1"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(SidetuneError, match=r"method\.init=text needs method\.init_text"):
        PromptTuningConfig(init="text")
