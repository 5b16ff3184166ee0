"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385): continuous prompts produced by a small
trainable prompt encoder and placed at template positions around the input of the frozen model.

    h_1 .. h_P = MLP(BiLSTM(e_1 .. e_P))         (encoder=lstm, the paper's)   or   MLP(e_1 .. e_P)  (encoder=mlp)
    input = [h_1 .. h_m ; E(x) ; h_m+1 .. h_P]   (the template "[P]*m {x} [P]*(P-m)")

The prompt encoder couples the virtual tokens (the paper's argument: free embeddings are optimised too independently
and fall into poor local minima). Its layers follow PEFT's PromptEncoder (`embedding`, `lstm_head`, `mlp_head`), so
the two share weights in the tests. Once trained, the encoder's output is a fixed (P, d) matrix; it is simply
recomputed each step here (P rows through a small LSTM: nothing next to the backbone).

Template (`method.template`). Whitespace-separated parts, read left to right: `[P]` is one virtual token, `[P]*N` is N
of them, `{x}` (exactly once) is the whole tokenized input, special tokens included. So "[P]*10 {x}" puts all ten
before the input (PEFT's layout), "[P]*3 {x} [P]*2" splits them before/after it ("[P][P][P]{x}[P][P]" reads the
same). Virtual tokens after the input sit right after each row's last real token. Causal LMs take templates with
{x} last (see sidetune/methods/_soft_prompt.py, which also keeps the pooled position of every classifier real).

Step 0 is NOT the frozen model (start_exact returns None): the encoder's output, whatever its weights, is P extra
positions every real token attends to (the paper's anchor-free templates have no "invisible" setting), and an
encoder classifier pools a virtual token when the template starts with [P].

The gradient reaches the encoder only through the whole backbone, down to its input: autograd keeps the backbone's
activations (backbone_trains stays True; the profile shows the cost).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from sidetune.errors import SidetuneError
from sidetune.fields import check_dropout, check_positive, opt
from sidetune.methods._inject import freeze
from sidetune.methods._soft_prompt import SoftPromptModel
from sidetune.methods.base import Context, HFExport, Method

_PART = re.compile(r"\s*(?:(\[P\])(?:\*(\d+))?|(\{x\}))")


def parse_template(template: str) -> tuple[int, int]:
    """(virtual tokens before {x}, after {x}) of a template, or one line saying what is wrong with it."""
    counts, seen_x, pos = [0, 0], False, 0
    text = template.rstrip()
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None:
            raise SidetuneError(f"method.template={template!r}: cannot read {text[pos:].strip()!r}; use [P], [P]*N "
                                f"and one {{x}}, e.g. \"[P]*3 {{x}} [P]*2\"")
        if m.group(3):
            if seen_x:
                raise SidetuneError(f"method.template={template!r} has {{x}} twice; the input goes in once")
            seen_x = True
        else:
            counts[seen_x] += int(m.group(2) or 1)
        pos = m.end()
    if not seen_x:
        raise SidetuneError(f"method.template={template!r} has no {{x}}; mark where the input goes, e.g. \"[P]*8 {{x}}\"")
    if sum(counts) < 1:
        raise SidetuneError(f"method.template={template!r} has no virtual token; add [P] or [P]*N")
    return counts[0], counts[1]


@dataclass
class PTuningV1Config:
    name: Literal["ptuning_v1"] = opt("ptuning_v1", "Selects this method.")
    template: str = opt(
        "[P]*10 {x}",
        "Where the virtual tokens go: [P] (one), [P]*N (N) and {x} (the input, once), e.g. \"[P]*10 {x}\" (all "
        "before) or \"[P]*3 {x} [P]*2\" (split around the input; classification only).",
    )
    encoder: Literal["lstm", "mlp"] = opt(
        "lstm", "Prompt encoder: lstm (bidirectional LSTM + 2-layer MLP, the paper's) or mlp (3-layer ReLU MLP).")
    hidden_size: int = opt(128, "Width of the encoder: LSTM hidden size per direction, or the MLP's hidden width.")
    lstm_layers: int = opt(2, "LSTM layers (the paper uses 2).")
    dropout: float = opt(0.0, "Dropout between LSTM layers.")

    def __post_init__(self) -> None:
        parse_template(self.template)
        check_positive("method.hidden_size", self.hidden_size)
        check_positive("method.lstm_layers", self.lstm_layers)
        check_dropout("method.dropout", self.dropout)


class PromptEncoder(nn.Module):
    """The virtual tokens as the output of an encoder over P free embeddings; PEFT's parameter names and layout."""

    def __init__(self, cfg: PTuningV1Config, p: int, d: int, device: torch.device) -> None:
        super().__init__()
        kw = {"device": device, "dtype": torch.float32}  # fp32 master weights beside a maybe-bf16 model
        h = cfg.hidden_size
        self.embedding = nn.Embedding(p, d, **kw)
        if cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=cfg.lstm_layers, dropout=cfg.dropout if cfg.lstm_layers > 1
                                     else 0.0, bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))
        else:
            self.lstm_head = None
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, d, **kw))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # one sequence of P tokens: the LSTM reads them in template order
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


class PTuningV1(Method):
    name: ClassVar[str] = "ptuning_v1"
    Config: ClassVar[type] = PTuningV1Config
    tasks: ClassVar[frozenset[str]] = frozenset({"classification", "causal_lm"})  # no encoder-decoder
    # The virtual tokens sit around one input per row: a packed row holds several.
    packing: ClassVar[bool] = False

    def __init__(self, cfg: PTuningV1Config) -> None:
        self.cfg = cfg

    def start_exact(self, task) -> dict | None:
        # The encoder's output is always P extra attended positions: see the docstring.
        return None

    def hf_export(self, model: SoftPromptModel) -> HFExport:
        return model.hf_export()

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        before, after = parse_template(self.cfg.template)
        freeze(model)
        table = model.get_input_embeddings().weight
        encoder = PromptEncoder(self.cfg, before + after, table.shape[1], table.device)
        return SoftPromptModel(model, encoder, before, after, ctx.task, self.name)
