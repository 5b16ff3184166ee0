"""A finished run as an lm-evaluation-harness model: `SidetuneLM`, the harness's `TemplateLM` over the module
`open_run(RUN).load()` returns, so every method (LST, the prefix and prompt methods, LoRA, adapters, ...) answers the
harness's three requests the way it trains and generates.

- loglikelihood (and loglikelihood_rolling, by the harness's own rolling windows): context + continuation in one
  forward, batched and right-padded. Right padding is the one layout every method reads the same way: the real
  tokens of a row come first, so its positions start at 0 (the prefix methods number positions from the row's
  start, not from the attention mask) and a causal model never lets them see the padding after them.
- generate_until: `sidetune.decoding.complete_batch`, the model's own `generate` (transformers' for LoRA, adapters,
  IA3, BitFit, full; the method module's KV-cached loop for LST and the prefix / prompt methods), stopping at the
  eos and at the request's stop strings; the text is cut at the first stop string, as the harness's `hf` model does.
- Under `accelerate launch` the harness gives each process its share of the documents (rank / world_size) and
  gathers the per-document metrics on process 0 through `all_gather` / `gather_object` / `barrier` below. Each
  process runs the model alone (no DDP wrapper: evaluation has no gradient to reduce).

This module imports lm_eval at the top: import it only after `sidetune.harness.require_harness`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from sidetune.decoding import complete_batch
from sidetune.errors import SidetuneError

# Generation keywords a harness task may set that sidetune's decoding honours; the value each may take and still
# mean greedy / unrestricted decoding (so a task that spells out the defaults is accepted).
_NEUTRAL = {"top_p": 1.0, "repetition_penalty": 1.0, "num_beams": 1}


class SidetuneLM(TemplateLM):
    """The harness's view of a loaded sidetune run: a causal LM (data.task causal_lm or chat), or an encoder-decoder
    (seq2seq: the context is the encoder's input, the continuation the decoder's labels, as the hf model does)."""

    backend = "causal"

    def __init__(self, model: nn.Module, tokenizer, *, device: torch.device, batch_size: int, max_length: int,
                 max_gen_toks: int = 256, rank: int = 0, world_size: int = 1, accelerator=None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 name: str = "sidetune", info: dict[str, Any] | None = None, seq2seq: bool = False) -> None:
        super().__init__()
        self.backend = "seq2seq" if seq2seq else "causal"  # TemplateLM splits context / continuation by it
        self.model, self.tokenizer = model, tokenizer
        self._device, self._rank, self._world_size = device, rank, world_size
        self.accelerator, self.autocast = accelerator, autocast
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self._name, self._info = name, dict(info or {})

    # ----- what the harness reads

    @property
    def eot_token_id(self) -> int:
        # A borrowed tokenizer may have no eos (tiny-t5 reads text with BERT's): the model's own then.
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        return eos[0] if isinstance(eos, (list, tuple)) else eos

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is scored after: BOS where the tokenizer has one, else EOS (as the hf model does).
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self._name

    def get_model_info(self) -> dict[str, Any]:
        return dict(self._info)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's ids for `string`, with its special tokens as training added them (tokenizer(text)),
        except a BOS the text already starts with (a chat template's) is not doubled."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The run's chat template (session.build gave the tokenizer data.chat_template, or its own)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ----- processes (the harness splits documents by rank and gathers metrics through these)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size <= 1:
            return tensor
        return self.accelerator.gather(tensor.reshape(-1)) if tensor.ndim == 0 else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size <= 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            self.accelerator.wait_for_everyone()

    # ----- loglikelihood

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives the continuation) per
        (key, context ids, continuation ids), longest first in batches of `batch_size`, right-padded."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            if self.backend == "seq2seq":
                # The encoder reads the context (its last max_length tokens), the decoder is fed the continuation
                # as labels (shifted right behind the start token by the model), so position t predicts token t.
                rows = [requests[i][1][-self.max_length:] for i in chunk]
                conts = [requests[i][2][:self.max_length] for i in chunk]
                wide = max(len(c) for c in conts)
                labels = torch.tensor([c + [-100] * (wide - len(c)) for c in conts], device=self._device)
                ends = [len(c) for c in conts]
            else:
                # Too long for the model: cut from the left, keeping the whole continuation (the hf model's rule).
                # The last token is only predicted, never read.
                rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chunk]
                labels, ends = None, [len(r) for r in rows]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self._device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self._device)
            extra = {"labels": labels} if labels is not None else {}
            with self.autocast():
                logits = self.model(input_ids=ids, attention_mask=mask, **extra).logits
            for b, i in enumerate(chunk):
                cont = requests[i][2]
                n, c = ends[b], len(cont)
                if c > n:
                    raise SidetuneError(f"a continuation of {c} tokens does not fit the model's {self.max_length}; "
                                        f"raise --max-length (up to the model's position limit)")
                # Causal: position t predicts token t + 1, so the continuation's c tokens are predicted by the last
                # c positions of the row; seq2seq: by the decoder's first c positions (n = c).
                logp = F.log_softmax(logits[b, n - c:n].float(), dim=-1)
                target = torch.tensor(cont, device=logp.device)
                score = logp.gather(-1, target[:, None]).sum().item()
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (score, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in the harness's disjoint rolling windows of max_length tokens
        (each token predicted once, the first after the prefix token)."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owner, scores):
            totals[n] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----- generate_until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued by the run's own generate until a stop string, the eos or max_gen_toks; requests
        with the same generation settings share batches (longest context first)."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            settings = decoding_settings(requests[members[0]].args[1], self.max_gen_toks)
            until = settings.pop("until")
            eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False) \
                if self.eot_token_id is not None else ""
            stops = [*until, eos] if eos and eos not in until else list(until)
            max_new = settings.pop("max_new_tokens")
            if max_new >= self.max_length and self.backend == "causal":
                raise SidetuneError(f"a task asks for {max_new} new tokens, but the model reads only "
                                    f"{self.max_length}; lower max_gen_toks in the task or raise --max-length")
            # Room for the new tokens: a longer context loses its start (the hf model's rule); an encoder reads all
            # max_length.
            room = self.max_length if self.backend == "seq2seq" else self.max_length - max_new
            prompts = {i: self.tok_encode(requests[i].args[0])[-room:] for i in members}
            members = sorted(members, key=lambda i: -len(prompts[i]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                with self.autocast():
                    texts = complete_batch(self.model, self.tokenizer, [prompts[i] for i in chunk], self._device,
                                           max_new_tokens=max_new, stop=stops, seq2seq=self.backend == "seq2seq",
                                           **settings)
                for i, text in zip(chunk, texts):
                    for s in stops:
                        text = text.split(s)[0] if s else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


def decoding_settings(gen_kwargs: dict[str, Any], default_max: int) -> dict[str, Any]:
    """A task's generation_kwargs as complete_batch's arguments: until (a list), max_new_tokens, and temperature /
    top_k when the task samples. A keyword sidetune's decoding cannot honour is one line, not silently dropped (it
    would change the scores)."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    max_new = next((int(kw.pop(k)) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kw),
                   default_max)
    for k in ("max_gen_toks", "max_new_tokens", "max_tokens"):
        kw.pop(k, None)
    do_sample = bool(kw.pop("do_sample", False))
    temperature = kw.pop("temperature", None)
    top_k = kw.pop("top_k", None)
    for key, neutral in _NEUTRAL.items():
        if key in kw and kw[key] in (None, neutral):
            kw.pop(key)
    if kw:
        raise SidetuneError(f"the task's generation_kwargs {sorted(kw)} are not supported by sidetune's decoding "
                            f"(it takes until, max_gen_toks, do_sample, temperature, top_k); drop them from the "
                            f"task YAML")
    # do_sample false (or temperature 0) is greedy, as in the harness's hf model; sampling without a temperature
    # samples at 1.
    settings: dict[str, Any] = {"until": until, "max_new_tokens": max_new}
    if do_sample and temperature != 0:
        settings.update(temperature=1.0 if temperature is None else float(temperature),
                        top_k=int(top_k) if top_k else None)
    return settings
