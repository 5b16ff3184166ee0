"""Preference objectives (`train.objective: dpo | simpo`) on `data.task: preference` batches, for every method.

A batch holds 2B rows, the B chosen answers then the B rejected ones (tasks.PairCollator), and the policy scores
all of them in one forward (as TRL concatenates them). Each row's score is the sum of its answer tokens'
log-probabilities (labels != -100, next-token shifted): `sequence_logps`.

- DPO (Rafailov et al. 2023): d = (pi_c - ref_c) - (pi_r - ref_r);
  loss = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)   (eps = train.label_smoothing: conservative DPO);
  rewards beta (pi - ref). With eps = 0 this is TRL's DPOTrainer `sigmoid` loss (tests/test_preference.py).
- SimPO (Meng et al. 2024), reference-free: the length-normalised log-probability a = logps / answer tokens;
  loss = -(1 - eps) log sigmoid(beta (a_c - a_r) - gamma) - eps log sigmoid(-(beta (a_c - a_r) - gamma));
  rewards beta a. TRL's CPOTrainer with loss_type="simpo" (and cpo_alpha=0).

The reference model of DPO is the model as training starts; each method declares how it gets its log-probabilities
(`Method.reference`): `in_forward` (LST: the frozen backbone's final hidden state, which the policy's forward
computes anyway, through the LM head: no second model, no second backbone forward), `parts_off` (LoRA, adapters,
IA3: a second, no-grad forward with the method's parts switched off) or `precomputed` (any method, e.g. full
fine-tuning: one pass over the training and eval pairs before the first step, written atomically into the run
directory as reference_logps.safetensors and read back on resume).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpointed

from sidetune.distributed import ShardsLikeInner
from sidetune.errors import SidetuneError
from sidetune.losses import LMHiddenStates, LMOutput

REFERENCE_FILE = "reference_logps.safetensors"
REFERENCES = ("in_forward", "parts_off", "precomputed")


@runtime_checkable
class ReferenceInForward(Protocol):
    """A trained module whose forward computes the reference model's final hidden state on the way (LST)."""

    def lm_hidden_states_with_reference(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]: ...


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities and losses


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log p(label_t+1 | ..t) over the labelled positions, and how many there are. `logits` may
    be longer than `labels` (virtual tokens in front): its last positions are the rows' tokens."""
    logits = logits[:, -labels.shape[1]:][:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    token = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1), mask.sum(-1)


def _chunk_logps(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(rows).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.gather(logits.log_softmax(-1), 1, targets.unsqueeze(-1)).squeeze(-1)


def hidden_logps(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int,
                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` from the final hidden states: the head runs on the labelled positions only, `chunk_size`
    rows at a time, each chunk recomputed in backward (train.loss_chunk_size: no 2B x T x V logits held)."""
    targets = labels[:, 1:]
    mask = targets != -100
    rows = hidden[:, :-1][mask]
    flat = targets[mask]
    if torch.is_grad_enabled() and rows.requires_grad:
        parts = [checkpointed(_chunk_logps, head, rows[s:s + chunk_size], flat[s:s + chunk_size], softcap,
                              use_reentrant=False) for s in range(0, flat.numel(), chunk_size)]
    else:
        parts = [_chunk_logps(head, rows[s:s + chunk_size], flat[s:s + chunk_size], softcap)
                 for s in range(0, flat.numel(), chunk_size)]
    token = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    row_of = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, row_of, token)
    return sums, mask.sum(-1)


def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the chosen / rejected rewards beta (pi - ref) (summed log-probs in)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = _smoothed(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses and rewards beta * (length-normalised log-prob)."""
    losses = _smoothed(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


# ---------------------------------------------------------------------------------------------------------------------
# The module a step calls


class PreferenceModule(ShardsLikeInner, nn.Module):
    """Wraps the trained module: forward(**pair batch) returns the preference loss (and per-pair rewards), so the
    trainer's one loop, the profile and the eval run it like any other loss.

    reference: how the reference log-probabilities come (`Method.reference`); `reference_off` is the method's
    context for `parts_off`; `table` holds the precomputed ones, a row per pair_index (chosen, rejected)."""

    def __init__(self, model: nn.Module, objective: str, beta: float, label_smoothing: float, gamma: float,
                 reference: str, reference_off: Callable | None = None, chunk_size: int = 0) -> None:
        super().__init__()
        if objective == "dpo" and reference not in REFERENCES:
            raise SidetuneError(f"unknown reference {reference!r}; a method declares one of {', '.join(REFERENCES)}")
        self.model = model
        self.objective, self.beta, self.label_smoothing, self.gamma = objective, beta, label_smoothing, gamma
        self.reference = reference if objective == "dpo" else None  # SimPO needs none
        self.reference_off = reference_off
        self.chunk_size = chunk_size
        self.table: torch.Tensor | None = None  # (pairs, 2) float32: precomputed reference log-probs
        self._sums: dict[str, torch.Tensor] = {}

    def _inner(self) -> nn.Module:
        return self.model

    @property
    def config(self):
        return self.model.config

    @property
    def needs_table(self) -> bool:
        return self.reference == "precomputed"

    # ----- log-probabilities

    def _head(self) -> tuple[nn.Module, float | None]:
        return self.model.get_output_embeddings(), getattr(self.model.config, "final_logit_softcapping", None)

    def _hidden_path(self) -> bool:
        """The chunked path applies the LM head itself: for modules that give their final hidden states."""
        return bool(self.chunk_size) and (isinstance(self.model, LMHiddenStates) or hasattr(self.model, "base_model"))

    def policy_logps(self, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._hidden_path():
            if isinstance(self.model, LMHiddenStates):
                hidden = self.model.lm_hidden_states(**inputs)
            else:
                hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
            return hidden_logps(hidden, *self._head_args(labels))
        return sequence_logps(self.model(**inputs).logits, labels)

    def _from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs through the LM head: chunked (train.loss_chunk_size), or the whole logits at once."""
        if self.chunk_size:
            return hidden_logps(hidden, *self._head_args(labels))
        head, softcap = self._head()
        logits = head(hidden)
        return sequence_logps(torch.tanh(logits / softcap) * softcap if softcap else logits, labels)

    def _head_args(self, labels):
        head, softcap = self._head()
        return head, labels, self.chunk_size or labels.numel(), softcap

    def _logps_with_reference(self, inputs: dict, labels: torch.Tensor, pair_index: torch.Tensor | None):
        """(policy log-probs, policy token counts, reference log-probs or None), each over the 2B rows."""
        if self.reference == "in_forward":
            hidden, ref_hidden = self.model.lm_hidden_states_with_reference(**inputs)
            with torch.no_grad():
                ref, _ = self._from_hidden(ref_hidden, labels)
            logps, n = self._from_hidden(hidden, labels)
            return logps, n, ref
        logps, n = self.policy_logps(inputs, labels)
        if self.reference == "parts_off":
            with torch.no_grad(), self.reference_off():
                ref, _ = self.policy_logps(inputs, labels)
            return logps, n, ref
        if self.reference == "precomputed":
            if self.table is None or pair_index is None:
                raise SidetuneError("this preference run's reference log-probabilities were not precomputed; train "
                                    "it with `sidetune train`, which computes them before the first step")
            ref = self.table.to(logps.device)[pair_index]  # (B, 2): chosen, rejected
            return logps, n, torch.cat([ref[:, 0], ref[:, 1]])
        return logps, n, None

    # ----- the step

    def forward(self, input_ids=None, attention_mask=None, labels=None, pair_index=None, **kwargs):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logps, n, ref = self._logps_with_reference(inputs, labels, pair_index)
        half = logps.shape[0] // 2
        if self.objective == "dpo":
            losses, chosen_r, rejected_r = dpo_loss(logps[:half], logps[half:], ref[:half], ref[half:], self.beta,
                                                    self.label_smoothing)
        else:
            avg = logps / n.clamp(min=1)
            losses, chosen_r, rejected_r = simpo_loss(avg[:half], avg[half:], self.beta, self.gamma,
                                                      self.label_smoothing)
        loss = losses.mean()
        pairs = {"chosen_rewards": chosen_r, "rejected_rewards": rejected_r,
                 "chosen_logps": logps[:half].detach(), "rejected_logps": logps[half:].detach()}
        if self.training:
            self._accumulate(pairs)
        return LMOutput(loss=loss, logits=None, pairs=pairs)

    def reference_logps(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> torch.Tensor:
        """The reference log-probabilities of a batch's 2B rows (no grad): the starting model's, by the method's
        declared way; `precompute` runs this once over the data for `precomputed` (the policy at step 0)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with torch.no_grad():
            if self.reference == "in_forward":
                _, ref_hidden = self.model.lm_hidden_states_with_reference(**inputs)
                return self._from_hidden(ref_hidden, labels)[0]
            if self.reference == "parts_off":
                with self.reference_off():
                    return self.policy_logps(inputs, labels)[0]
            return self.policy_logps(inputs, labels)[0]

    # ----- metrics between log rows (kept on the device: no host sync per step)

    def _accumulate(self, pairs: dict[str, torch.Tensor]) -> None:
        c, r = pairs["chosen_rewards"].float(), pairs["rejected_rewards"].float()
        new = {"pairs": torch.tensor(float(c.numel()), device=c.device), "rewards_chosen": c.sum(),
               "rewards_rejected": r.sum(), "rewards_accuracy": (c > r).float().sum(), "rewards_margin": (c - r).sum(),
               "logps_chosen": pairs["chosen_logps"].float().sum(),
               "logps_rejected": pairs["rejected_logps"].float().sum()}
        for k, v in new.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v

    def take_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Means over the pairs since the last call, summed over the processes by `reduce` (a collective: every
        process calls it at the same step), then reset."""
        if not self._sums:
            return {}
        keys = list(self._sums)
        total = reduce(torch.stack([self._sums[k] for k in keys]))
        self._sums = {}
        n = max(total[keys.index("pairs")].item(), 1.0)
        return {k: total[i].item() / n for i, k in enumerate(keys) if k != "pairs"}


def pair_metrics(sums: dict[str, float], prefix: str = "eval_") -> dict[str, float]:
    """Eval means from summed per-pair tensors (see `PairMeter`)."""
    n = max(sums.get("pairs", 0.0), 1.0)
    return {f"{prefix}{k}": v / n for k, v in sums.items() if k != "pairs"}


class PairMeter:
    """Sums of the eval's per-pair rewards (gathered per batch by the caller)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_logps: torch.Tensor,
            rejected_logps: torch.Tensor) -> None:
        c, r = chosen.float(), rejected.float()
        for k, v in (("pairs", float(c.numel())), ("rewards_chosen", c.sum().item()),
                     ("rewards_rejected", r.sum().item()), ("rewards_accuracy", (c > r).float().sum().item()),
                     ("rewards_margin", (c - r).sum().item()), ("logps_chosen", chosen_logps.float().sum().item()),
                     ("logps_rejected", rejected_logps.float().sum().item())):
            self.sums[k] = self.sums.get(k, 0.0) + v


# ---------------------------------------------------------------------------------------------------------------------
# Precomputed reference log-probabilities


def compute_table(module: PreferenceModule, datasets_: list, collate, batch_size: int,
                  device: torch.device, autocast=None) -> torch.Tensor:
    """(pairs, 2) reference log-probs over every pair of `datasets_` (train, eval), by pair_index, with the model
    as it is now (the starting model). Every process computes all of it: one pass, before the first step."""
    from torch.utils.data import DataLoader

    total = sum(len(d) for d in datasets_ if d is not None)
    table = torch.zeros(total, 2, dtype=torch.float32)
    was_training = module.training
    module.eval()
    try:
        for ds in datasets_:
            if ds is None:
                continue
            for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate):
                index = batch.pop("pair_index")
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                    ref = module.reference_logps(**batch).float().cpu()
                half = ref.shape[0] // 2
                table[index] = torch.stack([ref[:half], ref[half:]], dim=1)
    finally:
        module.train(was_training)
    return table


def write_table(path: Path, table: torch.Tensor) -> None:
    """The table as safetensors (the run directory writes it atomically: checkpoint.write_file)."""
    save_file({"reference_logps": table.contiguous()}, str(path), metadata={"written_by": "sidetune"})


def read_table(path: Path, pairs: int) -> torch.Tensor:
    table = load_file(str(path)).get("reference_logps")
    if table is None or table.shape != (pairs, 2):
        raise SidetuneError(f"{path} does not hold this run's {pairs} reference log-probabilities (shape "
                            f"{None if table is None else tuple(table.shape)}); resume with the run's own data, or "
                            f"start the run again (train.overwrite=true)")
    return table
