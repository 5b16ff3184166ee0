"""Data: file formats, the three tasks' tokenization, completion-only LM labels, label choices, padding."""

from __future__ import annotations

import json

import pytest

from sidetune.config import DataConfig, ModelConfig
from sidetune.data import build, collator
from sidetune.errors import SidetuneError
from sidetune.models import load_tokenizer


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer(ModelConfig(name="minilm"))


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_classification_tsv_and_limits(bert_tok, sst2_small):
    d = build(DataConfig(train=sst2_small["train"], eval=sst2_small["dev"], max_length=16, max_train_samples=40,
                         max_eval_samples=10), bert_tok)
    assert len(d.train) == 40 and len(d.eval) == 10 and d.num_labels == 2
    assert max(len(x) for x in d.train["input_ids"]) <= 16
    batch = collator("classification", bert_tok)([d.train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist() == d.train["labels"][:4]
    # dynamic padding: the batch is as long as its longest row, no longer
    assert batch["input_ids"].shape[1] == max(len(d.train[i]["input_ids"]) for i in range(4))


def test_bundled_data_resolves_from_anywhere(bert_tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = build(DataConfig(train="sst2/dev.tsv", eval=None, max_train_samples=8), bert_tok)
    assert len(d.train) == 8 and d.eval is None


def test_text_pair_and_string_labels(bert_tok, tmp_path):
    rows = [{"a": "a man eats", "b": "someone eats", "y": "entail"}, {"a": "a dog", "b": "a cat", "y": "contra"}]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    d = build(DataConfig(train=path, eval=path, text_field="a", text_pair_field="b", label_field="y"), bert_tok)
    assert d.label_names == ["contra", "entail"] and d.train["labels"] == [1, 0]
    ids = d.train[0]["input_ids"]
    assert ids.count(bert_tok.sep_token_id) == 2  # [CLS] a [SEP] b [SEP]


def test_causal_lm_loss_on_completion_only(tmp_path):
    tok = load_tokenizer(ModelConfig(name="smollm2-135m"))
    cfg = DataConfig(task="causal_lm", train="sst2/dev.tsv", eval="sst2/dev.tsv", max_train_samples=6,
                     max_eval_samples=3, prompt_template="Review: {sentence}\nSentiment:",
                     completion_template=" {label_name}", label_names=["negative", "positive"], max_length=24)
    d = build(cfg, tok)
    row = d.train[0]
    labels = row["labels"]
    completion = [t for t in labels if t != -100]
    assert tok.decode(completion[:-1]).strip() in ("negative", "positive")
    assert completion[-1] == tok.eos_token_id
    assert labels[: len(labels) - len(completion)] == [-100] * (len(labels) - len(completion))
    assert len(row["input_ids"]) <= 24  # long prompts are cut from the left; the completion survives
    # choices: one row per (example, label), only the gold one matches the training completion
    assert len(d.eval_choices) == 3 * 2
    assert sorted(set(d.eval_choices["choice"])) == [0, 1]
    batch = collator("causal_lm", tok)([d.train[i] for i in range(3)])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_plain_causal_lm_and_seq2seq(bert_tok, tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world", "target": "bonjour"}] * 3)
    lm = build(DataConfig(task="causal_lm", train=path, eval=None, text_field="text"), bert_tok)
    assert lm.train[0]["labels"] == lm.train[0]["input_ids"]
    s2s = build(DataConfig(task="seq2seq", train=path, eval=None, text_field="text", target_field="target"), bert_tok)
    assert s2s.train[0]["labels"] == bert_tok("bonjour")["input_ids"]


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_formats(bert_tok, tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]})
    path = tmp_path / f"d.{fmt}"
    {"csv": ds.to_csv, "json": ds.to_json, "parquet": ds.to_parquet}[fmt](str(path))
    d = build(DataConfig(train=str(path), eval=None), bert_tok)
    assert d.train["labels"] == [1, 0, 1]


def test_bad_data_is_one_line(bert_tok, tmp_path):
    with pytest.raises(SidetuneError, match="no such data file"):
        build(DataConfig(train=str(tmp_path / "missing.tsv")), bert_tok)
    path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": 0}])
    with pytest.raises(SidetuneError, match="has no column 'sentence'"):
        build(DataConfig(train=path, eval=None), bert_tok)
    with pytest.raises(SidetuneError, match="names column 'review'"):
        build(DataConfig(task="causal_lm", train=path, eval=None, prompt_template="{review}"), bert_tok)
    header_only = tmp_path / "empty.tsv"
    header_only.write_text("sentence\tlabel\n")
    with pytest.raises(SidetuneError, match="holds no rows"):
        build(DataConfig(train=str(header_only), eval=None), bert_tok)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"sentence": "ok", "label": 1}\n{broken\n')
    with pytest.raises(SidetuneError, match="could not be read as json"):
        build(DataConfig(train=str(broken), eval=None), bert_tok)
    with pytest.raises(SidetuneError, match=r"data\.max_length=2 leaves no room for text"):
        build(DataConfig(train="sst2/dev.tsv", eval=None, max_length=2), bert_tok)  # [CLS] [SEP] alone


def test_string_labels_in_a_tsv_become_integer_ids(bert_tok, tmp_path):
    path = tmp_path / "words.tsv"
    path.write_text("sentence\tlabel\ngood film\tpos\nbad film\tneg\nfine\tpos\n")
    d = build(DataConfig(train=str(path), eval=str(path)), bert_tok)
    assert d.label_names == ["neg", "pos"] and d.train["labels"] == [1, 0, 1] == d.eval["labels"]
    batch = collator("classification", bert_tok)([d.train[i] for i in range(3)])
    assert batch["labels"].tolist() == [1, 0, 1]
