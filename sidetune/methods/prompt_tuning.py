"""Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv 2104.08691): P trainable embeddings prepended to the input of the frozen model, nothing else changes.

    y = f_theta([P_e ; E(x)]),   P_e in R^{P x d} trained, theta frozen

(plus the freshly initialised task head for classification). The prompt enters at the input only, as inputs_embeds;
the attention mask is extended and causal-LM labels get -100 at the virtual positions, so the loss is the same mean
over the same labelled tokens (the shared machinery, with the padding layout that keeps every classifier's pooled
position real, is in sidetune/methods/_soft_prompt.py).

Initialisation (the paper's section 3.2): `random` (normal, at the scale of the vocabulary embeddings), `vocab`
(embeddings of P distinct token ids drawn from the vocabulary; the draw follows torch's global RNG, which the trainer
seeds with train.seed) or `text` (the embeddings of method.init_text's tokens, repeated or cut to P: "class label"
style initialisation, e.g. "positive or negative sentiment").

Step 0 is NOT the frozen model (start_exact returns None): any prompt, even a zero one, is P extra positions that
every real token attends to (a zero embedding still gets position embeddings, norms and biases, so its keys and
values are not zero), and for an encoder classifier the pooled first position is a virtual token. No value of the
prompt makes it invisible while still receiving a gradient.

The gradient reaches the prompt only through the whole backbone: backward carries dL/dx down every layer to the
input, so autograd keeps the backbone's activations (backbone_trains stays True; the profile shows the cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from sidetune.errors import SidetuneError
from sidetune.fields import check_positive, opt
from sidetune.methods._inject import freeze
from sidetune.methods._soft_prompt import SoftPromptModel, embedding_std
from sidetune.methods.base import Context, HFExport, Method


@dataclass
class PromptTuningConfig:
    name: Literal["prompt_tuning"] = opt("prompt_tuning", "Selects this method.")
    num_virtual_tokens: int = opt(20, "Prompt length P: trainable embeddings prepended to the input (paper: 1-150).")
    init: Literal["random", "vocab", "text"] = opt(
        "vocab",
        "random: normal at the scale of the vocabulary embeddings; vocab: embeddings of P random vocabulary tokens "
        "(seeded by train.seed); text: embeddings of method.init_text, repeated or cut to P.",
    )
    init_text: str | None = opt(None, "The text for init=text, e.g. \"Classify the sentiment: positive or negative\".")

    def __post_init__(self) -> None:
        check_positive("method.num_virtual_tokens", self.num_virtual_tokens)
        if self.init == "text" and not (self.init_text or "").strip():
            raise SidetuneError("method.init=text needs method.init_text, the text whose embeddings start the prompt")


class PromptEmbedding(nn.Module):
    """The prompt itself: a (P, d) fp32 parameter. forward() returns it."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.detach().to(torch.float32).clone())

    def forward(self) -> torch.Tensor:
        return self.weight


def initial_prompt(model: nn.Module, p: int, init: str, text: str | None, ctx: Context) -> torch.Tensor:
    """The (P, d) starting prompt of the given kind."""
    table = model.get_input_embeddings().weight
    if init == "random":
        return torch.randn(p, table.shape[1], device=table.device) * embedding_std(model)
    if init == "vocab":
        return table[torch.randperm(table.shape[0], device=table.device)[:p]].float()
    ids = ctx.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SidetuneError(f"method.init_text={text!r} tokenizes to nothing; give a non-empty text")
    ids = (ids * (p // len(ids) + 1))[:p]  # repeated or cut to P tokens
    return table[torch.tensor(ids, device=table.device)].float()


class PromptTuning(Method):
    name: ClassVar[str] = "prompt_tuning"
    Config: ClassVar[type] = PromptTuningConfig
    tasks: ClassVar[frozenset[str]] = frozenset({"classification", "causal_lm"})  # no encoder-decoder
    # The soft prompt is prepended to the row: in a packed row only the first example would follow it.
    packing: ClassVar[bool] = False

    def __init__(self, cfg: PromptTuningConfig) -> None:
        self.cfg = cfg

    def start_exact(self, task) -> dict | None:
        # A prompt is P extra attended positions (and the pooled one of an encoder classifier): see the docstring.
        return None

    def hf_export(self, model: SoftPromptModel) -> HFExport:
        return model.hf_export()

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        freeze(model)
        with torch.no_grad():
            init = initial_prompt(model, self.cfg.num_virtual_tokens, self.cfg.init, self.cfg.init_text, ctx)
        return SoftPromptModel(model, PromptEmbedding(init), self.cfg.num_virtual_tokens, 0, ctx.task, self.name)
