"""data.packing: short causal-LM examples packed into rows of up to data.max_length tokens with no cross-example
attention. A packed row must give every example exactly the logits and the loss it gets alone (full, LoRA, LST;
Llama with RoPE and GPT-2 with learned positions), the rows must hold every example once with -100 at each example's
first label, the wrong tasks and the prompt methods are refused in one line before any file is written, and a short
packed run learns."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sidetune import data as data_lib
from sidetune import session
from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.methods import METHODS
from sidetune.models import load_tokenizer
from sidetune.tasks import batch_tokens, get_task
from sidetune.train import train
from tests.conftest import RECIPES, read_metrics, run_cli

WORDS = ["the", "a", "film", "was", "great", "dull", "slow", "warm", "bright", "cold", "story", "plot", "actor",
         "scene", "ending", "music"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Plain-text lines of 1 to 12 words (seeded): many fit several to a 32-token row."""
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(1, 13, (40,), generator=g)]
    path = tmp_path_factory.mktemp("packing") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return str(path)


def _cfg(corpus: str, *extra: str, out: str = "runs/unused"):
    return load_config(None, [
        "model.name=tiny-llama", "data.task=causal_lm", f"data.train={corpus}", "data.eval=null",
        "data.text_field=text", "data.max_length=32", "data.packing=true", "train.batch_size=4",
        "train.progress=false", f"train.output_dir={out}", *extra])


def _examples(cfg) -> list[dict]:
    """The same training examples, unpacked (one tokenized example per row)."""
    unpacked = dataclasses.replace(cfg.data, packing=False)
    return [dict(r) for r in data_lib.build(unpacked, load_tokenizer(cfg.model), cfg.train.seed).train]


def _segments(row: dict) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row: positions restart at 0 (padding: position 0 at the end)."""
    pos = row["position_ids"]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(a, b) for a, b in itertools.pairwise(starts) if b - a >= 2]


def test_rows_hold_every_example_once_with_minus_100_at_each_start(corpus):
    cfg = _cfg(corpus)
    examples = _examples(cfg)
    rows = [dict(r) for r in data_lib.build(cfg.data, load_tokenizer(cfg.model), cfg.train.seed).train]
    assert all(set(r) == {"input_ids", "labels", "position_ids"} for r in rows)  # no attention mask
    assert all(len(r["input_ids"]) <= 32 for r in rows)
    found = []
    for r in rows:
        segs = _segments(r)
        assert segs[-1][1] == len(r["input_ids"])  # rows are unpadded until collated
        for a, b in segs:
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == -100  # the previous example's last token never predicts this one
            found.append((tuple(r["input_ids"][a:b]), tuple(r["labels"][a + 1:b])))
    # Every example of two or more tokens exactly once, its labels after the first unchanged; one-token examples
    # (nothing to learn) are left out.
    expected = sorted((tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in examples if len(e["input_ids"]) >= 2)
    assert sorted(found) == expected
    assert len(rows) < len(expected) / 2  # packing does pack: 40 short lines into far fewer rows
    # First-fit: an example was opened a new row only when no earlier row had room, so no two rows fit together.
    lengths = sorted(len(r["input_ids"]) for r in rows)
    assert lengths[0] + lengths[1] > 32


def test_first_fit_fills_the_first_row_with_room():
    assert data_lib._first_fit([5, 7, 3, 6, 2, 8, 1], 10) == [[0, 2, 4], [1, 6], [3], [5]]
    assert data_lib._first_fit([10, 10, 1], 10) == [[0], [1], [2]]


def test_collated_rows_pad_without_a_mask_and_count_their_real_tokens(corpus):
    cfg = _cfg(corpus)
    setup = session.build(cfg, "cpu", with_data=True)
    rows = [dict(setup.data.train[i]) for i in range(4)]
    batch = get_task("causal_lm").collator(setup.tokenizer)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    width = max(len(r["input_ids"]) for r in rows)
    for r, ids, labels, pos in zip(rows, batch["input_ids"], batch["labels"], batch["position_ids"]):
        n = len(r["input_ids"])
        assert ids[:n].tolist() == r["input_ids"] and labels[n:].eq(-100).all() and pos[n:].eq(0).all()
        assert ids.shape[0] == width
    assert batch_tokens(batch).item() == sum(len(r["input_ids"]) for r in rows)
    assert batch_tokens(batch).item() < batch["input_ids"].numel()  # the padding is not counted


def _perturb(setup) -> None:
    """Random trainable weights (LoRA's B and LST's up start at 0, which would hide their paths)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in setup.trainable:
            p.add_(0.2 * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 and p.std() > 0 else 1.0))


def _alone(module, example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one example run by itself, and its summed next-token loss."""
    ids = torch.tensor([example["input_ids"]])
    logits = module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return logits, F.cross_entropy(logits[:-1].float(), torch.tensor(example["labels"][1:]), ignore_index=-100,
                                   reduction="sum")


@pytest.mark.parametrize("model,method", [("tiny-llama", "full"), ("tiny-llama", "lora"), ("tiny-llama", "lst"),
                                          ("tiny-gpt2", "lora"), ("tiny-gpt2", "lst")])
def test_a_packed_row_gives_each_example_its_own_logits_and_loss(corpus, model, method):
    cfg = _cfg(corpus, f"model.name={model}", f"method.name={method}")
    setup = session.build(cfg, "cpu", with_data=True)
    _perturb(setup)
    module = setup.module.eval()
    rows = [dict(setup.data.train[i]) for i in range(3)]
    batch = setup.task.collator(setup.tokenizer)(rows)
    with torch.no_grad():
        out = module(**batch)
        total, targets = 0.0, 0
        for r, logits in zip(rows, out.logits):
            for a, b in _segments(r):
                alone, loss = _alone(module, {k: r[k][a:b] for k in ("input_ids", "labels")})
                assert_close(logits[a:b], alone, rtol=1e-4, atol=1e-4)
                # The same example's loss from the packed logits (labels from the packed row: its -100 start).
                packed_loss = F.cross_entropy(logits[a:b - 1].float(), torch.tensor(r["labels"][a + 1:b]),
                                              ignore_index=-100, reduction="sum")
                assert_close(packed_loss, loss, rtol=1e-5, atol=1e-4)
                total, targets = total + loss, targets + sum(t != -100 for t in r["labels"][a + 1:b])
    # The model's own loss on the packed batch = the token mean of the examples' losses run alone.
    assert_close(out.loss, total / targets, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "lst"])
def test_no_attention_crosses_examples_in_a_row(corpus, method):
    setup = session.build(_cfg(corpus, f"method.name={method}"), "cpu", with_data=True)
    _perturb(setup)
    module = setup.module.eval()
    row = next(dict(r) for r in setup.data.train if len(_segments(dict(r))) >= 2)
    (a1, b1), (a2, _) = _segments(row)[:2]
    batch = setup.task.collator(setup.tokenizer)([row])
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, a1:b1] = (changed["input_ids"][0, a1:b1] + 7) % 500 + 3  # new tokens for example 1
    with torch.no_grad():
        before, after = module(**batch).logits[0], module(**changed).logits[0]
    assert (after[a1:b1] - before[a1:b1]).abs().max() > 1e-2  # example 1 did change
    assert_close(after[a2:], before[a2:], rtol=0, atol=1e-5)  # example 2 (and the rest) did not


def test_the_chunked_loss_reads_packed_rows_too(corpus):
    cfg = _cfg(corpus, "method.name=lst", "train.loss_chunk_size=16")
    setup = session.build(cfg, "cpu", with_data=True)
    _perturb(setup)
    batch = setup.task.collator(setup.tokenizer)([dict(setup.data.train[i]) for i in range(3)])
    with torch.no_grad():
        assert_close(setup.module.eval()(**batch).loss, setup.model.eval()(**batch).loss, rtol=1e-5, atol=1e-5)


def test_chat_conversations_pack(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in WORDS[:8]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(str(path), "data.task=chat", "data.max_length=128")
    packed = session.build(cfg, "cpu", with_data=True).data.train
    assert len(packed) < len(rows)
    labelled = sum(t != -100 for r in packed for t in r["labels"])
    assert labelled == sum(t != -100 for e in _examples(cfg) for t in e["labels"][1:])


@pytest.mark.parametrize("task", ["classification", "seq2seq"])
def test_packing_is_refused_for_non_decoder_tasks(task):
    with pytest.raises(SidetuneError) as e:
        load_config(None, [f"data.task={task}", "data.packing=true", "method.name=lora"])
    assert str(e.value) == (f"data.packing=true packs decoder examples (data.task=causal_lm or chat), not "
                            f"data.task={task}; set data.packing=false")


@pytest.mark.parametrize("method", [m for m, cls in METHODS.items() if not cls.packing])
def test_packing_is_refused_for_methods_with_virtual_tokens(method):
    with pytest.raises(SidetuneError) as e:
        load_config(None, ["data.task=causal_lm", "data.packing=true", f"method.name={method}"])
    assert str(e.value) == (f"method {method!r} cannot train on packed rows: its virtual tokens belong to one "
                            f"example and cannot serve the several that data.packing=true puts in a row; set "
                            f"data.packing=false")


def test_the_capability_is_declared_where_virtual_tokens_are():
    assert {m for m, cls in METHODS.items() if not cls.packing} == {"prompt_tuning", "ptuning_v1", "ptuning_v2",
                                                                    "prefix_tuning"}


def test_the_cli_refuses_before_writing(tmp_path):
    out = tmp_path / "run"
    res = run_cli("train", RECIPES / "sst2_lora.yaml", "data.packing=true", f"train.output_dir={out}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "sidetune: error: data.packing=true packs decoder examples (data.task=causal_lm or chat), not "
        "data.task=classification; set data.packing=false"]
    assert not out.exists()


def test_a_packed_run_learns(corpus, tmp_path):
    out = tmp_path / "run"
    train(_cfg(corpus, "method.name=full", "train.lr=1e-3", "train.max_steps=16", "train.log_every=1",
               "train.warmup_steps=0", "train.scheduler=constant", out=str(out)))
    rows = [r for r in read_metrics(out) if "loss" in r]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    assert all(r["tokens_per_s"] > 0 for r in rows)
