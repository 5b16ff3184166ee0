"""The chunked causal-LM loss: the fused linear cross-entropy (gradients made in the forward) against autograd through
the unfused head, and the checkpointed fallback for other heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sidetune.losses import chunked_causal_lm_loss


def _reference(hidden, head, labels, softcap):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("softcap", [None, 7.0])
@pytest.mark.parametrize("trainable_head,bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_loss_and_gradients_equal_autograd(softcap, trainable_head, bias, chunk):
    torch.manual_seed(0)
    head = nn.Linear(24, 97, bias=bias)
    head.requires_grad_(trainable_head)
    hidden = torch.randn(3, 11, 24, dtype=torch.float64).float().requires_grad_()
    labels = torch.randint(0, 97, (3, 11))
    labels[0, :4] = -100  # a prompt: unlabelled positions
    labels[2, 7] = -100
    grads = []
    for fn in (_reference, lambda h, m, y, c: chunked_causal_lm_loss(h, m, y, chunk, c)):
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        loss = fn(hidden, head, labels, softcap)
        (loss * 1.7).backward()  # a non-unit upstream gradient, as grad accumulation's scaling gives
        grads.append((loss.detach(), hidden.grad.clone(), *(p.grad.clone() for p in head.parameters() if p.requires_grad)))
    ref, fused = grads
    assert len(ref) == len(fused) == 2 + trainable_head * (1 + bias)
    for a, b in zip(ref, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fused_loss_keeps_no_logits_and_recomputes_nothing():
    """What autograd keeps for backward is dL/dh (N x d) only, never a chunk of logits, and backward runs no matmul."""
    torch.manual_seed(0)
    head = nn.Linear(16, 1000, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 33, 16, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 33))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = chunked_causal_lm_loss(hidden, head, labels, 8)
    assert max(saved) == 2 * 32 * 16  # dL/dh of the 64 labelled rows; no 8 x 1000 logits chunk
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss.backward()
    assert counter.get_total_flops() == 0


def test_no_grad_and_unlabelled_batches():
    head = nn.Linear(8, 13)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 13, (2, 5))
    with torch.no_grad():  # the floor and evaluations: a loss, no gradient work
        torch.testing.assert_close(chunked_causal_lm_loss(hidden, head, labels, 3), _reference(hidden, head, labels, None))
    none = torch.full((2, 5), -100)
    loss = chunked_causal_lm_loss(hidden, head, none, 3)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_other_heads_take_the_checkpointed_path():
    class Scaled(nn.Module):  # not an nn.Linear: the fused path cannot read its weight
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 13)

        def forward(self, x):
            return self.lin(x) * 0.5

    torch.manual_seed(0)
    head = Scaled()
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.randint(0, 13, (2, 6))
    loss = chunked_causal_lm_loss(hidden, head, labels, 4)
    (g,) = torch.autograd.grad(loss, hidden)
    ref = _reference(hidden, head, labels, None)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, g_ref)


def test_fused_loss_under_bf16_autocast_matches_the_unfused_head():
    torch.manual_seed(0)
    head = nn.Linear(32, 211, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 17, 32, requires_grad=True)
    labels = torch.randint(0, 211, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(hidden, head, labels, None)
        (g_ref,) = torch.autograd.grad(ref, hidden)
        loss = chunked_causal_lm_loss(hidden, head, labels, 8)
        (g,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_per_sequence_scores_equal_the_full_logits(softcap):
    """Eval's label scoring through the chunked loss (only labelled positions through the head) equals each row's
    summed next-token NLL from the model's own full logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sidetune.losses import ChunkedLMLoss

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, final_logit_softcapping=softcap)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 6:9], labels[1, 10], labels[2, 5:8] = ids[0, 6:9], ids[1, 10], ids[2, 5:8]
    with torch.no_grad():
        got = ChunkedLMLoss(model, chunk_size=2)(input_ids=ids, attention_mask=mask, labels=labels,
                                                 per_sequence=True).loss
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        want = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none").sum(1)
    assert got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got > 0).all()
