"""Preference pairs for `data.task: preference`: rows with a prompt and a chosen and a rejected answer, in TRL's
column names and formats, tokenized as two rows that share the prompt, with labels on the answer tokens only.

A row is one of (TRL's dataset formats):

- standard, explicit prompt: `prompt`, `chosen`, `rejected` are text. The prompt is tokenized as a causal-LM prompt
  (with the tokenizer's special tokens), each answer after it with the end-of-sequence token appended.
- conversational, explicit prompt: `prompt` is a list of messages, `chosen` and `rejected` lists of assistant
  messages; the chat template renders prompt + answer (sidetune.chat), and the labels are the answer's tokens (the
  assistant turns after the prompt, with their end-of-turn marker).
- implicit prompt (no `prompt` column): `chosen` and `rejected` are whole conversations (or texts) that begin
  alike; the shared beginning is the prompt (messages: the common leading messages; text: the common leading
  characters, as TRL's extract_prompt cuts it).

Truncation to `data.max_length`: the prompt is kept and the answers are cut at the end; a prompt longer than half
of max_length keeps only its last tokens (its end is what the answer continues), so every answer keeps at least
half the row. How many pairs were cut is printed once per split.

Every bad row (a missing or empty prompt or answer, chosen equal to rejected, a value that is neither text nor a
list of messages) is named on its own `sidetune: error:` line, all of them before anything is written.
"""

from __future__ import annotations

from typing import Any

import datasets

from sidetune import chat
from sidetune.errors import SidetuneError

COLUMNS = ("prompt", "chosen", "rejected")
# Bad rows named before the run stops (each on its own line); the rest are counted.
MAX_NAMED = 20


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) or (isinstance(v, str) and v.lstrip().startswith("[{"))


def _text_prefix(a: str, b: str) -> str:
    """TRL's implicit prompt of two texts: their common leading characters, less a space it would end on."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if 0 < n < min(len(a), len(b)) and a[n - 1] == " ":
        n -= 1
    return a[:n]


class _Bad(Exception):
    pass


def parse_row(row: dict[str, Any], where: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of one row, as three texts or three lists of {role, content} messages (the
    answers then hold the answer turns only); _Bad with the reason and its fix otherwise."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    explicit = "prompt" in row
    prompt = row.get("prompt")
    for name, v in (("chosen", chosen), ("rejected", rejected)) + ((("prompt", prompt),) if explicit else ()):
        if v is None or (isinstance(v, (str, list)) and not (v.strip() if isinstance(v, str) else v)):
            what = "prompt" if name == "prompt" else f"{name} answer"
            raise _Bad(f"{where} has an empty or missing {what} (column {name!r}); fill or drop that row")
        if not isinstance(v, (str, list)):
            raise _Bad(f"{where}: column {name!r} holds a {type(v).__name__} ({str(v)[:40]!r}); it must be text or a "
                       f"list of {{role, content}} messages")
    kinds = {_is_messages(v) for v in ((prompt,) if explicit else ()) + (chosen, rejected)}
    if len(kinds) > 1:
        raise _Bad(f"{where} mixes text and lists of messages across prompt / chosen / rejected; write the row in "
                   f"one format")
    if kinds == {False}:
        if not explicit:
            prompt = _text_prefix(chosen, rejected)
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
            if not prompt.strip():
                raise _Bad(f"{where} has no prompt column and its chosen and rejected texts share no beginning; add "
                           f"a 'prompt' column")
            if not chosen.strip() or not rejected.strip():
                raise _Bad(f"{where}: with the shared beginning as the prompt, an answer is empty; fill or drop "
                           f"that row")
        if chosen == rejected:
            raise _Bad(f"{where}: the chosen and the rejected answer are the same text, which teaches nothing; drop "
                       f"that row or fix one of them")
        return prompt, chosen, rejected
    try:
        chosen, rejected = chat.normalize(chosen, where), chat.normalize(rejected, where)
        prompt = chat.normalize(prompt, where) if explicit else None
    except SidetuneError as e:
        raise _Bad(str(e)) from None
    if prompt is None:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise _Bad(f"{where} has no prompt column and its chosen and rejected conversations share no first "
                       f"message; add a 'prompt' column or start both with the same messages")
    if chosen == rejected:
        raise _Bad(f"{where}: the chosen and the rejected answer are the same messages, which teaches nothing; drop "
                   f"that row or fix one of them")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or not any(m["role"] == "assistant" for m in answer):
            raise _Bad(f"{where}: the {name} answer has no assistant message after the prompt; give it as "
                       f"[{{\"role\": \"assistant\", \"content\": ...}}]")
    return prompt, chosen, rejected


def check_rows(rows: datasets.Dataset, key: str) -> list[tuple[Any, Any, Any]]:
    """Every row parsed, or one SidetuneError naming each bad row on a line of its own."""
    missing = [c for c in ("chosen", "rejected") if c not in rows.column_names]
    if missing:
        raise SidetuneError(f"{key} has no column {missing[0]!r}; preference rows need 'chosen' and 'rejected' (and "
                            f"'prompt', unless the answers are whole conversations that begin alike); its columns "
                            f"are {', '.join(rows.column_names)}")
    columns = [c for c in COLUMNS if c in rows.column_names]
    parsed, bad = [], []
    for i, row in enumerate(rows.select_columns(columns)):
        try:
            parsed.append(parse_row(row, f"{key} row {i + 1}"))
        except _Bad as e:
            bad.append(str(e))
    if bad:
        lines = bad[:MAX_NAMED] + ([f"{key}: {len(bad) - MAX_NAMED} more bad rows"] if len(bad) > MAX_NAMED else [])
        # The CLI prints "sidetune: error: " before the message: one such line per bad row.
        raise SidetuneError("\nsidetune: error: ".join(lines))
    return parsed


def _tokens(tokenizer, prompt, answer) -> tuple[list[int], list[int], int]:
    """(prompt + answer token ids, their labels, the prompt's length), untruncated."""
    if isinstance(prompt, str):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + eos
        return p + a, [-100] * len(p) + a, len(p)
    ids, labels = chat.encode(tokenizer, prompt + answer, 1 << 30)
    # The answer's assistant turns carry the loss (sidetune.chat); the prompt's own tokens none, even when it holds
    # earlier assistant turns.
    n = min(len(chat.prompt_ids(tokenizer, prompt)), len(ids))
    return ids, [-100] * n + labels[n:], n


def _truncate(ids: list[int], labels: list[int], n_prompt: int,
              max_length: int) -> tuple[list[int], list[int], bool]:
    """(ids, labels, prompt cut): the prompt kept (only its last max_length // 2 tokens when longer
    than that and the row does not fit), the answer cut at the end."""
    start, cut_prompt = 0, False
    if len(ids) > max_length and n_prompt > max_length // 2:
        keep = max(max_length // 2, max_length - (len(ids) - n_prompt))
        start, cut_prompt = n_prompt - keep, True
    return ids[start:start + max_length], labels[start:start + max_length], cut_prompt


def tokenize(cfg, tokenizer, rows: datasets.Dataset, key: str, offset: int = 0) -> datasets.Dataset:
    """Preference rows -> chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels and pair_index
    (`offset` + the row's position: train and eval pairs get distinct indices into one reference table)."""
    parsed = check_rows(rows, key)
    conversational = any(isinstance(p, list) for p, _, _ in parsed)
    if conversational:
        chat.use_template(tokenizer, cfg, getattr(tokenizer, "name_or_path", ""))
    out: dict[str, list] = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [],
                            "rejected_labels": [], "pair_index": []}
    cut, cut_prompts = 0, 0
    for i, (prompt, chosen, rejected) in enumerate(parsed):
        any_cut = any_prompt = False
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, labels, n_prompt = _tokens(tokenizer, prompt, answer)
            full = len(ids)
            ids, labels, cut_p = _truncate(ids, labels, n_prompt, cfg.max_length)
            cut_a = len(ids) < full
            if not any(t != -100 for t in labels[1:]):
                raise SidetuneError(f"{key} row {i + 1}: no token of the {name} answer fits in data.max_length="
                                    f"{cfg.max_length}; raise data.max_length or shorten the prompt")
            any_cut, any_prompt = any_cut or cut_a or cut_p, any_prompt or cut_p
            out[f"{name}_input_ids"].append(ids)
            out[f"{name}_labels"].append(labels)
        out["pair_index"].append(offset + i)
        cut, cut_prompts = cut + any_cut, cut_prompts + any_prompt
    if cut:
        print(f"sidetune: {key}: {cut} of {len(parsed)} pairs are longer than data.max_length={cfg.max_length}: "
              f"answers truncated at the end" + (f", and in {cut_prompts} the prompt's start cut to its last "
                                                 f"{cfg.max_length // 2} tokens" if cut_prompts else "")
              + "; raise data.max_length to keep them whole", flush=True)
    return datasets.Dataset.from_dict(out)
