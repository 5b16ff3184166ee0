"""PET: Pattern-Exploiting Training (Schick & Schütze 2021, arXiv 2001.07676), for causal LMs.

Classification becomes word prediction with the model's OWN LM head. A pattern P turns the input x into a cloze
question and a verbalizer v maps each class y to a word; the class score is the LM's score of v(y) at the cloze:

    s(y | x) = M(v(y) | P(x))           p(y | x) = softmax_y s(y | x)           L = CE(p(. | x), y)

With `score: first_token`, s is the LM logit of v(y)'s first token at the position that predicts the word right
after the pattern (the paper's single-token verbalizers). With `score: sum_logprob`, s is log p(v(y) | P(x)) summed
over all of the word's tokens (teacher forcing, one forward over B x num_labels rows): the choice for multi-token
label words. With single-token words both give the same p(y | x) (they differ by a per-row constant).

Here the pattern sits AROUND the data pipeline's tokens: `prefix {text} suffix` is tokenized once, piece by piece,
in `apply`, and each row becomes [leading specials] prefix text suffix [trailing specials] (rows are right-padded to
different lengths; everything is tensor arithmetic, no per-row Python, so a prediction on fake tensors traces it).
Put the space between the text and the pattern inside the pattern ("{text} It was"): pieces are tokenized apart.
A label word is scored as " word" (as it follows the pattern's last word), or as "word" when the pattern ends in
whitespace.

What trains: `train: all` is the paper's PET, full fine-tuning of the LM (an untrained LM head is never used: the
head is the pretrained one, the verbalizer picks its rows). `train: top` trains only the last `top_layers` blocks
and what follows them (the final norm, an untied LM head), a cheaper variant that is not in the paper. Like `full`,
trained weights keep the checkpoint's dtype, and a quantized base trains only its floating-point parameters.

Zero-shot PET is `sidetune train RECIPE train.max_steps=0`: no optimizer step, evaluation of the pattern model, and
the (unchanged) trainable set saved to final/.

The pattern matters more than the method. On SmolLM2-135M-Instruct and 300 SST-2 dev rows, zero-shot: the paper's
"{text} All in all, it was" -> terrible/great answers " great" for every review (0.517, the positive rate);
"Review: {text}\nSentiment:" -> negative/positive gives 0.787, and 64 training examples (64 steps of 8, lr 1e-5, full fine-tuning) take it to 0.853
(recipes/sst2_pet.yaml).

{text} is everything the data pipeline tokenized for the row (with data.text_pair_field, both texts). A run saved
with `verbalizer: null` takes its words from data.label_names, so set one of the two in the config for a reload.

Causal LMs only. A masked LM would score a [MASK] token instead, but sidetune's one offline encoder (minilm,
all-MiniLM-L6-v2, a sentence-transformers checkpoint) ships no MLM head (cls.predictions.transform.* and the output
bias are missing and would be random), so zero-shot PET on it would be meaningless; encoders are refused.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SequenceClassifierOutput

from sidetune.anatomy import is_causal_body
from sidetune.distributed import ShardsLikeInner
from sidetune.errors import SidetuneError
from sidetune.fields import check_positive, opt
from sidetune.methods.base import Context, Method
from sidetune.tasks import TASKS, Task


@dataclass
class PETConfig:
    name: Literal["pet"] = opt("pet", "Selects this method.")
    pattern: str = opt(
        "{text} All in all, it was",
        "The cloze pattern around the input: a format string with exactly one {text}; the label word is predicted "
        "right after it (e.g. \"Review: {text} Sentiment:\" or \"{text} All in all, it was\").")
    verbalizer: list[str] | None = opt(
        None, "One label word per class, in label order (e.g. [terrible, great]); null = data.label_names.")
    score: Literal["first_token", "sum_logprob"] = opt(
        "first_token",
        "first_token: the LM logit of each word's first token at the cloze (the paper). sum_logprob: the word's "
        "summed token log-probabilities (multi-token label words).")
    train: Literal["all", "top"] = opt(
        "all", "all: full fine-tuning of the LM, as in the paper. top: only the last top_layers blocks and the final "
        "norm (and an untied LM head).")
    top_layers: int = opt(2, "Blocks trained with train=top (counted from the output).")

    def __post_init__(self) -> None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.pattern) if f is not None]
        except ValueError as e:
            raise SidetuneError(f"method.pattern={self.pattern!r} is not a format string ({e})") from None
        if fields != ["text"]:
            raise SidetuneError(f"method.pattern={self.pattern!r} must contain {{text}} exactly once (and no other "
                                f"field; write {{{{ }}}} for literal braces), e.g. \"{{text}} All in all, it was\"")
        if self.verbalizer is not None:
            if len(self.verbalizer) < 2 or len(set(self.verbalizer)) != len(self.verbalizer):
                raise SidetuneError(f"method.verbalizer={self.verbalizer} needs one distinct word per class (>= 2)")
            if not all(isinstance(w, str) and w.strip() for w in self.verbalizer):
                raise SidetuneError(f"method.verbalizer={self.verbalizer} has an empty word")
        check_positive("method.top_layers", self.top_layers)

    def pieces(self) -> tuple[str, str]:
        """(prefix, suffix): the pattern's text before and after {text}."""
        marker = "\x00"
        prefix, suffix = self.pattern.format(text=marker).split(marker)
        return prefix, suffix


class PETModel(ShardsLikeInner, nn.Module):
    """A causal LM that scores the verbalizer's words after the pattern. forward(input_ids, attention_mask, labels)
    returns logits (B, num_labels) and the cross-entropy against `labels`."""

    def __init__(self, lm: nn.Module, prefix: list[int], suffix: list[int], words: list[list[int]], n_lead: int,
                 n_trail: int, pad_id: int, score: str) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.n_lead, self.n_trail, self.pad_id, self.score = n_lead, n_trail, pad_id, score
        device = next(lm.parameters()).device
        w = max(map(len, words))
        # Buffers (not parameters): they follow .to() and are never trained.
        self.register_buffer("prefix", torch.tensor(prefix, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("suffix", torch.tensor(suffix, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("words", torch.tensor([ws + [pad_id] * (w - len(ws)) for ws in words], device=device),
                             persistent=False)
        self.register_buffer("word_mask", torch.tensor([[1] * len(ws) + [0] * (w - len(ws)) for ws in words],
                                                       dtype=torch.bool, device=device), persistent=False)

    def patterned(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows [lead] prefix body suffix tail [trail], right-padded. `tail` (B, K) are tokens right after the
        suffix (K may be 0). Returns ids, mask and the position of each row's last suffix token (the cloze: its
        output predicts the word)."""
        b, t = input_ids.shape
        p, s = self.prefix.numel(), self.suffix.numel() + tail.shape[1]
        lengths = attention_mask.sum(1, keepdim=True)  # real tokens per row (right padding)
        i = torch.arange(t, device=input_ids.device).unsqueeze(0)
        body_end = lengths - self.n_trail  # first trailing special (or padding) of each row
        # Where each original token goes: lead stays, the body moves past the prefix, trail and padding move past
        # prefix and suffix. Positions are distinct, so one scatter places every original token.
        new_pos = torch.where(i < self.n_lead, i, torch.where(i < body_end, i + p, i + p + s))
        out = input_ids.new_full((b, t + p + s), self.pad_id)
        out.scatter_(1, new_pos.expand(b, t), input_ids)
        out[:, self.n_lead:self.n_lead + p] = self.prefix
        suffix = torch.cat([self.suffix.expand(b, -1), tail], dim=1)
        suffix_pos = body_end + p + torch.arange(s, device=input_ids.device).unsqueeze(0)
        out.scatter_(1, suffix_pos, suffix)
        mask = (torch.arange(t + p + s, device=input_ids.device).unsqueeze(0) < lengths + p + s).to(attention_mask.dtype)
        cloze = body_end.squeeze(1) + p + self.suffix.numel() - 1
        return out, mask, cloze

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The base model's hidden states, projected by the LM head only where they are read: the B x T x V logits
        # of the whole sequence are never made (as sidetune.losses does for the chunked LM loss).
        return self.lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        head = self.lm.get_output_embeddings()
        b, c = input_ids.shape[0], self.words.shape[0]
        if self.score == "first_token":
            ids, mask, cloze = self.patterned(input_ids, attention_mask, input_ids.new_zeros(b, 0))
            h = self._hidden(ids, mask)[torch.arange(b, device=ids.device), cloze]  # (B, H)
            logits = head(h)[:, self.words[:, 0]].float()  # (B, C)
        else:
            # One row per (example, class): the class's word follows the suffix (teacher forcing); the padding
            # after a shorter word comes after every position read, so a causal LM never sees it.
            w = self.words.shape[1]
            rows = lambda x: x.repeat_interleave(c, dim=0)  # noqa: E731
            ids, mask, cloze = self.patterned(rows(input_ids), rows(attention_mask), self.words.repeat(b, 1))
            reads = cloze.unsqueeze(1) + torch.arange(w, device=ids.device)  # position j predicts word token j
            h = self._hidden(ids, mask).gather(1, reads.unsqueeze(-1).expand(-1, -1, self.config.hidden_size))
            logp = torch.log_softmax(head(h).float(), dim=-1)  # (B*C, W, V)
            tok = logp.gather(-1, self.words.repeat(b, 1).unsqueeze(-1)).squeeze(-1)
            logits = (tok * self.word_mask.repeat(b, 1)).sum(-1).view(b, c)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _inner(self) -> nn.Module:
        return self.lm

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


def _special_counts(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text (BOS; EOS/SEP), read off one example."""
    plain = tokenizer("a sentence", add_special_tokens=False)["input_ids"]
    full = tokenizer("a sentence")["input_ids"]
    for lead in range(len(full) - len(plain) + 1):
        if full[lead:lead + len(plain)] == plain:
            return lead, len(full) - lead - len(plain)
    raise SidetuneError(f"pet cannot locate the text among {type(tokenizer).__name__}'s special tokens")


def _trainable(model: nn.Module, train: str, top_layers: int) -> None:
    """Set requires_grad: every floating-point parameter (all), or the last blocks and what follows them (top)."""
    names = [n for n, p in model.named_parameters()]
    if train == "all":
        start = 0
    else:
        blocks = [n for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
        if len(blocks) < top_layers:
            raise SidetuneError(f"method.top_layers={top_layers} but this model has {len(blocks)} blocks")
        first = blocks[-top_layers] + "."
        # named_parameters follows registration order: the final norm (and an untied LM head) come after the last
        # block, the embeddings (a tied LM head among them) before the first.
        start = next(i for i, n in enumerate(names) if n.startswith(first))
    params = dict(model.named_parameters())
    for i, n in enumerate(names):
        params[n].requires_grad_(i >= start and params[n].is_floating_point())


class PET(Method):
    name: ClassVar[str] = "pet"
    Config: ClassVar[type] = PETConfig
    tasks: ClassVar[frozenset[str]] = frozenset({"classification"})

    def __init__(self, cfg: PETConfig) -> None:
        self.cfg = cfg

    def model_task(self, task: Task) -> Task:
        return TASKS["causal_lm"]  # the LM head scores the label words; no classification head is made

    def start_exact(self, task: Task) -> dict | None:
        # The output is the LM's scores of the label words, (B, num_labels): by design not the frozen LM's logits.
        return None

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        config = model.config
        if config.is_encoder_decoder or not is_causal_body(config):
            raise SidetuneError(f"pet supports causal LMs only, not {config.model_type} (an encoder would need its "
                                f"MLM head, which minilm does not ship); use a decoder such as smollm2-135m")
        words = self.cfg.verbalizer or ctx.label_names
        if words is None:
            raise SidetuneError("pet needs label words: set method.verbalizer=[word0,word1,...] or data.label_names")
        if self.cfg.verbalizer is not None and ctx.label_names is not None and len(words) != len(ctx.label_names):
            raise SidetuneError(f"method.verbalizer has {len(words)} words for {len(ctx.label_names)} classes "
                                f"({ctx.label_names}); give one word per class")
        tok = ctx.tokenizer
        if tok.padding_side != "right":  # forward finds each row's end from the mask, with real tokens first
            raise SidetuneError(f"pet needs a right-padding tokenizer; {type(tok).__name__} pads {tok.padding_side}")
        prefix, suffix = self.cfg.pieces()
        space = "" if suffix[-1:].isspace() else " "
        encode = lambda s: tok(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        word_ids = [encode(space + w) for w in words]
        if not suffix.strip() and not prefix.strip():
            raise SidetuneError(f"method.pattern={self.cfg.pattern!r} adds no words around {{text}}; give the "
                                f"LM a cloze question, e.g. \"{{text}} All in all, it was\"")
        if not encode(suffix):
            raise SidetuneError(f"method.pattern={self.cfg.pattern!r} must end with words after {{text}} (the label "
                                f"word is predicted after them), e.g. \"{{text}} It was\"")
        if self.cfg.score == "first_token":
            firsts = [w[0] for w in word_ids]
            if len(set(firsts)) != len(firsts):
                raise SidetuneError(f"method.verbalizer={list(words)}: two words share their first token; use "
                                    f"method.score=sum_logprob or other words")
        if max(max(w) for w in word_ids) >= config.vocab_size:
            raise SidetuneError(f"the tokenizer's ids exceed this model's vocabulary ({config.vocab_size}); set "
                                f"model.tokenizer to the model's own")
        _trainable(model, self.cfg.train, self.cfg.top_layers)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return PETModel(model, encode(prefix), encode(suffix), word_ids, *_special_counts(tok), pad, self.cfg.score)
