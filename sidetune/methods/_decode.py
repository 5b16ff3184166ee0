"""A plain decoding loop for methods whose model cannot use transformers' `generate` as is: LST (the side network
runs beside the backbone) and P-tuning v2 (the prefix lives in a read-only cache that `generate` would try to grow).

Each row is decoded alone, so padding never shifts positions. A row stops at an eos, after `max_new_tokens`, or (given
`stop_strings` and the tokenizer, as transformers' `generate` takes them) once its new text contains a stop string.
A step receives the whole sequence so far; a step may keep its own cache and feed the model only the tokens it has not
seen (LST's does, for the backbone and the side network) or rerun the full forward (the reference the cached path is
tested against).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sidetune.errors import SidetuneError

Step = Callable[[torch.Tensor], torch.Tensor]  # (1, t) token ids -> (1, vocab) logits of the next token


def special_tokens(config, eos_token_id=None, pad_token_id: int | None = None) -> tuple[set[int], int]:
    """The end-of-sequence ids (the config's unless given; [] for none) and the id that pads finished rows."""
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else next(iter(eos), 0)
    return eos, pad_token_id


@torch.no_grad()
def decode_rows(rows: list[tuple[torch.Tensor, Step]], max_new_tokens: int, eos: set[int], pad: int,
                do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                stop: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
    """Extend each (start sequence, step) row by greedy or sampled tokens until an eos, `max_new_tokens` or
    `stop(new tokens)` (see `stop_on_strings`); returns the sequences right-padded with `pad`."""
    out = []
    for seq, step in rows:
        start = seq.shape[1]
        for _ in range(max_new_tokens):
            logits = step(seq).float()
            if do_sample:
                logits = logits / max(temperature, 1e-5)
                if top_k:
                    logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1)
            else:
                token = logits.argmax(-1, keepdim=True)
            seq = torch.cat((seq, token.to(seq.dtype)), dim=1)
            if token.item() in eos or (stop is not None and stop(seq[0, start:])):
                break
        out.append(seq[0])
    width = max(len(r) for r in out)
    return torch.stack([F.pad(r, (0, width - len(r)), value=pad) for r in out])


def unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each row's real tokens (padding dropped, wherever it sits), as (1, t) tensors."""
    return [(ids if attention_mask is None else ids[attention_mask[b].bool()])[None]
            for b, ids in enumerate(input_ids)]


def stop_on_strings(stop_strings: list[str] | str | None, tokenizer) -> Callable[[torch.Tensor], bool] | None:
    """transformers' `stop_strings` for the plain loop: a row stops once its decoded new text contains one of them
    (a stop string may end inside a token, so the text is searched, not the token ids)."""
    if not stop_strings:
        return None
    if tokenizer is None:
        raise SidetuneError("generate(stop_strings=...) needs the tokenizer (tokenizer=...) to read the text")
    strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)

    def stop(new: torch.Tensor) -> bool:
        text = tokenizer.decode(new, skip_special_tokens=False)
        return any(s in text for s in strings)

    return stop
