"""Datasets for the three tasks, built on `datasets`: load local files (or hub names when online), tokenize with
truncation, and pad per batch.

- classification: `text_field` (+ `text_pair_field`) -> integer label.
- causal_lm: plain text (loss on every token), or `prompt_template` -> `completion_template` with the loss on the
  completion only. With `label_names`, evaluation also scores each label's completion and reports accuracy.
- seq2seq: source text -> target text (`text_field` -> `target_field`, or the two templates).
- preference: prompt / chosen / rejected rows, tokenized as pairs (sidetune.pairs).

`data.packing` (causal_lm, chat) then packs the tokenized training examples into rows of up to max_length tokens
(`pack`); the collator pads those rows without an attention mask (`tasks.Task.collator`).
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from sidetune import chat, formats, pairs
from sidetune.config import DataConfig
from sidetune.errors import SidetuneError, one_line
from sidetune.tasks import Task, get_task

ASSETS = Path(__file__).parent / "assets"
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class TaskData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    # causal_lm with label_names: one row per (example, choice) for scoring; see choice_rows().
    eval_choices: datasets.Dataset | None
    num_labels: int | None
    label_names: list[str] | None


# ---------------------------------------------------------------------------------------------------------------------
# Raw rows


def resolve_data(spec: str) -> Path | None:
    """A local file for `spec` (relative to the working dir, then to sidetune's bundled data), or None."""
    path = Path(spec).expanduser()
    for candidate in (path, ASSETS / spec):
        if candidate.is_file():
            return candidate
    return None


# Files at least this big get a line per phase (reading, tokenizing) on stderr, beside the progress bars (stdout may be
# JSON: `sidetune eval`); datasets' own bars are off in the CLI.
BIG_FILE = 1 << 20


def _tsv_options(path: Path, key: str, spec: str) -> dict[str, Any]:
    """How to read a .tsv the way it was written. GLUE-style files quote nothing (their sentences hold bare quote
    characters); Python's csv module (and pandas) quote a field holding a quote, a tab or a newline, doubling the
    quotes inside. A file is read as quoted when csv's strict parser reads every record with the header's number of
    fields and that differs from the unquoted reading; else unquoted, as GLUE writes it. Two streaming passes: a
    large file is never held in memory."""
    def lines(f):  # GLUE's reading: a non-empty line is a row
        return (line.rstrip("\r\n") for line in f if line.rstrip("\r\n"))

    width, bad, quotes = None, None, False
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(raw.rstrip("\r\n") for raw in f):
            if not line:
                continue
            fields = line.count("\t") + 1
            width = fields if width is None else width
            quotes = quotes or '"' in line
            if bad is None and fields != width:
                bad = (n + 1, fields)
    if width is None:
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}  # empty: load_rows says it holds no rows
    if quotes:
        with path.open(newline="", encoding="utf-8", errors="replace") as f, \
                path.open(newline="", encoding="utf-8", errors="replace") as g:
            plain, same, fits = (line.split("\t") for line in lines(g)), True, True
            try:
                for record in csv.reader(f, delimiter="\t", strict=True):
                    if not record:
                        continue
                    if len(record) != width:
                        fits = False
                        break
                    # Once a record differs (a quoted field), the line-wise reading is out of step: stop comparing.
                    same = same and record == next(plain, None)
            except csv.Error:
                fits = False
        if fits and not same:
            return {"delimiter": "\t"}  # pandas' default quoting is csv's: QUOTE_MINIMAL, doubled quotes
    if bad is not None:
        raise SidetuneError(f"{key}={spec!r}: line {bad[0]} has {bad[1]} tab-separated fields and the header "
                            f"{width}; a tab or newline inside a field needs csv quoting (write the file with "
                            f"Python's csv module or pandas), or remove it")
    return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}


def load_rows(spec: str, key: str, text_column: str | None = None) -> datasets.Dataset:
    """Rows from a local file, or from the hub as `name[:config][:split]` when online.

    text_column: where a .txt file's lines go (one example per line): only plain causal_lm text reads .txt, and any
    other caller gets one line saying so instead of a one-column table named `text`."""
    path = resolve_data(spec)
    if path is not None:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise SidetuneError(f"{key}={spec!r} has an unknown format; use {', '.join(FORMATS)}")
        if fmt == "text" and text_column is None:
            raise SidetuneError(f"{key}={spec!r}: a .txt file is plain text, one example per line, which only "
                                f"data.task=causal_lm without templates or data.format reads; for rows with columns "
                                f"use a .csv, .tsv, .jsonl or .parquet file with a header")
        kwargs: dict[str, Any] = {}
        if path.suffix.lower() == ".tsv":
            kwargs = _tsv_options(path, key, spec)
        size = path.stat().st_size
        if size >= BIG_FILE:
            print(f"sidetune: {key}: reading {path} ({size / 2**20:,.0f} MiB)", file=sys.stderr, flush=True)
        level = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a parse failure is reported once, below
        try:
            rows = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
        except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
            if "corresponds to no data" not in str(e):  # what datasets says of a header-only csv/tsv
                cause = e.__cause__ or e  # DatasetGenerationError wraps the parser's own error
                raise SidetuneError(f"{key}={spec!r} could not be read as {fmt}: "
                                    f"{one_line(cause)}") from None
            rows = None
        finally:
            datasets.logging.set_verbosity(level)
        if rows is None or len(rows) == 0:
            raise SidetuneError(f"{key}={spec!r} holds no rows; point it at a file with data")
        if fmt == "text" and text_column != "text":
            rows = rows.rename_column("text", text_column)
        if size >= BIG_FILE:
            print(f"sidetune: {key}: {len(rows):,} rows; checking labels and text", file=sys.stderr, flush=True)
        return rows
    looks_local = Path(spec).suffix.lower() in FORMATS or spec.startswith((".", "/", "~"))
    if looks_local or os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SidetuneError(f"{key}={spec!r}: no such data file; give a csv/tsv/json/jsonl/parquet path "
                            f"(bundled: {', '.join(sorted(str(p.relative_to(ASSETS)) for p in ASSETS.rglob('*.tsv')))})")
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:
        raise SidetuneError(f"{key}={spec!r} could not be loaded from the hub: {one_line(e)}") from None


def _require_columns(rows: datasets.Dataset, columns: list[str], key: str, cfg: DataConfig | None = None) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing and cfg is not None and cfg.task != "chat" and cfg.messages_field in rows.column_names:
        raise SidetuneError(f"{key} has no column {missing[0]!r} but a {cfg.messages_field!r} column of "
                            f"conversations; for those set data.task=chat")
    if missing:
        raise SidetuneError(f"{key} has no column {missing[0]!r}; its columns are {', '.join(rows.column_names)} "
                            f"(set data.text_field / data.label_field / data.target_field)")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization per task


def build(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> TaskData:
    task = get_task(cfg.task)
    _check_max_length(cfg, tokenizer)
    plain_text = task.shift_labels and not task.conversational and not (
        cfg.prompt_template or cfg.completion_template or cfg.format)
    text_column = cfg.text_field if plain_text else None  # a .txt file's lines: plain causal-LM text only
    all_train = load_rows(cfg.train, "data.train", text_column)
    train_rows = all_train
    if cfg.max_train_samples is not None:
        train_rows = train_rows.shuffle(seed=seed).select(range(min(cfg.max_train_samples, len(train_rows))))
    eval_rows = load_rows(cfg.eval, "data.eval", text_column) if cfg.eval else None
    if eval_rows is not None and cfg.max_eval_samples is not None:
        eval_rows = eval_rows.select(range(min(cfg.max_eval_samples, len(eval_rows))))

    if task.conversational:
        return _packed(cfg, _build_chat(cfg, tokenizer, train_rows, eval_rows), seed)
    if task.pairs:  # preference pairs (sidetune.pairs): every bad row named, eval indices after the train ones
        train = pairs.tokenize(cfg, tokenizer, train_rows, "data.train")
        return TaskData(train, pairs.tokenize(cfg, tokenizer, eval_rows, "data.eval", offset=len(train))
                        if eval_rows is not None else None, None, None, None)

    encode = _encode_classification if task.classifies else _encode_seq2seq if task.seq2seq else _encode_causal_lm
    columns = _needed_columns(cfg, task)
    _require_columns(train_rows, columns, "data.train", cfg)
    if eval_rows is not None:
        _require_columns(eval_rows, columns, "data.eval", cfg)

    label_names = cfg.label_names
    num_labels = None
    if task.classifies or cfg.label_names is not None:
        # Classes come from the whole training file, so that a row named in an error is the file's own row.
        label_names, num_labels, to_id = _label_mapping(cfg, all_train, task.classifies)
        if eval_rows is not None:
            train_ints = all(isinstance(v, int) for v in _label_values(all_train, cfg.label_field, "data.train"))
            _check_eval_labels(eval_rows, cfg.label_field, label_names, num_labels, train_ints)
        if task.classifies and cfg.label_names is None:  # classes read from the data: show them (a stray one too)
            _say_classes(all_train, cfg.label_field, label_names, to_id)
        cfg.label_names = label_names  # kept with the run (saved config): reloads and evals map labels the same way
        train_rows = _relabel(train_rows, cfg.label_field, to_id)
        if eval_rows is not None:
            eval_rows = _relabel(eval_rows, cfg.label_field, to_id)

    text_columns = [c for c in columns if c != cfg.label_field]
    plain_lm = task.shift_labels
    _check_text(train_rows, text_columns, "data.train", plain_lm)
    if eval_rows is not None:
        _check_text(eval_rows, text_columns, "data.eval", plain_lm)

    def tokenize(rows: datasets.Dataset, key: str) -> datasets.Dataset:
        if len(rows) >= BIG_ROWS:
            print(f"sidetune: {key}: tokenizing {len(rows):,} rows", file=sys.stderr, flush=True)
        return rows.map(lambda batch: encode(cfg, tokenizer, batch, label_names), batched=True,
                        remove_columns=rows.column_names, desc="tokenizing")

    choices = None
    if task.shift_labels and label_names and eval_rows is not None:
        choices = eval_rows.map(lambda batch, idx: choice_rows(cfg, tokenizer, batch, label_names, idx), batched=True,
                                remove_columns=eval_rows.column_names, desc="building choices", with_indices=True)
    return _packed(cfg, TaskData(tokenize(train_rows, "data.train"),
                                 tokenize(eval_rows, "data.eval") if eval_rows is not None else None,
                                 choices, num_labels, label_names), seed)


# Tokenizing at least this many rows gets a line first (a 150k-row file takes tens of seconds).
BIG_ROWS = 20_000


def _say_classes(rows: datasets.Dataset, field: str, names: list[str], to_id) -> None:
    """One line with the classes and how many training rows each has, so that a surprising class is seen."""
    counts = [0] * len(names)
    for v in rows[field]:
        counts[to_id(v if not isinstance(v, float) else int(v))] += 1
    shown = ", ".join(f"{n} ({c:,})" for n, c in list(zip(names, counts))[:8])
    print(f"sidetune: data.train: {len(names)} classes (rows in the file): {shown}" + (", ..." if len(names) > 8 else ""), flush=True)


def _build_chat(cfg: DataConfig, tokenizer, train_rows: datasets.Dataset,
                eval_rows: datasets.Dataset | None) -> TaskData:
    """data.task=chat: conversations rendered with the chat template, the loss on assistant turns (sidetune.chat)."""
    chat.use_template(tokenizer, cfg, getattr(tokenizer, "name_or_path", ""))
    return TaskData(chat.tokenize(cfg, tokenizer, train_rows, "data.train"),
                    chat.tokenize(cfg, tokenizer, eval_rows, "data.eval") if eval_rows is not None else None,
                    None, None, None)


def _packed(cfg: DataConfig, data: TaskData, seed: int) -> TaskData:
    """With data.packing, the training rows packed (eval rows stay one example each: per-row scores and choices)."""
    if cfg.packing:
        n = len(data.train)
        data.train = pack(data.train, cfg.max_length, seed)
        tokens = sum(len(ids) for ids in data.train["input_ids"])
        print(f"sidetune: data.packing: {n} training examples in {len(data.train)} rows of up to {cfg.max_length} "
              f"tokens ({tokens / (len(data.train) * cfg.max_length):.0%} full)")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Sequence packing


def pack(examples: datasets.Dataset, max_length: int, seed: int) -> datasets.Dataset:
    """Tokenized causal-LM examples packed into rows of at most `max_length` tokens, with no cross-example attention.

    A row holds input_ids, labels and position_ids and no attention mask: position ids restart at 0 for every
    example, and transformers (masking_utils.find_packed_sequence_indices, when there is no attention mask and no
    cache) turns that into a block-diagonal causal mask, so each example attends to itself only; LST's side network
    reads the same position ids. The rows are built by transformers' DataCollatorWithFlattening, which also sets
    each example's first label to -100: the loss shifts labels inside the row, and the previous example's last token
    must not be scored against the next example's first. The loss per example is then the unpacked one.

    Bins: first-fit over the examples in a seeded order (each goes into the first row with room for it). An example
    of one token is left out: it has no next token to learn, and the collator pads a row with position 0, so a real
    example always ends on a nonzero position (what `tasks.batch_tokens` counts by).
    """
    import numpy as np
    from transformers import DataCollatorWithFlattening

    ids, labels = list(examples["input_ids"]), list(examples["labels"])  # read once: row access decodes each time
    order = [i for i in np.random.default_rng(seed).permutation(len(ids)).tolist() if len(ids[i]) >= 2]
    if not order:
        raise SidetuneError("data.packing=true: every training example is a single token, with nothing to learn; "
                            "check data.train and data.max_length")
    flatten = DataCollatorWithFlattening(return_tensors="np")
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in _first_fit([len(ids[i]) for i in order], max_length):
        row = flatten([{"input_ids": ids[order[j]], "labels": labels[order[j]]} for j in members])
        for key in rows:
            rows[key].append(row[key][0].tolist())
    return datasets.Dataset.from_dict(rows)


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit bin packing: item i goes into the lowest-numbered bin with room for it. A max-tree over the bins'
    free space finds that bin in O(log n), so packing a large corpus stays fast."""
    size = 1
    while size < len(lengths):
        size *= 2
    # free[size + b]: bin b's free space (an unopened bin has all of it); free[node]: the most under that node.
    free = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        node = 1
        while node < size:  # descend to the leftmost bin with room (the root always has room: n <= capacity)
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= n
        while node > 1:
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return bins


def _relabel(rows: datasets.Dataset, field: str, to_id) -> datasets.Dataset:
    """Labels to class ids, in a fresh integer column: mapped in place, a string column would keep its string type
    ("1"), which the collator cannot turn into a tensor."""
    ids = rows.map(lambda r: {"_sidetune_label": to_id(r[field])}, remove_columns=[field])
    return ids.rename_column("_sidetune_label", field)


def _check_max_length(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    # A tokenizer cannot truncate below its own special tokens: it would warn and silently keep the full text.
    special = tokenizer.num_special_tokens_to_add(pair=bool(cfg.text_pair_field))
    if cfg.max_length <= special:
        raise SidetuneError(f"data.max_length={cfg.max_length} leaves no room for text: this tokenizer adds {special} "
                            f"special tokens; use data.max_length >= {special + 1}")


def _needed_columns(cfg: DataConfig, task: Task) -> list[str]:
    if task.classifies:
        return [cfg.text_field, cfg.label_field] + ([cfg.text_pair_field] if cfg.text_pair_field else [])
    if cfg.format is not None:
        return formats.columns(cfg.format)
    if cfg.prompt_template or cfg.completion_template:
        return []  # the templates name their own columns; a missing one is reported by _render
    return [cfg.text_field] + ([cfg.target_field] if task.seq2seq else [])


def _label_mapping(cfg: DataConfig, rows: datasets.Dataset, classifies: bool = True):
    """Class names, the class count, and value -> class id, from the training labels (and data.num_labels /
    data.label_names); one line, naming the row, for a missing, fractional, stray or out-of-range label, a label
    column that holds free text, and training data with fewer than two classes."""
    _require_columns(rows, [cfg.label_field], "data.train")
    field = cfg.label_field
    values = _label_values(rows, field, "data.train")
    ints = [v for v in values if isinstance(v, int)]
    names_seen = [v for v in values if isinstance(v, str)]
    if ints and names_seen:  # a JSON file mixing 1 and "pos"
        raise SidetuneError(f"data.train: label {ints[0]!r} ({_row(rows, field, ints[0])}) in column {field!r} is a "
                            f"number among names ({_some(names_seen)}); write every label as a name, or every one "
                            f"as a class id")
    if classifies and len(values) < 2:
        raise SidetuneError(f"data.train: every row has the label {values[0]!r} in column {field!r}, and "
                            f"classification needs at least two classes; check data.label_field, or train on more "
                            f"rows (data.max_train_samples)")
    if not names_seen:
        if min(values) < 0:
            raise SidetuneError(f"data.train: label {min(values)} ({_row(rows, field, min(values))}) in column "
                                f"{field!r} is negative; class ids run from 0 to num_labels - 1")
        num = cfg.num_labels or (max(values) + 1)
        if max(values) >= num:
            raise SidetuneError(f"data.train: label {max(values)} ({_row(rows, field, max(values))}) in column "
                                f"{field!r} is out of range for data.num_labels={num} (ids 0..{num - 1}); raise "
                                f"data.num_labels or fix the labels")
        names = cfg.label_names or [str(i) for i in range(num)]
        if len(names) < num:
            raise SidetuneError(f"data.label_names has {len(names)} names but there are {num} classes "
                                f"(label {max(values)} is in {_row(rows, field, max(values))}); give one name per "
                                f"class")
        _check_not_free_text(cfg, rows, num)

        def to_id(v):
            return int(v)
    else:
        names = cfg.label_names or sorted(str(v) for v in values)
        index = {n: i for i, n in enumerate(names)}
        unknown = [v for v in values if str(v) not in index]
        if unknown:
            raise SidetuneError(f"data.train: label {unknown[0]!r} ({_row(rows, field, unknown[0])}) in column "
                                f"{field!r} is not in data.label_names={names}; fix that row or add the name")
        _check_stray_names(rows, field, names_seen)
        _check_not_free_text(cfg, rows, len(values))
        num = cfg.num_labels or len(names)
        if len(names) > num:
            raise SidetuneError(f"data.num_labels={num} but the training labels name {len(names)} classes "
                                f"({_some(names)}); raise data.num_labels or drop it")

        def to_id(v):
            return index[str(v)]
    return names, num, to_id


def _row(rows: datasets.Dataset, field: str, value) -> str:
    """'row N': the first row (1-based, in the order read) whose label is `value`."""
    for i, v in enumerate(rows[field]):
        if v == value or str(v).strip() == str(value) or (isinstance(v, float) and v == v and v == value):
            return f"row {i + 1}"
    return "a row"


def _some(names: list, n: int = 5) -> str:
    return ", ".join(map(str, names[:n])) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_stray_names(rows: datasets.Dataset, field: str, names: list[str]) -> None:
    """String labels that are one set of names: no number among names (a stray `1` in a pos/neg column), and no two
    spellings of one name (`Neutral` beside `neutral`), each of which would silently become a class of its own."""
    numeric = [n for n in names if n.strip().lstrip("+-").isdigit()]
    if numeric and len(numeric) < len(names):
        stray = numeric[0]
        raise SidetuneError(f"data.train: label {stray!r} ({_row(rows, field, stray)}) in column {field!r} is a "
                            f"number among names ({_some([n for n in names if n not in numeric])}); write it as one "
                            f"of the names (or every label as a class id)")
    seen: dict[str, str] = {}
    for name in names:
        key = " ".join(name.split()).casefold()
        if key in seen:
            raise SidetuneError(f"data.train: labels {seen[key]!r} ({_row(rows, field, seen[key])}) and {name!r} "
                                f"({_row(rows, field, name)}) in column {field!r} differ only in case or spaces and "
                                f"would be two classes; write one spelling")
        seen[key] = name


# A label column with at least this many classes, more than half the rows' count, reads as free text.
FREE_TEXT_MIN_CLASSES = 20


def _check_not_free_text(cfg: DataConfig, rows: datasets.Dataset, classes: int) -> None:
    """A label column where most rows have a label of their own (a text or id column named as data.label_field)
    would train a head with a class per row. Declared classes (data.label_names / data.num_labels) are trusted."""
    if cfg.label_names is not None or cfg.num_labels is not None:
        return
    if classes >= FREE_TEXT_MIN_CLASSES and classes > len(rows) / 2:
        raise SidetuneError(f"data.train: column {cfg.label_field!r} has {classes} different labels in {len(rows)} "
                            f"rows, which looks like free text or ids, not classes; set data.label_field to the "
                            f"column with the class (or, if these are classes, list them in data.label_names)")


def _label_values(rows: datasets.Dataset, field: str, key: str) -> list:
    """The distinct labels of a column: ints (integer-valued floats count as ints) or strings, never empty."""
    try:
        values = rows.unique(field)
    except Exception:  # a column of mixed types (JSON: 1 beside "pos") that datasets keeps as JSON: no unique()
        distinct: dict[str, Any] = {}
        for v in rows[field]:
            distinct.setdefault(repr(v), v)
        values = list(distinct.values())
    out = []
    for v in values:
        if v is None or (isinstance(v, str) and not v.strip()):
            raise SidetuneError(f"{key}: {_row(rows, field, v) if v is not None else _none_row(rows, field)} has no "
                                f"label in column {field!r}; fill or drop that row")
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, float):
            if not (v == v and v.is_integer()):
                raise SidetuneError(f"{key}: label {v!r} ({_row(rows, field, v)}) in column {field!r} is not a class "
                                    f"id; classification needs integer ids or string names (regression targets are "
                                    f"not supported)")
            v = int(v)
        if not isinstance(v, (int, str)):
            raise SidetuneError(f"{key}: label {v!r} in column {field!r} is a {type(v).__name__}; use integer ids "
                                f"or string names")
        out.append(v)
    return sorted(set(out), key=str)


def _none_row(rows: datasets.Dataset, field: str) -> str:
    return next((f"row {i + 1}" for i, v in enumerate(rows[field]) if v is None), "a row")


def _check_eval_labels(rows: datasets.Dataset, field: str, names: list[str], num: int, train_ints: bool) -> None:
    """Eval labels must be classes the model has: ids in range, or names seen in training; the first that is not is
    named with its row."""
    _require_columns(rows, [field], "data.eval")
    for v in _label_values(rows, field, "data.eval"):
        where = _row(rows, field, v)
        if train_ints and not isinstance(v, int):
            raise SidetuneError(f"data.eval: label {v!r} ({where}) in column {field!r} is a name but the training "
                                f"labels are integer ids 0..{num - 1}; use the same kind of labels in both files")
        if isinstance(v, int) and train_ints and not 0 <= v < num:
            raise SidetuneError(f"data.eval: label {v} ({where}) in column {field!r} is outside the training classes "
                                f"0..{num - 1}; fix the eval labels or raise data.num_labels")
        if not train_ints and str(v) not in names:
            raise SidetuneError(f"data.eval: label {v!r} ({where}) in column {field!r} is not among the training "
                                f"labels ({_some(names, 8)}); fix the eval file or list every class in "
                                f"data.label_names")


def _check_text(rows: datasets.Dataset, columns: list[str], key: str, allow_empty: bool = False) -> None:
    """Text columns hold text in every row: an empty or missing cell would train on nothing (a plain-text LM corpus
    may have empty lines: `allow_empty`)."""
    for col in columns:
        for i, v in enumerate(rows[col]):
            if isinstance(v, list) and v and all(isinstance(m, dict) for m in v):
                raise SidetuneError(f"{key}: column {col!r} holds conversations (lists of messages), not text; "
                                    f"train on them with data.task=chat (data.messages_field={col})")
            if not isinstance(v, str):
                what = "empty" if v is None else f"a {type(v).__name__} ({v!r}), not text"
                raise SidetuneError(f"{key}: row {i + 1} of column {col!r} is {what}; fill or drop that row")
            if not allow_empty and not v.strip():
                raise SidetuneError(f"{key}: row {i + 1} of column {col!r} is empty; fill or drop that row")


def _rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*batch.values())]


def _render(template: str, row: dict[str, Any], label_names: list[str] | None, label_field: str) -> str:
    if label_names is not None and label_field in row:
        row = {**row, "label_name": label_names[int(row[label_field])]}
    try:
        return template.format(**row)
    except KeyError as e:
        raise SidetuneError(f"template {template!r} names column {e.args[0]!r}, which the data does not have; "
                            f"columns: {', '.join(row)}") from None


def _encode_classification(cfg, tok, batch, label_names):
    pair = batch[cfg.text_pair_field] if cfg.text_pair_field else None
    enc = tok(batch[cfg.text_field], pair, truncation=True, max_length=cfg.max_length)
    enc["labels"] = batch[cfg.label_field]
    return enc


def _prompt_completion(cfg, batch, label_names) -> tuple[list[str], list[str]] | None:
    if cfg.format is not None:  # a named format (sidetune.formats)
        return formats.pairs(cfg.format, _rows(batch))
    if not (cfg.prompt_template or cfg.completion_template):
        return None
    rows = _rows(batch)
    prompts = [_render(cfg.prompt_template or "", r, label_names, cfg.label_field) for r in rows]
    completions = [_render(cfg.completion_template or "", r, label_names, cfg.label_field) for r in rows]
    return prompts, completions


def _join(tok, prompt_ids: list[int], completion_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """prompt + completion, truncating the prompt from the left so the completion (what is learnt) survives."""
    completion_ids = completion_ids[:max_length]
    keep = max_length - len(completion_ids)
    prompt_ids = prompt_ids[-keep:] if keep > 0 else []
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def _encode_causal_lm(cfg, tok, batch, label_names):
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    pc = _prompt_completion(cfg, batch, label_names)
    if pc is None:  # plain text: learn every token
        enc = tok([t + (tok.eos_token or "") for t in batch[cfg.text_field]], truncation=True,
                  max_length=cfg.max_length)
        enc["labels"] = [list(ids) for ids in enc["input_ids"]]
        return enc
    prompts, completions = pc
    p_ids = tok(prompts)["input_ids"]
    c_ids = tok(completions, add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for p, c in zip(p_ids, c_ids):
        ids, labels = _join(tok, p, c + eos, cfg.max_length)
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def _encode_seq2seq(cfg, tok, batch, label_names):
    pc = _prompt_completion(cfg, batch, label_names)
    sources, targets = pc if pc is not None else (batch[cfg.text_field], batch[cfg.target_field])
    enc = tok(sources, truncation=True, max_length=cfg.max_length)
    enc["labels"] = tok(text_target=targets, truncation=True, max_length=cfg.max_length)["input_ids"]
    return enc


def choice_rows(cfg, tok, batch, label_names, indices):
    """For scoring causal-LM classification: one row per (example, label name) with the loss on that completion."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "example": [], "choice": [],
                            "gold": []}
    for idx, row in zip(indices, _rows(batch)):
        prompt = tok(_render(cfg.prompt_template or "", row, label_names, cfg.label_field))["input_ids"]
        for choice in range(len(label_names)):
            completion = _render(cfg.completion_template or " {label_name}", {**row, cfg.label_field: choice},
                                 label_names, cfg.label_field)
            ids, labels = _join(tok, prompt, tok(completion, add_special_tokens=False)["input_ids"] + eos,
                                cfg.max_length)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
            out["example"].append(idx)
            out["choice"].append(choice)
            out["gold"].append(int(row[cfg.label_field]))
    return out


def collator(task: str | Task, tokenizer: PreTrainedTokenizerBase):
    """Dynamic padding per batch (see Task.collator)."""
    return get_task(task).collator(tokenizer)
