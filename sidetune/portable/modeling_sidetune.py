"""A sidetune run as a transformers model, loadable without sidetune:

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)
    AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)   (a classifier run)

`sidetune export RUN --hf OUT` writes this file, the modules it imports (side_network.py, adapters.py, common.py),
config.json, the weights (model.safetensors) and the tokenizer into OUT. config.json holds the base model's own
config (`text_config`) and what the method adds at forward time (`sidetune`, written by the method's `hf_export`):

- lst: the side network beside the frozen backbone (side_network.SideStack: ladders, gates, side blocks), `up` and
  the merge h_final + up(side) before the LM head (or the classifier's pooling). Generation keeps the backbone's
  KV cache and the side blocks' keys and values (a SideCache riding on the backbone's cache object).
- prefix (prefix_tuning, ptuning_v2): P trained keys and values per layer, put at the front of the KV cache, so the
  model's own attention reads them; the cache then grows by the tokens, as any KV cache does.
- soft_prompt (prompt_tuning, ptuning_v1): P trained input embeddings before the input; the prompt encoder of
  P-tuning was run once at export (its output is a fixed P x d matrix).
- adapter: bottleneck adapters wrapped around the backbone's projections (adapters.py), then the model's own forward.

The base model is built from `text_config` with the transformers class of its own type, so any family transformers
knows works, and its weights sit under `backbone.` in the same names as in a plain checkpoint of that family.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging as hf_logging

from .adapters import FFNInput, ParallelAdapter, ParallelOutputAdapter, SequentialAdapter
from .common import head_logits, pool
from .side_network import SideCache, SideStack, capture, side_inv_freq

# transformers 5.24 renamed the KV cache argument and output field `past_key_values` -> `cache`.
CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class SidetuneConfig(PretrainedConfig):
    model_type = "sidetune"
    sub_configs: ClassVar[dict] = {"text_config": AutoConfig}

    def __init__(self, text_config: dict | PretrainedConfig | None = None, sidetune: dict | None = None,
                 **kwargs) -> None:
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.sidetune = sidetune or {}
        if text_config is not None:  # what generation and the tokenizer read from the top-level config
            for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "num_labels", "id2label",
                        "label2id", "problem_type", "tie_word_embeddings"):
                if key not in kwargs and hasattr(text_config, key):
                    kwargs[key] = getattr(text_config, key)
        super().__init__(**kwargs)


def _cache_of(kwargs: dict) -> Any:
    return kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)


class SidetunePreTrainedModel(PreTrainedModel):
    config_class = SidetuneConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_attention_backend = True
    # The method's parts were trained in fp32 beside a maybe-bf16 base: they stay fp32 whatever dtype loads.
    # (transformers matches these as substrings of parameter names: hence the distinctive names.)
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["side_network", "side_up", ".adapter.", "prefix_kv",
                                                         "soft_prompt"]

    def __init__(self, config: SidetuneConfig, auto_class) -> None:
        super().__init__(config)
        spec = config.sidetune
        self.kind = spec["kind"]
        self.spec = spec
        self.backbone = auto_class.from_config(config.text_config)
        if self.kind == "lst":
            stack = spec["stack"]
            inv_freq = torch.tensor(stack["inv_freq"], dtype=torch.float32) if stack["inv_freq"] else None
            shape = SimpleNamespace(**{**stack["shape"], "biases": frozenset(stack["shape"]["biases"]),
                                       "rel_bias": None})
            self.side_network = SideStack(stack["d"], shape, stack["tapped"], stack["gate_temperature"], 0.0, 0.0, inv_freq,
                                  stack["rope_scaling"])
            self.side_up = nn.Linear(shape.d, spec["d_out"], bias=False)
        elif self.kind == "prefix":
            layers, heads, head_dim = spec["kv_layout"]
            self.prefix_kv = nn.Parameter(torch.zeros(layers, 2, heads, spec["num_virtual_tokens"], head_dim))
        elif self.kind == "soft_prompt":
            self.soft_prompt = nn.Parameter(torch.zeros(spec["before"] + spec["after"], spec["d"]))
        elif self.kind == "adapter":
            _wrap_adapters(self.backbone, spec["adapters"])
        else:
            raise ValueError(f"unknown sidetune export kind {self.kind!r}; export the run again with this sidetune")
        if spec.get("base_ref"):  # the base's weights come from its own directory (from_pretrained below)
            self._keys_to_ignore_on_load_missing = [r"^backbone\."]
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        config = kwargs.get("config")
        if not isinstance(config, SidetuneConfig):
            config = SidetuneConfig.from_pretrained(*args[:1], **{k: v for k, v in kwargs.items()
                                                                   if k in ("trust_remote_code", "revision")})
        if not config.sidetune.get("base_ref"):
            return super().from_pretrained(*args, **kwargs)
        # The base's weights are absent here by design, and the base's task head (if any) comes from here:
        # transformers' reports of missing weights would only mislead.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = super().from_pretrained(*args, **kwargs)
            model._attach_base(config.sidetune["base_ref"])
        finally:
            hf_logging.set_verbosity(verbosity)
        return model

    def _attach_base(self, ref: dict) -> None:
        """An export that refers to its base (`sidetune export --base-ref`): load the base from its directory as the
        run loaded it (4-bit with bitsandbytes for a Q-LST run), wrap the adapters again, and put the run's own
        backbone tensors (a task head, adapters), loaded from this directory, into it."""
        kwargs: dict[str, Any] = {"dtype": getattr(torch, ref["dtype"])}
        if ref.get("quantization"):
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(ref["quantization"])
            kwargs["device_map"] = {"": next(self.parameters()).device}
        base = type(self.backbone).from_pretrained(ref["path"], config=self.config.text_config, **kwargs)
        for module in base.modules():
            # bitsandbytes repacks 4-bit weights for a bf16 CPU kernel in eval mode: keep the kernel the run used.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        if self.kind == "adapter":
            _wrap_adapters(base, self.spec["adapters"])
        with torch.no_grad():
            for name in ref["saved"]:
                target = base.get_parameter(name)
                target.data = self.backbone.get_parameter(name).data.to(target.device)
        self.backbone = base.eval()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from the checkpoint; what is left are the side network's rotary frequencies, a buffer
        computed from config (transformers builds the model on the meta device, so it must be filled here)."""
        if isinstance(module, SideStack) and module.inv_freq is not None:
            stack = self.spec["stack"]
            full = torch.tensor(stack["inv_freq"], dtype=torch.float32, device=module.inv_freq.device)
            module.inv_freq.copy_(side_inv_freq(full, stack["shape"]["rope_dims"]))

    # ----- the method's forward-time parts

    def _body_inputs(self, input_ids, attention_mask, position_ids, inputs_embeds, cache, use_cache, kwargs):
        """The inputs of the backbone (or its body) for this kind: the prefix goes into the cache, the soft prompt
        before the embeddings. Returns (inputs, cache, virtual tokens added in front of the outputs)."""
        ref = input_ids if input_ids is not None else inputs_embeds
        b, t = ref.shape[:2]
        inputs = dict(kwargs, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=use_cache)
        if self.kind == "prefix":
            p = self.spec["num_virtual_tokens"]
            if cache is None:
                cache = DynamicCache(config=self.config.text_config)
            if cache.get_seq_length() == 0:  # a fresh cache starts as the prefix
                dtype = self.backbone.get_input_embeddings().weight.dtype
                for layer, (k, v) in enumerate(self.prefix_kv.to(dtype)):
                    cache.update(k.expand(b, *k.shape), v.expand(b, *v.shape), layer)
            seen = cache.get_seq_length() - p
            if attention_mask is None:
                attention_mask = torch.ones(b, seen + t, dtype=torch.long, device=ref.device)
            if position_ids is None:
                position_ids = (torch.arange(seen, seen + t, device=ref.device)[None].expand(b, -1)
                                + self.spec["position_offset"])
            if self.spec["shift_positions"]:
                position_ids = position_ids + p
            inputs.update(attention_mask=torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1),
                          position_ids=position_ids, use_cache=True)
            return inputs, cache, 0
        if self.kind == "soft_prompt":
            p = self.spec["before"] + self.spec["after"]
            fresh = cache is None or cache.get_seq_length() == 0
            seen = 0 if fresh else cache.get_seq_length() - p
            embeds = self.backbone.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
            if attention_mask is None:
                attention_mask = torch.ones(b, seen + t, dtype=torch.long, device=ref.device)
            mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
            if fresh:
                embeds = torch.cat([self.soft_prompt.to(embeds.dtype).expand(b, -1, -1), embeds], dim=1)
            # Positions that skip pads, as sidetune's soft prompt numbers them.
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
            inputs.update(input_ids=None, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
            return inputs, cache, p if fresh else 0
        return inputs, cache, 0

    def _lst_hidden(self, inputs: dict, cache) -> torch.Tensor:
        """h_final + up(side): the backbone's body runs with its KV cache, the side network with its own."""
        side_cache = None
        if cache is not None:
            side_cache = getattr(cache, "sidetune_side", None)
            if side_cache is None or cache.get_seq_length() == 0:
                side_cache = cache.sidetune_side = SideCache()
            if side_cache.seen != cache.get_seq_length():
                raise ValueError("the side network's cache and the backbone's disagree (a cropped or reordered "
                                 "cache); generate again from the start")
        layers = self.backbone.get_submodule(self.spec["layers"])
        tapped = self.side_network.tapped
        ladder_of = {-1: 0, **{i: j + 1 for j, i in enumerate(tapped)}}
        with capture(layers, tapped, lambda key, h: self.side_network.project(ladder_of[key], h)) as taps:
            out = self.backbone.base_model(**inputs, **{CACHE: cache})
        final = out.last_hidden_state
        mask = inputs.get("attention_mask")
        if mask is not None and bool(mask.all()):  # generate's all-ones mask: SDPA's own causal path, no mask tensor
            mask = None
        side = self.side_network(taps[-1], [taps[i] for i in tapped], mask, cache=side_cache,
                                 position_ids=inputs.get("position_ids"))
        up = self.side_up(side)
        if self.spec.get("classifier_input") == "side":
            return up
        return final + up.to(final.dtype)


class SidetuneForCausalLM(SidetunePreTrainedModel, GenerationMixin):
    def __init__(self, config: SidetuneConfig) -> None:
        super().__init__(config, AutoModelForCausalLM)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        cache = _cache_of(kwargs)
        if self.kind == "lst" and use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        inputs, cache, virtual = self._body_inputs(input_ids, attention_mask, position_ids, inputs_embeds, cache,
                                                   bool(use_cache), kwargs)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(virtual, None)
        if self.kind == "lst":
            hidden = self._lst_hidden(inputs, cache)[:, keep]
            logits = self.backbone.get_output_embeddings()(hidden)
            softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
        else:
            out = self.backbone(**inputs, **{CACHE: cache}, logits_to_keep=logits_to_keep)
            cache = getattr(out, CACHE, None) or cache
            logits = out.logits if logits_to_keep else out.logits[:, virtual:]
        loss = None
        if labels is not None:  # next-token: position t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: cache if use_cache else None})


class SidetuneForSequenceClassification(SidetunePreTrainedModel):
    def __init__(self, config: SidetuneConfig) -> None:
        super().__init__(config, AutoModelForSequenceClassification)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        kwargs.pop("use_cache", None)
        cache = _cache_of(kwargs)
        inputs, cache, _ = self._body_inputs(input_ids, attention_mask, kwargs.pop("position_ids", None),
                                             kwargs.pop("inputs_embeds", None), cache, False, kwargs)
        pooling = self.spec.get("pooling")
        if self.kind == "lst":
            hidden = self._lst_hidden(inputs, None)
        elif pooling is not None:  # the method's own readout (sidetune/methods/_readout.py): the body's states
            hidden = self.backbone.base_model(**inputs, **{CACHE: cache}).last_hidden_state
        else:  # the model's own head
            out = self.backbone(**inputs, **{CACHE: cache})
            return SequenceClassifierOutput(loss=_classifier_loss(self.config, out.logits, labels),
                                            logits=out.logits)
        logits = head_logits(self.backbone.get_submodule(self.spec["classifier"]),
                             pool(hidden, attention_mask, pooling))
        return SequenceClassifierOutput(loss=_classifier_loss(self.config, logits, labels), logits=logits)


def _classifier_loss(config, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The loss transformers' classifiers take: regression, single- or multi-label, from config.problem_type or the
    label dtype."""
    if labels is None:
        return None
    kind = config.problem_type or ("regression" if logits.shape[-1] == 1 else "single_label_classification"
                                   if not labels.is_floating_point() else "multi_label_classification")
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    if kind == "single_label_classification":
        return F.cross_entropy(logits.float(), labels)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def _wrap_adapters(model: nn.Module, adapters: list[dict]) -> None:
    """Wrap the modules the run wrapped, as sidetune/methods/adapter.py did (names, widths and kinds from config)."""
    slots: dict[str, dict] = {}
    for a in adapters:
        parent_name, _, child = a["name"].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if a["kind"] == "ffn_input":
            setattr(parent, child, FFNInput(base, slots.setdefault(a["name"], {})))
            continue
        kw = dict(dim=a["dim"], width=a["width"], activation=a["activation"], dropout=0.0, scaling=a["scaling"])
        if a["kind"] == "parallel_output":
            new = ParallelOutputAdapter(base, slots.setdefault(a["input"], {}), **kw)
        elif a["kind"] == "parallel":
            new = ParallelAdapter(base, **kw)
        else:
            new = SequentialAdapter(base, **kw)
        setattr(parent, child, new)
