"""The tasks sidetune trains, as objects: what a config's `data.task` means to the model loader, the collator, the
loss and the metrics. Code asks a Task (`task.classifies`, `task.shift_labels`) instead of comparing task names.

This module imports nothing of sidetune but its errors, so models, data, methods and the trainer can all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidetune.errors import SidetuneError

# Module names a classification head goes by in transformers (BERT/RoBERTa, Llama/GPT-2, BART, QA). A quantized base
# never quantizes them, and every method trains a freshly initialised one.
HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")


@dataclass(frozen=True)
class Task:
    """One kind of supervised example and what follows from it."""

    name: str
    # transformers Auto class the model is loaded with (by name, so that importing this module stays cheap).
    auto_class: str
    # True: the label is a class id per example and the model ends in a classification head.
    classifies: bool
    # True: causal LM, position t is scored against token t + 1 (labels are the inputs, shifted by the loss).
    shift_labels: bool
    # True: source and target are separate sequences (encoder-decoder).
    seq2seq: bool = False
    # True: rows are conversations (a list of messages) rendered with the tokenizer's chat template; the loss is on
    # the assistant turns (sidetune.chat). For the model, the loss and the metrics this is a causal LM.
    conversational: bool = False
    # True: rows are preference pairs (a prompt, a chosen and a rejected answer; sidetune.pairs). A batch holds the
    # chosen answers then the rejected ones (2B rows, one forward), and a train.objective (dpo, simpo) scores them.
    pairs: bool = False

    @property
    def generates(self) -> bool:
        """The model ends in an LM head and can decode text."""
        return not self.classifies

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def collator(self, tokenizer):
        """Dynamic padding per batch; LM labels are padded with -100 so that padding never counts in the loss.
        Packed rows (data.packing, sidetune.data.pack) are padded without an attention mask: see `LMCollator`."""
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

        if self.classifies:
            return DataCollatorWithPadding(tokenizer, return_tensors="pt")
        if self.pairs:
            return PairCollator(tokenizer.pad_token_id)
        return LMCollator(tokenizer.pad_token_id, DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100,
                                                                             return_tensors="pt"))

    def loss_weight(self, labels):
        """How many targets a batch's mean loss averages over: examples, or labelled (next) tokens."""
        if self.classifies:
            return labels.shape[0]
        if self.pairs:  # a preference loss is a mean over pairs: the chosen rows are the first half
            return labels.shape[0] // 2
        targets = labels[:, 1:] if self.shift_labels else labels
        return (targets != -100).sum()


class LMCollator:
    """Pads a batch of LM rows: packed rows (they carry position_ids) here, to the batch's longest; ordinary rows
    through `unpacked` (DataCollatorForSeq2Seq).

    A packed batch has no attention_mask: transformers reads the examples in a row from the position ids only when
    the mask is absent. Padding gets label -100 and position 0 at every padded slot, so each one is a sequence of its
    own (it joins no example and attends only to itself: no NaN row) and the real tokens of a row end at its last
    nonzero position (`batch_tokens`).
    """

    def __init__(self, pad_id: int | None, unpacked) -> None:
        self.pad_id = pad_id if pad_id is not None else 0
        self.unpacked = unpacked

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if "position_ids" not in features[0]:
            return self.unpacked(features)
        width = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_id, "labels": -100, "position_ids": 0}
        return {key: torch.tensor([list(f[key]) + [pad] * (width - len(f[key])) for f in features])
                for key, pad in pads.items()}


class PairCollator:
    """Pads a batch of preference pairs (sidetune.pairs) into one batch of 2B rows, the B chosen answers then the B
    rejected ones, so that the policy scores both in one forward (as TRL concatenates them). Right padding, label
    -100 and mask 0 on padding; `pair_index` (B) is each pair's row in the data, which finds its precomputed
    reference log-probabilities (sidetune.preference)."""

    def __init__(self, pad_id: int | None) -> None:
        self.pad_id = pad_id if pad_id is not None else 0

    def __call__(self, features: list[dict]) -> dict:
        import torch

        rows = [(f["chosen_input_ids"], f["chosen_labels"]) for f in features]
        rows += [(f["rejected_input_ids"], f["rejected_labels"]) for f in features]
        width = max(len(ids) for ids, _ in rows)
        pad = [width - len(ids) for ids, _ in rows]
        return {
            "input_ids": torch.tensor([list(ids) + [self.pad_id] * n for (ids, _), n in zip(rows, pad)]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * n for (ids, _), n in zip(rows, pad)]),
            "labels": torch.tensor([list(labels) + [-100] * n for (_, labels), n in zip(rows, pad)]),
            "pair_index": torch.tensor([int(f["pair_index"]) for f in features]),
        }


def batch_tokens(batch: dict):
    """The real (unpadded) tokens of a collated batch, as a device tensor (no host sync): the attention mask's sum,
    or for packed rows (no mask) each row's length up to its last nonzero position (see LMCollator)."""
    import torch

    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    if "position_ids" in batch:
        pos = batch["position_ids"]
        slot = torch.arange(1, pos.shape[-1] + 1, device=pos.device)
        return (slot * (pos > 0)).amax(-1).sum()  # per row: 1 + the index of its last nonzero position
    return batch["input_ids"].numel()


TASKS: dict[str, Task] = {
    "classification": Task("classification", "AutoModelForSequenceClassification", classifies=True,
                           shift_labels=False),
    "causal_lm": Task("causal_lm", "AutoModelForCausalLM", classifies=False, shift_labels=True),
    "chat": Task("chat", "AutoModelForCausalLM", classifies=False, shift_labels=True, conversational=True),
    "preference": Task("preference", "AutoModelForCausalLM", classifies=False, shift_labels=True, pairs=True),
    "seq2seq": Task("seq2seq", "AutoModelForSeq2SeqLM", classifies=False, shift_labels=False, seq2seq=True),
}


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except KeyError:
        raise SidetuneError(f"data.task={name!r} is unknown; use one of {', '.join(TASKS)}") from None
