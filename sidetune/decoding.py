"""Decoding a prompt with a model's own `generate`, and generation-based evaluation (`data.eval_generate`).

`complete` is the one call into a model's `generate` that `sidetune generate`, `sidetune chat` and the eval share:
transformers' for LoRA, adapters, full fine-tuning; the method module's own loop for LST (with KV caches), P-tuning
v2, prefix and prompt tuning.

Generation-based eval. Every tokenized eval example splits into a prompt and a reference: the reference is the last
run of labelled tokens (the completion of a prompt -> completion row, the last assistant turn of a conversation, as
they survive data.max_length), the prompt is every token before it (for seq2seq: the source, and the target). The
prompt is decoded greedily and the text scored against the reference as SQuAD does: exact match and token-overlap F1
of the normalised texts (lower case, no punctuation, no articles a/an/the, single spaces), averaged over examples.
This module imports nothing of the trainer, so the trainer and the CLI can both use it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

import torch
from torch import nn

from sidetune.errors import SidetuneError
from sidetune.tasks import Task


def complete(model: nn.Module, tokenizer, ids: list[int], device: torch.device | str, *, seq2seq: bool = False,
             max_new_tokens: int = 128, temperature: float | None = None, top_k: int | None = None,
             greedy: bool = False) -> str:
    """The decoded continuation of one prompt (special tokens dropped): greedy unless a temperature or top-k asks
    for sampling (and `greedy` is not set)."""
    from transformers import GenerationMixin

    sample = not greedy and (temperature is not None or top_k is not None)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample,
                              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if sample:
        kwargs.update(temperature=temperature if temperature is not None else 1.0, top_k=top_k or 0)
    elif isinstance(model, GenerationMixin):
        # Unset the checkpoint's sampling defaults (generation_config.json), which greedy decoding ignores with a
        # warning each call.
        kwargs.update(temperature=None, top_k=None, top_p=None)
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    new = out[0] if seq2seq else out[0, len(ids):]
    return tokenizer.decode(new, skip_special_tokens=True)


def complete_batch(model: nn.Module, tokenizer, prompts: list[list[int]], device: torch.device | str, *,
                   max_new_tokens: int, stop: list[str] | None = None, temperature: float | None = None,
                   top_k: int | None = None, seq2seq: bool = False) -> list[str]:
    """The decoded continuations of a batch of prompts (special tokens kept; the caller cuts at its stop strings),
    greedy unless a temperature or top-k is given. One `generate` call: transformers' decodes the batch left-padded
    (its positions follow the attention mask); the method modules' loops (LST, prefix and prompt methods) drop the
    padding and decode each row alone with their KV caches. Both stop a row at the eos and, given `stop`, once its
    new text contains a stop string. seq2seq: the prompts are the encoder's inputs and the continuation is the
    decoder's sequence after its start token."""
    from transformers import GenerationMixin

    sample = temperature is not None or top_k is not None
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample,
                              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if sample:
        kwargs.update(temperature=temperature if temperature is not None else 1.0, top_k=top_k or 0)
    hf = isinstance(model, GenerationMixin)
    if hf and not sample:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Left padding: the last prompt token of every row sits in the last column, where generation continues.
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    texts = []
    for row, p in zip(out.tolist(), prompts):
        # transformers returns the padded prompt, the plain loops each row's own prompt, before the new tokens;
        # an encoder-decoder, the decoder's start token.
        new = row[1:] if seq2seq else row[width if hf else len(p):]
        while new and new[-1] == pad:  # a row that ended before the longest is padded after its end
            new.pop()
        texts.append(tokenizer.decode(new, skip_special_tokens=False))
    return texts


# ---------------------------------------------------------------------------------------------------------------------
# SQuAD-style text metrics

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalised texts' words (a multiset overlap); when
    either text is empty, 1 if both are, else 0 (SQuAD v2's convention)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation by decoding


def split_example(input_ids: list[int], labels: list[int], task: Task, where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids) of one tokenized eval example (see the module docstring)."""
    if task.seq2seq:
        return list(input_ids), [t for t in labels if t != -100]
    labelled = [i for i, t in enumerate(labels) if t != -100]
    if not labelled:
        raise SidetuneError(f"{where} has no completion tokens to generate; data.eval_generate needs prompt -> "
                            f"completion examples")
    end = labelled[-1] + 1
    start = end - 1
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    if start == 0:
        raise SidetuneError(f"{where} has no prompt before its completion (every token is labelled); "
                            f"data.eval_generate needs prompt -> completion examples (data.prompt_template, "
                            f"data.format or data.task=chat)")
    return list(input_ids[:start]), list(input_ids[start:end])


class GenerationEval:
    """data.eval_generate: this process's share of the eval examples (every num_processes-th one, from its rank),
    decoded greedily with `complete` and scored against their references. `score` sums over the share and reduces
    the sums over the processes, so every process returns the metrics of the whole eval set, each example once."""

    def __init__(self, model: nn.Module, tokenizer, task: Task, rows, max_new_tokens: int, rank: int = 0,
                 processes: int = 1) -> None:
        self.model, self.tokenizer, self.task, self.max_new_tokens = model, tokenizer, task, max_new_tokens
        # Split (and checked) on every process, before training: a bad example is one line before the first write.
        pairs = [split_example(ids, labels, task, f"data.eval row {n + 1}")
                 for n, (ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"]))]
        self.examples = [(prompt, tokenizer.decode(ref, skip_special_tokens=True))
                         for prompt, ref in pairs[rank::processes]]

    def score(self, device: torch.device, reduce=None) -> dict[str, float]:
        """eval_exact_match and eval_token_f1; `reduce(tensor)` sums a tensor over the processes."""
        em = f1 = 0.0
        for prompt, reference in self.examples:
            text = complete(self.model, self.tokenizer, prompt, device, seq2seq=self.task.seq2seq,
                            max_new_tokens=self.max_new_tokens, greedy=True)
            em += exact_match(text, reference)
            f1 += token_f1(text, reference)
        totals = torch.tensor([em, f1, len(self.examples)], dtype=torch.float64, device=device)
        if reduce is not None:
            totals = reduce(totals)
        em, f1, n = totals.tolist()
        return {"eval_exact_match": em / n, "eval_token_f1": f1 / n} if n else {}
