"""train.mlp_chunk_size: frozen MLPs in token chunks: the same forward, a chunk's intermediates at the peak."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny
from torch.testing import assert_close

from sidetune.config import load_config
from sidetune.mlp_chunks import chunk_frozen_mlps
from sidetune.profile import measure


@pytest.mark.parametrize("preset,task", [("tiny-llama", "causal_lm"), ("tiny-gpt2", "causal_lm"),
                                         ("tiny-t5", "seq2seq")])
def test_chunked_mlps_give_the_same_forward_and_leave_grad_mode_alone(preset, task):
    model = tiny(preset, task).eval()
    ids = torch.randint(3, 1000, (2, 40))
    batch = {"input_ids": ids, "labels": ids} if task == "causal_lm" else {"input_ids": ids, "labels": ids[:, :9].clone()}
    with torch.no_grad():
        plain = model(**batch).logits
    assert chunk_frozen_mlps(model, 16) > 0  # 8 tokens of each of the 2 rows at a time: 5 chunks
    calls = []
    mlp = next(m for m in model.modules() if getattr(m, "_sidetune_chunked", None))
    hook = next(mlp.children()).register_forward_hook(
        lambda m, a, out: calls.append(a[0].shape[1]))
    with torch.no_grad():
        chunked = model(**batch).logits
    assert calls[:5] == [8] * 5  # the first MLP ran on 8-token slices
    assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    calls.clear()
    loss = model(**batch).loss  # grad mode: the MLP runs whole, as autograd needs it
    loss.backward()
    assert calls[0] == 40 and loss.requires_grad
    hook.remove()


def test_chunked_mlps_cut_the_no_grad_peak():
    """The floor's peak (a no-grad forward) drops with chunked MLPs; tracked on real CPU tensors."""
    peaks = {}
    t = 2048  # long enough that the MLP, not a loss chunk's 49k-wide logits, makes the peak
    for chunk in (0, 256):
        cfg = load_config(None, ["model.name=tiny-llama", "data.task=causal_lm", "train.batch_size=1",
                                 f"data.max_length={t}", "train.loss_chunk_size=4", f"train.mlp_chunk_size={chunk}"])
        peaks[chunk] = measure(cfg, False, "cpu", fake=False)["peak_bytes"]
    # tiny-llama: ff = 128 wide; at the peak the whole sequence's T x 128 fp32 intermediates give way to a chunk's
    assert peaks[0] - peaks[256] >= 0.9 * t * 128 * 4, peaks
