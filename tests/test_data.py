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


def test_a_tsv_written_by_pythons_csv_module_reads_as_written(bert_tok, tmp_path):
    import csv

    texts = ['he said "hi"', "two\nlines", "a\ttab", "plain"]
    path = tmp_path / "py.tsv"
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["sentence", "label"])
        w.writerows([t, i % 2] for i, t in enumerate(texts))
    assert '"he said ""hi"""' in path.read_text()  # what csv wrote: quoted, the inner quotes doubled
    d = build(DataConfig(train=str(path), eval=None, max_length=32), bert_tok)
    assert d.train["labels"] == [0, 1, 0, 1]
    assert [bert_tok.decode(ids, skip_special_tokens=True) for ids in d.train["input_ids"]] == [
        bert_tok.decode(bert_tok(t)["input_ids"], skip_special_tokens=True) for t in texts]


def test_a_glue_tsv_keeps_its_bare_quotes(bert_tok, tmp_path):
    rows = ['" the movie starts', '"good" film', 'a "b" c', '"whole"x']
    path = tmp_path / "glue.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(rows)))
    d = build(DataConfig(train=str(path), eval=None, max_length=32), bert_tok)
    assert [bert_tok.decode(ids, skip_special_tokens=True) for ids in d.train["input_ids"]] == [
        bert_tok.decode(bert_tok(t)["input_ids"], skip_special_tokens=True) for t in rows]
    assert d.train["labels"] == [0, 1, 0, 1]


def test_a_tab_inside_an_unquoted_field_is_named(bert_tok, tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("sentence\tlabel\ngood\t1\na\tb\t0\n")
    with pytest.raises(SidetuneError, match="line 3 has 3 tab-separated fields and the header 2"):
        build(DataConfig(train=str(path), eval=None), bert_tok)


def test_txt_is_plain_causal_lm_text_only(bert_tok, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world\nsecond line\n")
    d = build(DataConfig(task="causal_lm", train=str(path), eval=None), bert_tok)  # text_field: sentence
    assert [bert_tok.decode(ids, skip_special_tokens=True) for ids in d.train["input_ids"]] == ["hello world",
                                                                                                 "second line"]
    for cfg in (DataConfig(train=str(path), eval=None),
                DataConfig(task="causal_lm", train=str(path), eval=None, prompt_template="{sentence}")):
        with pytest.raises(SidetuneError, match=r"a \.txt file is plain text, one example per line"):
            build(cfg, bert_tok)


def _labels(tmp_path, name, labels, texts=None):
    path = tmp_path / name
    texts = texts or [f"text {i}" for i in range(len(labels))]
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    return str(path)


@pytest.mark.parametrize("labels,extra,message", [
    (["0", "0", "0"], {}, "every row has the label 0 in column 'label', and classification needs at least two classes"),
    (["pos", "pos"], {"num_labels": 2}, "needs at least two classes"),
    (["pos", "neg", "1", "neg"], {}, r"label '1' \(row 3\) in column 'label' is a number among names \(neg, pos\)"),
    (["neutral", "neg", "pos", "Neutral"], {}, r"labels 'Neutral' \(row 4\) and 'neutral' \(row 1\) .* differ only in case"),
    (["neg", "pos", "neutral"], {"label_names": ["neg", "pos"]}, r"label 'neutral' \(row 3\) .* not in data.label_names"),
    (["0", "1", "5"], {"label_names": ["a", "b"]}, r"label 5 is in row 3"),
    (["0", "1", "-1"], {}, r"label -1 \(row 3\) in column 'label' is negative"),
    (["0", "1", "0.5"], {}, r"label 0.5 \(row 3\)"),
    ([str(i) for i in range(30)], {}, "30 different labels in 30 rows, which looks like free text or ids"),
    ([f"word{i}" for i in range(40)] + ["word0"] * 10, {}, "40 different labels in 50 rows"),
])
def test_label_checks_name_the_row(bert_tok, tmp_path, labels, extra, message):
    with pytest.raises(SidetuneError, match=message):
        build(DataConfig(train=_labels(tmp_path, "t.tsv", labels), eval=None, **extra), bert_tok)


def test_declared_classes_allow_many_and_eval_labels_are_named_with_their_row(bert_tok, tmp_path, capsys):
    many = [str(i) for i in range(30)]
    d = build(DataConfig(train=_labels(tmp_path, "t.tsv", many), eval=None, num_labels=30), bert_tok)
    assert d.num_labels == 30  # declared: not free text
    train = _labels(tmp_path, "t.tsv", ["pos", "neg", "pos"])
    capsys.readouterr()
    build(DataConfig(train=train, eval=None), bert_tok)
    assert "sidetune: data.train: 2 classes (rows in the file): neg (1), pos (2)" in capsys.readouterr().out
    with pytest.raises(SidetuneError, match=r"data.eval: label 'Pos' \(row 2\) in column 'label' is not among"):
        build(DataConfig(train=train, eval=_labels(tmp_path, "e.tsv", ["neg", "Pos"])), bert_tok)
    ints = _labels(tmp_path, "i.tsv", ["0", "1"])
    with pytest.raises(SidetuneError, match=r"data.eval: label 2 \(row 3\) .* outside the training classes 0..1"):
        build(DataConfig(train=ints, eval=_labels(tmp_path, "e2.tsv", ["0", "1", "2"])), bert_tok)


def test_conversations_under_causal_lm_point_to_chat(bert_tok, tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(SidetuneError, match=r"has no column 'sentence' but a 'messages' column .* data\.task=chat"):
        build(DataConfig(task="causal_lm", train=path, eval=None), bert_tok)
    with pytest.raises(SidetuneError, match=r"holds conversations .* data\.task=chat"):
        build(DataConfig(task="causal_lm", train=path, eval=None, text_field="messages"), bert_tok)
