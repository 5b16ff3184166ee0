"""Input-level soft prompts, shared by prompt tuning and P-tuning (v1): P trainable vectors that enter the frozen
model as extra input embeddings, `before` of them ahead of the input and `after` of them behind it.

    e = [v_1 .. v_before ; E(x_1) .. E(x_T) ; v_before+1 .. v_P]          (fed as inputs_embeds)

Only the embedding layer's output changes; the whole model is the one a plain input would run. Where the vectors
come from (a free embedding, or an LSTM/MLP prompt encoder) is the method's business: it hands a module whose
forward() returns the (P, d) prompt.

Layouts. A causal LM only gets prompts before the input (the trainer's choice scoring and generation never tell
where a prompt ends and a completion starts, so "after the input" would be ill-defined there): the batch becomes
[prompt ; batch as is] (PEFT's layout; position ids skip left padding). The labels get -100 at the virtual
positions and at the first token, which the prompt's last position would predict but the model alone never scores
(PEFT does score it): the loss stays the mean over exactly the targets labels[:, 1:]. The logits returned are those
of the real positions, so they line up with the caller's input_ids and labels, and the chunked LM loss, the choice
scoring and the decoding loop work unchanged.

A classifier pools one position: BERT-style models the first ([CLS], or here the first virtual token), decoder
classifiers (Llama, GPT-2 `score` heads) the last real one -- and transformers, given inputs_embeds instead of
input_ids, can no longer find it and takes position -1, which under right padding is a pad. So each row is laid out
as [before ; its real tokens ; after] and its padding is moved to index 1, with position ids that skip the pads:

    [s_0 ; pad .. pad ; s_1 .. s_K-1]          positions 0, (pads), 1 .. K-1,  K = P + real length

Position 0 and position -1 are then real for every row whatever the pooling, each row computes exactly what it
computes alone, and with no padding this is just [before ; x ; after]. Token type ids follow the tokens (the
virtual ones get type 0, as in PEFT). transformers' one-time warning that a decoder classifier "will not detect
padding tokens in inputs_embeds" is expected, and this layout is why it does no harm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sidetune.distributed import ShardsLikeInner
from sidetune.errors import SidetuneError
from sidetune.methods._decode import decode_rows, special_tokens, stop_on_strings, unpadded_rows
from sidetune.methods.base import HFExport
from sidetune.tasks import Task


def embedding_std(model: nn.Module) -> float:
    """The spread of the model's vocabulary embeddings: the scale a random prompt starts at, so that it is neither
    drowned out by nor drowning the real tokens (N(0, 1) is ~20-50x the scale of BERT's or Llama's embeddings)."""
    w = model.get_input_embeddings().weight
    return float(w.float().std()) if w.device.type != "meta" else 0.02


class SoftPromptModel(ShardsLikeInner, nn.Module):
    """The frozen model with a soft prompt at its input. forward(**batch) returns the model's output (loss, logits)."""

    def __init__(self, model: nn.Module, prompt: nn.Module, before: int, after: int, task: Task,
                 method: str) -> None:
        super().__init__()
        if model.config.is_encoder_decoder:
            raise SidetuneError(f"{method} supports decoder-only and encoder-only models, not encoder-decoder "
                                f"{model.config.model_type}; use method.name=lora or adapter")
        if not task.classifies and after:
            raise SidetuneError(f"{method} on data.task={task.name} puts every virtual token before the input (the "
                                f"choice scoring and generation never say where a prompt ends); use a template "
                                f"with {{x}} last")
        self.model = model
        self.prompt = prompt
        self.before, self.after = before, after
        self.classifies = task.classifies
        self.method = method
        self.config = model.config

    @property
    def num_virtual_tokens(self) -> int:
        return self.before + self.after

    # ----- the input with the prompt

    def _virtual(self, like: torch.Tensor) -> torch.Tensor:
        """The (P, d) prompt in the dtype of the token embeddings (fp32 master weights, cast for a bf16 model)."""
        return self.prompt().to(like.dtype)

    def _lm_inputs(self, input_ids, attention_mask, labels, inputs_embeds, kwargs) -> dict[str, Any]:
        embeds = self.model.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = embeds.shape[:2]
        p = self.num_virtual_tokens
        virtual = self._virtual(embeds).unsqueeze(0).expand(b, -1, -1)
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=embeds.device)
        mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
        # Positions that skip pads: a left-padded row computes what it computes alone (no padding: 0 .. P+T-1).
        out = dict(kwargs, inputs_embeds=torch.cat([virtual, embeds], dim=1), attention_mask=mask,
                   position_ids=(mask.long().cumsum(1) - 1).clamp(min=0))
        if labels is not None:
            # -100 for the virtual positions and for the first token, which the prompt's last position would predict
            # but the model alone never scores: the loss stays the mean over exactly the targets labels[:, 1:].
            out["labels"] = torch.cat([labels.new_full((b, p + 1), -100), labels[:, 1:]], dim=1)
        return out

    def _classifier_inputs(self, input_ids, attention_mask, token_type_ids, inputs_embeds, kwargs) -> dict[str, Any]:
        embeds = self.model.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, d = embeds.shape
        n1, p = self.before, self.num_virtual_tokens
        dev = embeds.device
        real = (torch.ones(b, t, dtype=torch.bool, device=dev) if attention_mask is None
                else attention_mask.to(dev).bool())
        length = real.sum(1, keepdim=True)  # real tokens per row, L
        pads = t - length
        # Source rows: 0..t-1 the tokens, t..t+p-1 the virtual tokens. `order` lists each row's real tokens first
        # (in their order), then its pads, wherever the collator put them.
        order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
        j = torch.arange(t + p, device=dev).unsqueeze(0)
        is_pad = (j >= 1) & (j < 1 + pads)
        k = torch.where(j == 0, 0, j - pads)  # index into the unpadded row [before ; real ; after]
        tok = order.gather(1, (k - n1).clamp(0, t - 1))
        src = torch.where(k < n1, t + k, torch.where(k < n1 + length, tok, t + k - length))
        src = torch.where(is_pad, order.gather(1, (length + j - 1).clamp(max=t - 1)), src)
        pool = torch.cat([embeds, self._virtual(embeds).unsqueeze(0).expand(b, -1, -1)], dim=1)
        mask = (~is_pad).long()
        out = dict(kwargs, inputs_embeds=pool.gather(1, src.unsqueeze(-1).expand(-1, -1, d)), attention_mask=mask,
                   position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        if token_type_ids is not None:
            types = torch.cat([token_type_ids, token_type_ids.new_zeros(b, p)], dim=1)
            out["token_type_ids"] = types.gather(1, src)
        return out

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, inputs_embeds=None,
                **kwargs):
        if self.classifies:
            inputs = self._classifier_inputs(input_ids, attention_mask, token_type_ids, inputs_embeds, kwargs)
            return self.model(**inputs, labels=labels)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**self._lm_inputs(input_ids, attention_mask, labels, inputs_embeds, kwargs),
                         use_cache=False)
        # Logits of the real positions only: they line up with the caller's input_ids and labels.
        out.logits = out.logits[:, self.num_virtual_tokens:]
        return out

    def lm_hidden_states(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        """Final hidden states of the real positions, for the chunked LM loss (sidetune.losses)."""
        if self.classifies:
            raise SidetuneError(f"{self.method}: the chunked LM loss applies to causal LMs only")
        inputs = self._lm_inputs(input_ids, attention_mask, None, inputs_embeds, kwargs)
        return self.model.base_model(**inputs, use_cache=False).last_hidden_state[:, self.num_virtual_tokens:]

    # ----- what the trainer, sidetune.load and export ask of the module

    @torch.no_grad()
    def hf_export(self) -> HFExport:
        """The prompt, computed once (P-tuning's encoder run, no dropout), as the P x d input embeddings that
        sidetune/portable/modeling_sidetune.py puts before the input (kind "soft_prompt")."""
        if self.classifies:
            raise SidetuneError(f"sidetune export --hf writes {self.method} runs of causal LMs; a classifier's "
                                f"prompt layout is not exported yet: serve it with sidetune.load(RUN_DIR)")
        was = self.training
        self.eval()
        virtual = self.prompt().float()
        self.train(was)
        spec = {"kind": "soft_prompt", "before": self.before, "after": self.after, "d": virtual.shape[-1]}
        return HFExport(spec, self.model, {"soft_prompt": virtual})

    def _inner(self) -> nn.Module:
        return self.model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """The model's own checkpointing: the prompt enters as the blocks' input, so it gets its gradient either way."""
        inner = self.model
        enable = getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, eos_token_id=None,
                 pad_token_id: int | None = None, stop_strings: list[str] | None = None,
                 tokenizer=None) -> torch.Tensor:
        """Greedy or sampled decoding with the prompt in front (causal LMs), by the plain loop of
        sidetune.methods._decode: each new token is the argmax (or a sample) of the full forward the model was trained
        with. Returns the input plus the new tokens, right-padded with `pad_token_id`."""
        if self.classifies or self.model.get_output_embeddings() is None:
            raise SidetuneError(f"generate needs a causal LM; this {self.method} model is a "
                                f"{type(self.model).__name__}")
        eos, pad = special_tokens(self.config, eos_token_id, pad_token_id)
        rows = [(ids, lambda s: self(input_ids=s).logits[:, -1]) for ids in unpadded_rows(input_ids, attention_mask)]
        return decode_rows(rows, max_new_tokens, eos, pad, do_sample, temperature, top_k,
                           stop_on_strings(stop_strings, tokenizer))
