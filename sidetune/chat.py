"""Conversations for `data.task: chat`: rows holding a list of messages, rendered with the tokenizer's own chat
template, with the loss on the assistant turns only (every one of them in a multi-turn conversation).

A row's messages are OpenAI-style `{"role", "content"}` (system / user / assistant) or ShareGPT-style
`{"from", "value"}` (system / human / gpt); the column is `data.messages_field` and may also hold the list as a JSON
string (csv files).

Which tokens are the assistant's. Templates differ in what they wrap around a turn, so sidetune asks the template
itself rather than guessing markers:

- A template with `{% generation %}` blocks marks the assistant tokens for us (`return_assistant_tokens_mask`).
- Otherwise the conversation is rendered incrementally: for assistant message i, the text up to its start is
  `render(messages[:i], add_generation_prompt=True)` and the text up to its end is `render(messages[:i + 1])`.
  Both must be prefixes of the full rendering (templates that rewrite earlier turns are refused in one line), and the
  characters between them (less trailing whitespace) are the assistant's turn: its content and the template's
  end-of-turn marker (`<|im_end|>` in ChatML), so the model learns to stop. Tokens overlapping those character spans
  (tokenizer offsets) carry the loss; every other token is labelled -100.

Truncation keeps the start of a conversation (`data.max_length` tokens); a conversation left with no assistant
token is dropped from the data, with a note saying how many were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sidetune.errors import SidetuneError, one_line

# Role names accepted in a row -> the role the chat templates know.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant"}


# ---------------------------------------------------------------------------------------------------------------------
# The template


def resolve_template(value: str | None, key: str = "data.chat_template") -> str | None:
    """The Jinja text of a `data.chat_template` value: the file it names, or the value itself when it is a template."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if "{" not in value and len(value) < 4096 and path.is_file():
        return path.read_text()
    if "{%" in value or "{{" in value:
        return value
    raise SidetuneError(f"{key}={value!r} is neither a file nor a Jinja template; give a path to a .jinja file or "
                        f"the template text")


def use_template(tokenizer, data_cfg, model_name: str = "") -> Any:
    """Give `tokenizer` the run's chat template (`data.chat_template`, else its own); one line when it has none.
    A template read from a file is written back into `data_cfg`, so the saved run config carries its text."""
    template = resolve_template(data_cfg.chat_template)
    if template is not None:
        data_cfg.chat_template = template
        tokenizer.chat_template = template
    if not tokenizer.chat_template:
        name = f" of model.name={model_name}" if model_name else ""
        raise SidetuneError(f"data.task=chat needs a chat template, and the tokenizer{name} has none; set "
                            f"data.chat_template to a Jinja template (text or a .jinja file)")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Messages


def normalize(messages: Any, where: str) -> list[dict[str, str]]:
    """`[{"role", "content"}]` from OpenAI or ShareGPT messages (or their JSON string); one line on a bad row."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise SidetuneError(f"{where}: the messages are a string but not JSON ({one_line(e)})") from None
    if not isinstance(messages, list) or not messages:
        raise SidetuneError(f"{where}: messages must be a non-empty list of {{role, content}} (or {{from, value}}) "
                            f"objects, got {str(messages)[:60]!r}")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise SidetuneError(f"{where}: each message must be an object with role/content, got {str(m)[:60]!r}")
        # A jsonl mixing both styles loads with every key in every message, None where a row lacks it.
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if role not in ROLES:
            raise SidetuneError(f"{where}: message role {role!r} is unknown; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise SidetuneError(f"{where}: a {role} message has no text content (content / value)")
        out.append({"role": ROLES[role], "content": content})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Rendering and labels


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 raises its own types (TemplateError, raise_exception in the template)
        raise SidetuneError(f"the chat template failed on a conversation: {one_line(e)}") from None


def has_generation_blocks(template: str) -> bool:
    return "{% generation %}" in template or "{%- generation %}" in template or "{% generation -%}" in template


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (see the module docstring)."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
            raise SidetuneError("this chat template does not render a conversation's turns as prefixes of the whole, "
                                "so the assistant tokens cannot be found; set data.chat_template to a template with "
                                "{% generation %} blocks")
        stop = len(end.rstrip())
        if stop > len(start):
            spans.append((len(start), stop))
    return text, spans


def encode(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, truncated to `max_length`: labels are -100 except on assistant
    tokens."""
    if has_generation_blocks(tokenizer.chat_template or ""):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])[:max_length]
        mask = list(enc["assistant_masks"])[:max_length]
        return ids, [t if keep else -100 for t, keep in zip(ids, mask)]
    text, spans = assistant_spans(tokenizer, messages)
    # The template writes the special tokens (BOS, turn markers) itself.
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                        max_length=max_length)
        ids = enc["input_ids"]
        labels = [t if any(a < e and b > s for s, e in spans) else -100
                  for t, (a, b) in zip(ids, enc["offset_mapping"])]
        return ids, labels
    # A slow tokenizer has no offsets: count the tokens of each span's prefix instead.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(ids)
    for s, e in spans:
        a = len(tokenizer(text[:s], add_special_tokens=False)["input_ids"])
        b = len(tokenizer(text[:e], add_special_tokens=False)["input_ids"])
        labels[a:b] = ids[a:b]
    return ids[:max_length], labels[:max_length]


def encode_batch(cfg, tokenizer, batch: dict[str, list], key: str = "data.train") -> dict[str, list]:
    """A `datasets.map(batched=True)` function: the messages column -> input_ids, attention_mask, labels."""
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for n, messages in enumerate(batch[cfg.messages_field]):
        ids, labels = encode(tokenizer, normalize(messages, f"{key} row {n}"), cfg.max_length)
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def tokenize(cfg, tokenizer, rows, key: str):
    """Rows with a messages column -> tokenized conversations, those without an assistant token dropped (noted)."""
    if cfg.messages_field not in rows.column_names:
        raise SidetuneError(f"{key} has no column {cfg.messages_field!r}; its columns are "
                            f"{', '.join(rows.column_names)} (set data.messages_field)")
    encoded = rows.map(lambda batch: encode_batch(cfg, tokenizer, batch, key), batched=True,
                       remove_columns=rows.column_names, desc="rendering conversations")
    kept = encoded.filter(lambda r: any(t != -100 for t in r["labels"]), desc="dropping unlabelled")
    if len(kept) == 0:
        raise SidetuneError(f"{key}: no conversation has an assistant token within data.max_length="
                            f"{cfg.max_length}; add assistant messages or raise data.max_length")
    if len(kept) < len(encoded):
        print(f"sidetune: {key}: dropped {len(encoded) - len(kept)} of {len(encoded)} conversations with no "
              f"assistant token within data.max_length={cfg.max_length}")
    return kept


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation so far plus the template's assistant header: what generation continues."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
