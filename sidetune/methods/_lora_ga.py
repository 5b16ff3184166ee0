"""LoRA-GA: LoRA initialised from the gradient (Wang, Yu & Li, 2024, arXiv 2407.05000), and the hook-based
estimate of a frozen linear layer's weight gradient that it (and LST's Fisher pruning) uses.

With B A set so that the first step of LoRA moves W like a full fine-tuning step would: for G = dL/dW = U S V^T
(estimated on a few training batches),

    A_0 = c V[:, :r]^T,   B_0 = c U[:, r:2r],   c = d_out^(1/4) / sqrt(gamma)        (the paper's "stable" scale)

one SGD step on (A, B) changes W by -lr * s^2 * (B B^T G + G A^T A) = -lr * s^2 c^2 * (the best rank-2r
approximation of G), s the LoRA scaling. `direction="A2rBr"` swaps the roles (A = V[:, r:2r]^T, B = U[:, :r]); the
first step is the same. The frozen base becomes W - s B_0 A_0, so step 0 still equals the base model.

This follows the authors' code (github.com/Outsider565/LoRA-GA): A and B are orthonormal singular vectors times c.
PEFT's `lora_ga` (0.21) differs: it multiplies B by the singular values and scales B only.

The gradient needs no weight to require grad: a forward hook adds a zero leaf z to each layer's output
(y = W x + z, so dL/dz = dL/dy) and keeps x; backward then gives dL/dW = sum over tokens (dL/dy)^T x. This works the
same for nn.Linear, GPT-2's Conv1D and 4-bit layers, leaves every parameter's requires_grad and grad untouched, and
accumulates in fp32 whatever the base dtype. It costs one fp32 out x in matrix per layer, plus the layers' inputs
while a batch's backward runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sidetune.errors import SidetuneError

# Exact SVD up to this size (deterministic, cheap); a seeded randomized SVD of rank 4r above (a 4096 x 14336
# gradient would take minutes exactly, and only the top 2r directions are used).
EXACT_SVD_MAX = 1024


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module):
    """Every parameter frozen for the duration (so backward reaches only the zero leaves), then restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def linear_gradients(model: nn.Module, layers: dict[str, nn.Module],
                     batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """For each batch, dL/dW of each layer in `layers` (name -> module), fp32, in the (out, in) layout, for the loss
    `model(**batch).loss`. The model runs in its current mode (eval: no dropout noise in the estimate)."""
    grads: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def forward_hook(module, args, out):
            x = args[0].detach()
            z = torch.zeros_like(out, requires_grad=True)

            def on_grad(g: torch.Tensor) -> None:
                gw = g.flatten(0, -2).float().T @ x.flatten(0, -2).float()
                grads[name] = grads[name] + gw if name in grads else gw

            z.register_hook(on_grad)
            return out + z
        return forward_hook

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with _frozen_parameters(model), torch.enable_grad():
            for batch in batches:
                grads.clear()
                loss = model(**batch).loss
                if loss is None:
                    raise SidetuneError("the calibration batches carry no labels, so there is no loss to take the "
                                        "gradient of; check data.label_field / the task's collator")
                loss.backward()
                missing = [n for n in layers if n not in grads]
                if missing:
                    raise SidetuneError(f"layer {missing[0]} got no gradient from the calibration loss (it does not "
                                        f"feed the loss); drop it from method.targets")
                yield dict(grads)
    finally:
        for h in handles:
            h.remove()
        grads.clear()


def mean_gradients(model: nn.Module, layers: dict[str, nn.Module],
                   batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full-weight gradient of each layer, averaged over `batches` (float layers only: see apply_init)."""
    for name, layer in layers.items():
        if not layer.weight.is_floating_point():
            # The offset s B_0 A_0 cannot be subtracted from 4-bit/8-bit storage without requantizing the layer.
            raise SidetuneError(f"method.init=lora_ga needs a float base (its initial B A is subtracted from the "
                                f"frozen weight; {name} is quantized); drop model.quantize, or use "
                                f"method.init=standard for QLoRA")
    total: dict[str, torch.Tensor] = {}
    for grads in linear_gradients(model, layers, batches):
        for name, g in grads.items():
            total[name] = total[name].add_(g) if name in total else g
    return {name: g / len(batches) for name, g in total.items()}


def _top_svd(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k left and right singular vectors of g: (U_k: out x k, V_k: in x k)."""
    if min(g.shape) <= EXACT_SVD_MAX:
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return u[:, :k], vh[:k].T
    devices = [g.device] if g.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        u, _, v = torch.svd_lowrank(g, q=min(2 * k, min(g.shape)), niter=4)
    return u[:, :k], v[:, :k]


def init_factors(grad: torch.Tensor, r: int, gamma: float, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_0: r x in, B_0: out x r) from a layer's gradient (out x in), per the paper's stable scale."""
    out_features, in_features = grad.shape
    if 2 * r > min(grad.shape):
        raise SidetuneError(f"method.init=lora_ga needs 2 * method.r <= the smaller side of every targeted layer "
                            f"({out_features} x {in_features} here); lower method.r to <= {min(grad.shape) // 2}")
    u, v = _top_svd(grad, 2 * r)
    c = out_features**0.25 / gamma**0.5
    if direction == "ArB2r":
        a, b = v[:, :r].T, u[:, r:2 * r]
    else:  # A2rBr
        a, b = v[:, r:2 * r].T, u[:, :r]
    return (c * a).contiguous(), (c * b).contiguous()


@torch.no_grad()
def apply_init(layer, grad: torch.Tensor, r: int, gamma: float, direction: str) -> None:
    """Set a LoRALinear's A and B from `grad` and subtract the initial update from its float base weight."""
    grad = grad.to(layer.lora_A.weight.device)
    rows = layer.adapted_rows()
    # A fused qkv layer adapted on its query and value rows: the gradient of those rows, B zero elsewhere.
    layer.start_from(*init_factors(grad if rows is None else grad[rows], r, gamma, direction))
