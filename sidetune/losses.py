"""Causal-LM loss in chunks, so that the B x T x V logits tensor never exists (offered to every method).

At a large vocabulary the logits are the largest activation of a training step: Llama-3's 128k vocabulary at
4 x 1024 tokens is 2 GiB in fp32, twice that with its gradient. The loss here

1. keeps only the positions that carry a label (a prompt/completion batch trains on a fraction of its tokens),
2. runs the LM head and cross-entropy on `chunk_size` positions at a time, so only one chunk's logits are alive at
   once, and
3. when the head is a plain linear layer (the usual case, a 4-bit base included: its head stays 16-bit), computes
   each chunk's gradient in the forward itself: the fused linear cross-entropy. dL/dlogits = softmax - onehot is
   known as soon as the logits are, so the forward keeps dL/dh (N x d, the size of the hidden states the unfused
   loss keeps anyway) and, for a trainable head, dL/dW, and backward only scales them. Nothing is recomputed: the
   checkpointed fallback (any other head) runs the head matmul twice per chunk and holds three chunk x V fp32
   buffers in backward. (Liger Kernel's and Cut Cross-Entropy's CUDA kernels do the same in one kernel; this is
   the portable version.)

The result equals transformers' `ForCausalLMLoss` (mean over labelled next-token positions), and its gradients
equal autograd's through the unfused head (tests/test_losses.py).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sidetune.distributed import ShardsLikeInner


@runtime_checkable
class LMHiddenStates(Protocol):
    """A trained module that gives the final hidden states itself, for the chunked LM loss to apply the head to."""

    def lm_hidden_states(self, **inputs) -> torch.Tensor: ...


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()  # fp32 log-softmax: bf16 loses the small probabilities
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="sum")


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(softcap(rows @ W.T + b), targets) / n, with the gradients made in the forward.

    Inside the forward the matmuls run as the caller's autocast says (bf16 on a GPU run), and the softmax in fp32,
    exactly as the unfused `head(rows).float()` path. Under no_grad (the floor, an eval) no gradient is made."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size: int, softcap: float | None, n: int, grad_mode: bool):
        # needs_input_grad says what requires grad even under no_grad; the caller's grad mode says if any is wanted.
        want_x, want_w, want_b = (grad_mode and need for need in ctx.needs_input_grad[:3])
        grad_rows = torch.empty_like(rows) if want_x else None
        # dW and db accumulate over chunks in fp32 (a bf16 sum over thousands of rows loses the small terms).
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        total = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_size):
            x, t = rows[start:start + chunk_size], targets[start:start + chunk_size]
            raw = F.linear(x, weight, bias)
            logits = raw.float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            total += F.cross_entropy(logits, t, reduction="sum")
            if not (want_x or want_w or want_b):
                continue
            # d(sum CE)/dlogits = softmax - onehot, then / n for the mean and through the cap's tanh.
            g = torch.softmax(logits, dim=-1)
            g[torch.arange(t.numel(), device=t.device), t] -= 1.0
            if softcap:
                g *= 1.0 - capped * capped
            g /= n
            g_low = g.to(raw.dtype)  # the dtype the head's matmul ran in (bf16 under autocast), as autograd would
            if want_x:
                grad_rows[start:start + chunk_size] = g_low @ weight.to(raw.dtype)
            if want_w:
                grad_w += (g_low.t() @ x.to(raw.dtype)).float()
            if want_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_rows, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_rows, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g, dtype=None: None if g is None else (g * grad_out).to(dtype or g.dtype)  # noqa: E731
        return (scale(grad_rows), scale(grad_w, ctx.dtypes[0]), scale(grad_b, ctx.dtypes[1]),
                None, None, None, None, None)


def _fusable(head: nn.Module) -> bool:
    """A head the fused loss can read: exactly nn.Linear (not a 4-bit, LoRA-wrapped or hooked one), weight 2-D."""
    return type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int,
                           softcap: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `head(hidden)` against `labels` (-100 = ignore), `chunk_size` rows at a time.
    `softcap`: the model's final-logit soft-capping (Gemma 2: cap * tanh(logits / cap)), applied as its forward does.
    A plain linear head takes the fused path (gradients made in the forward); any other head is checkpointed."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    if targets.numel() and _fusable(head):
        return _FusedLinearCrossEntropy.apply(rows, head.weight, head.bias, targets, chunk_size, softcap,
                                              targets.numel(), torch.is_grad_enabled())
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_loss, head, rows[start:end], targets[start:end], softcap,
                                   use_reentrant=False)
    if targets.numel() == 0:
        return hidden.sum() * 0.0  # a batch with no labelled token: loss 0 (not NaN) that backward still accepts
    return total / targets.numel()


class ChunkedLMLoss(ShardsLikeInner, nn.Module):
    """Wraps a causal LM so that its forward returns the chunked loss.

    The wrapped module is either a transformers CausalLM (its body is `base_model`) or a method's own module that
    declares the capability `lm_hidden_states(**inputs) -> final hidden states` (LST adds its side network there).
    The forward goes through this module, so accelerate's DDP wrapper sees every call.
    """

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def _inner(self) -> nn.Module:
        return self.model

    def _hidden(self, inputs: dict) -> tuple[torch.Tensor, nn.Module, float | None]:
        if isinstance(self.model, LMHiddenStates):  # a method's own module (LST adds its side network there)
            hidden = self.model.lm_hidden_states(**inputs)
        else:
            hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        # Gemma 2 caps its logits in its CausalLM forward, after the head: the chunks must too.
        return hidden, self.model.get_output_embeddings(), getattr(self.model.config, "final_logit_softcapping", None)

    @staticmethod
    def _sequence_nll(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int,
                      softcap: float | None) -> torch.Tensor:
        targets = labels[:, 1:]
        keep = targets != -100
        rows, targets, row_of = hidden[:, :-1][keep], targets[keep], keep.nonzero()[:, 0]
        nll = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_size):
            end = start + chunk_size
            logits = head(rows[start:end]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            nll.index_add_(0, row_of[start:end], F.cross_entropy(logits, targets[start:end], reduction="none"))
        return nll

    def forward(self, labels: torch.Tensor | None = None, per_sequence: bool = False, **inputs):
        """The mean loss over labelled tokens; with per_sequence (label scoring in eval), each row's summed
        next-token negative log-likelihood of its labelled tokens as `loss` (B,), the head run on those positions
        only. Either way the full B x T x V logits never exist; without labels the logits are returned."""
        hidden, head, softcap = self._hidden(inputs)
        if per_sequence:
            return LMOutput(loss=self._sequence_nll(hidden, head, labels, self.chunk_size, softcap), logits=None)
        if labels is None:
            logits = head(hidden)
            return LMOutput(loss=None, logits=torch.tanh(logits / softcap) * softcap if softcap else logits)
        return LMOutput(loss=chunked_causal_lm_loss(hidden, head, labels, self.chunk_size, softcap), logits=None)


class LMOutput(dict):
    """A minimal ModelOutput: attribute and key access to loss / logits."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None
