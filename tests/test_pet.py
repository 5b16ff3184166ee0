"""PET: the verbalizer logits are the LM's own logits at the cloze of each (right-padded) row, the loss trains, the
intended parameters (and only they) get gradients, bad configs fail at parse time, and max_steps=0 evaluates."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ctx, read_metrics, run_cli, tiny
from torch.testing import assert_close

from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.methods import trainable_parameters
from sidetune.methods.pet import PET, PETConfig

PATTERN = "Review: {text} All in all, it was"


@pytest.fixture(scope="module")
def lm():
    return tiny("tiny-llama", "causal_lm").eval()


@pytest.fixture(scope="module")
def tok():
    return ctx("classification").tokenizer


def _pet(lm, **kw):
    cfg = PETConfig(**{"pattern": PATTERN, "verbalizer": ["terrible", "great"], **kw})
    return PET(cfg).apply(copy.deepcopy(lm), ctx("classification"))


def _batch(tok, texts, labels):
    enc = tok(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor(labels)}


TEXTS = ["a gorgeous, witty film", "dull", "it is neither funny nor moving, and far too long"]


def test_verbalizer_logits_are_the_lm_logits_after_the_pattern_in_each_row(lm, tok):
    model = _pet(lm)
    batch = _batch(tok, TEXTS, [1, 0, 0])
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # three lengths: right padding in two rows
    words = [tok(" terrible", add_special_tokens=False)["input_ids"][0],
             tok(" great", add_special_tokens=False)["input_ids"][0]]
    with torch.no_grad():
        out = model(**batch)
        for row, text in enumerate(TEXTS):
            # Reference: the whole patterned text, one row, no padding; the word is predicted at its last token.
            ids = tok("Review: ", add_special_tokens=False)["input_ids"] + tok(text)["input_ids"] + \
                tok(" All in all, it was", add_special_tokens=False)["input_ids"]
            ref = lm(input_ids=torch.tensor([ids])).logits[0, -1, words]
            assert_close(out.logits[row], ref, rtol=1e-5, atol=1e-5)
    assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, batch["labels"]))


def test_sum_logprob_sums_each_words_token_logprobs(lm, tok):
    words = ["utterly terrible", "great"]  # two tokens and one
    model = _pet(lm, verbalizer=words, score="sum_logprob")
    batch = _batch(tok, TEXTS, [1, 0, 0])
    with torch.no_grad():
        out = model(**batch)
        for row, text in enumerate(TEXTS):
            ids = tok("Review: ", add_special_tokens=False)["input_ids"] + tok(text)["input_ids"] + \
                tok(" All in all, it was", add_special_tokens=False)["input_ids"]
            for c, w in enumerate(words):
                wids = tok(" " + w, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(lm(input_ids=torch.tensor([ids + wids])).logits[0], -1)
                ref = sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(wids))
                assert_close(out.logits[row, c], ref, rtol=1e-4, atol=1e-4)
    # With single-token words, sum_logprob and first_token give the same class probabilities.
    single = dict(verbalizer=["terrible", "great"])
    with torch.no_grad():
        a = _pet(lm, **single)(**batch).logits.softmax(-1)
        b = _pet(lm, **single, score="sum_logprob")(**batch).logits.softmax(-1)
    assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train,expect", [("all", None), ("top", ["model.layers.2.", "model.layers.3.", "model.norm."])])
def test_exactly_the_intended_parameters_train(lm, tok, train, expect):
    model = _pet(lm, train=train, top_layers=2).train()
    names = [n.removeprefix("lm.") for n in trainable_parameters(model)]
    all_names = [n.removeprefix("lm.") for n, _ in model.named_parameters()]
    if expect is None:
        assert names == all_names
    else:
        assert names and all(n.startswith(tuple(expect)) for n in names)
        assert {n.rsplit(".", 1)[0].split(".layers.")[-1].split(".")[0] for n in names if ".layers." in n} == {"2", "3"}
        assert "model.embed_tokens.weight" not in names  # tied to the LM head: it stays frozen
    model(**_batch(tok, TEXTS, [1, 0, 0])).loss.backward()
    trainable = trainable_parameters(model)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


def test_loss_decreases_on_a_toy_batch(lm, tok):
    model = _pet(lm).train()
    batch = _batch(tok, TEXTS, [1, 0, 0])
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("override,match", [
    ("method.pattern=It was great", "must contain {text} exactly once"),
    ("method.pattern={text} {text}", "must contain {text} exactly once"),
    ("method.pattern={text} {label}", "must contain {text} exactly once"),
    ("method.verbalizer=[good,good]", "one distinct word per class"),
])
def test_bad_configs_fail_at_parse_time_in_one_line(override, match):
    with pytest.raises(SidetuneError, match=match) as e:
        load_config(None, ["method.name=pet", override])
    assert "\n" not in str(e.value)


def test_encoders_and_bad_verbalizers_are_refused_in_one_line(lm):
    with pytest.raises(SidetuneError, match="causal LMs only"):
        PET(PETConfig()).apply(tiny("tiny-bert", "causal_lm"), ctx("classification"))
    with pytest.raises(SidetuneError, match="share their first token"):
        _pet(lm, verbalizer=["utterly great", "utterly bad"])
    with pytest.raises(SidetuneError, match="must end with words after"):
        _pet(lm, pattern="Review: {text}")


def test_max_steps_0_evaluates_the_untrained_model_and_saves_final(tmp_path, sst2_small):
    out = tmp_path / "run"
    r = run_cli("train", "recipes/sst2_pet.yaml", "model.name=tiny-llama", f"data.train={sst2_small['train']}",
                f"data.eval={sst2_small['dev']}", "data.max_eval_samples=16", "train.max_steps=0",
                f"train.output_dir={out}", "train.progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [0] and "eval_accuracy" in rows[0] and rows[0]["eval_examples"] == 16
    assert (out / "final" / "trainable.safetensors").is_file()
