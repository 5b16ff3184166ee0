"""The one protocol every method implements, the context `apply` receives, and the documented defaults of the
optional capabilities. The trainer, `profile`, `plan`, `export` and the contract tests read a method only through
these names: no `getattr` probing, no method-specific branch anywhere else.

A method file defines a config dataclass (its `name` field selects it; `__post_init__` validates it, so a bad
setting fails when the config is parsed, before any model loads) and a class that subclasses `Method` to take the
defaults below and overrides what it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from sidetune.errors import SidetuneError
from sidetune.tasks import Task, get_task


@dataclass
class Context:
    """What a method may know when it builds: the task, the tokenizer, the label names, and calibration data."""

    task: Task
    # Loads the run's tokenizer on first use of `tokenizer` (a prediction on fake tensors never needs one unless the
    # method asks, e.g. for its prompt's token ids).
    load_tokenizer: Callable[[], Any] | None = None
    label_names: list[str] | None = None  # class names for classification / label choices (data.label_names)
    # Batches of training data already on the model's device, as the trainer's collator makes them. Present when
    # the method's `calibration_batches` is > 0 and the build has data; empty otherwise.
    calibration: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # A reload of a finished run or checkpoint: the trainable set and `Method.changed_base` are loaded over whatever
    # `apply` initialises, so a data-dependent init is skipped (there is no calibration data then).
    reload: bool = False
    # The run's quantizer of one float nn.Linear (models.quantizer), given when the base is quantized after `apply`
    # (`Method.reads_float_base`); None when the base loaded as the run trains it.
    quantize: Callable[[nn.Module], nn.Module] | None = None
    _tokenizer: Any = field(default=None, repr=False)

    @classmethod
    def for_task(cls, task: str | Task, tokenizer: Any = None, **kw) -> Context:
        return cls(get_task(task), _tokenizer=tokenizer, **kw)

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.load_tokenizer is not None:
            self._tokenizer = self.load_tokenizer()
        if self._tokenizer is None:
            raise SidetuneError("this method needs the run's tokenizer, and none was given")
        return self._tokenizer

    def batches(self, method: str, n: int) -> Iterator[dict[str, torch.Tensor]]:
        """The first `n` calibration batches, or one clear line when the build had none."""
        if not self.calibration:
            raise SidetuneError(f"method {method} needs calibration batches from the training data; build it with "
                                f"data (sidetune train), or choose another method.init")
        yield from self.calibration[:n]


@dataclass
class HFExport:
    """What `sidetune export --hf` needs of a trained module that cannot merge (sidetune/portable/modeling_sidetune.py
    reads it back): `spec`, the method's section of config.json (its `kind` picks the forward-time code there), the
    transformers model the method runs around (`backbone`: its state dict is saved under `backbone.`, adapters
    wrapped inside it included), and the method's own tensors by their names in the exported model."""

    spec: dict[str, Any]
    backbone: nn.Module
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(Protocol):
    """A fine-tuning method. Required: `name`, `Config`, `__init__(self, cfg)` and `apply(model, ctx)`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    # The data.tasks it trains (a task outside this set is refused in one line before the model loads).
    tasks: ClassVar[frozenset[str]] = frozenset({"classification", "causal_lm", "chat", "seq2seq", "preference"})
    # False when no gradient flows through the backbone (LST): the backbone may run in eval mode with dropout off,
    # gradient checkpointing of it is pointless, and `plan` does not propose it.
    backbone_trains: ClassVar[bool] = True
    # Memory-cutting variants `sidetune plan` may propose: a description mapped to method-config overrides.
    plan_options: ClassVar[dict[str, dict[str, Any]]] = {}
    # True when the method trains on packed rows (data.packing): several examples in one row, kept apart only by
    # position ids that restart at 0 (transformers then builds a block-diagonal causal mask). False for methods
    # that add virtual tokens or prefixes to a row: one set of them cannot belong to several examples. Default True.
    packing: ClassVar[bool] = True

    cfg: Any  # the method's Config instance; the class defines __init__(self, cfg)

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Freeze the backbone, add the trainable parts, return the module to train. Its forward(**batch) returns
        an object with `.loss` and `.logits`. The trainable set is what is left with requires_grad=True."""
        ...

    # ----- optional capabilities, with their defaults -----

    def model_task(self, task: Task) -> Task:
        """The task whose model class to load (PET classifies with a causal LM's own head). Default: `task`."""
        return task

    def calibration_batches(self) -> int:
        """How many training batches `apply` needs in `ctx.calibration` (LoRA-GA, Fisher pruning). Default 0."""
        return 0

    def changed_base(self, model: nn.Module) -> list[str]:
        """Names of the frozen parameters of the applied `model` whose values `apply`'s init changed from the loaded
        base (LoRA-GA subtracts its initial B A from W). A run stores them beside the trainable set, and a reload
        (`Context.reload`) copies them back instead of recomputing the init, which would need the training data and
        whose SVD depends on the device. Default none."""
        return []

    def reads_float_base(self) -> bool:
        """True when `apply`'s init must read the 16-bit weights of a quantized base (LoftQ fits A, B to the
        quantization error of W, which the 4-bit bytes no longer hold). The build then loads the base unquantized,
        hands `apply` the run's quantizer (`Context.quantize`), and quantizes the frozen linears `apply` left in
        float after it. A reload reads the stored 4-bit base (`changed_base`) and loads quantized as usual.
        Default False."""
        return False

    def param_groups(self, model: nn.Module, lr: float) -> list[dict] | None:
        """Optimizer parameter groups (LoRA+ gives B a larger lr). Default None: one group at `lr`."""
        return None

    def head_modules(self, module: nn.Module) -> list[nn.Module]:
        """Modules of the trained module that the memory accounting counts as "head" (logits, loss) rather than
        "method", beyond the model's own output embedding and task head. Default none."""
        return []

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the trained parts into the base weights and return a plain transformers model (`sidetune export
        --merge`). Default: this method adds computation no weight can absorb, so it refuses in one line."""
        raise SidetuneError(f"method {self.name!r} cannot be merged into the base weights (only updates that are "
                            f"linear in them, like LoRA's, can); serve the run with sidetune.load(RUN_DIR) instead")

    def peft_config(self, model: nn.Module) -> dict[str, Any] | None:
        """The method-specific fields of a PEFT adapter_config.json for the trained `model`, whose trainable
        parameter names (under PEFT's `base_model.model.` prefix) are the adapter's keys (`sidetune export --peft`,
        sidetune/peft_io.py). Default None: the method has no PEFT format, and export refuses in one line."""
        return None

    def hf_export(self, model: nn.Module) -> HFExport | None:
        """The trained `model` as a self-contained transformers directory's parts (`sidetune export --hf`). Default
        None: the method's update lives in the weights, so `--hf` writes the merged model (`merge`), or refuses in
        one line where that cannot be done either."""
        return None

    def reference(self, from_trained: bool) -> str:
        """Where a preference objective (train.objective=dpo) gets the reference model's log-probabilities: those of
        the model as training starts (sidetune.preference).

        "in_forward": the applied module's `lm_hidden_states_with_reference` returns the reference's final hidden
        state beside the policy's, from the same forward (LST: the frozen backbone's, which its side network reads
        anyway). "parts_off": a second, no-grad forward inside `reference_off(model)`, where the method's parts
        contribute nothing (right when step 0 is the frozen model). "precomputed": one pass over the training and
        eval pairs before the first step, kept in the run directory.
        from_trained: the run starts from trained weights (model.init_from), so the starting model is not the frozen
        base. Default "precomputed", right for every method."""
        return "precomputed"

    def reference_off(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """For reference "parts_off": a context in which the applied `model` computes the frozen model (its parts
        switched off). Default: the method has no such switch, so it refuses in one line."""
        raise SidetuneError(f"method {self.name!r} cannot switch its parts off; its reference is precomputed")

    def start_exact(self, task: Task) -> dict[str, Any] | None:
        """Method-config overrides under which step 0 equals the frozen model on `task` (the contract test checks
        it), or None where the method cannot start there (its file says why). Default {}: it always does."""
        return {}


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable set, by parameter name: what the optimizer updates and a checkpoint stores."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
