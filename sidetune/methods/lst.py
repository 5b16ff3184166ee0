"""LST: ladder side-tuning (Sung, Cho & Bansal, 2022, arXiv 2206.06522); Q-LST when the backbone is 4-bit, as in
QST (Zhang et al., 2024, arXiv 2401.07159).

A side network of width d/r runs beside the frozen backbone and reads the output h_i of each tapped backbone block
through a trainable ladder (a down-projection d -> d/r and a learned gate):

    s = down_0(embeddings)
    for each tapped block i:   s = g_i * s + (1 - g_i) * down_i(h_i),   g_i = sigmoid(alpha_i / T)   (alpha_i = 0)
                               s = side_block_i(s)
    out = up(norm(s))                                                                          (d/r -> d)

Causal LM / seq2seq: logits = lm_head(h_final + out), with up = 0 at the start, so step 0 is exactly the frozen model.
Classification: the (trainable) classifier reads pool(h_final + out) (`classifier_input: sum`, a linear probe of the
frozen features at step 0) or pool(out) alone (`side`, the LST paper's setting). T5: the side decoder cross-attends
to the side encoder. The side blocks start as a structurally pruned copy of the backbone blocks (`_lst_prune.py`).

The backbone runs under torch.no_grad and in eval mode: nothing in it requires grad, autograd saves nothing inside it
and backward never enters it. Each tap is projected by its ladder as the backbone emits it (a hook), so no B x T x d
tap outlives its block. What a training step still stores: one B x T x d ladder input per tapped block (down_i
needs it for its weight gradient; `ladder_grad_input: int8` keeps an int8 copy with a row scale instead, and
`ladder_offload` keeps it in host memory on CUDA), the side blocks' inputs (side-only recomputation, on by default)
or all their activations, and the LM head's logits (chunk those with train.loss_chunk_size). The side network is read from the model's own config and modules
(`_lst_blocks.py`), so any decoder with the usual layout works. `generate` keeps transformers' KV cache for the
backbone and a K/V cache per side block, so a new token costs one token's forward through both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput, Seq2SeqLMOutput

from sidetune.compat import cache_kwargs, returned_cache
from sidetune.distributed import ShardsLikeInner
from sidetune.errors import SidetuneError
from sidetune.fields import check_positive, opt
from sidetune.methods._decode import decode_rows, special_tokens, stop_on_strings, unpadded_rows
from sidetune.methods._inject import freeze, head_module_names
from sidetune.methods._lst_blocks import SideCache, SideStack, Stack, Unmapped, capture, stacks_of, tapped_layers
from sidetune.methods._lst_prune import fisher_scores, init_pruned, keep_hidden
from sidetune.methods._readout import classifier_name, classify, pool
from sidetune.methods.base import Context, HFExport, Method
from sidetune.tasks import Task


@dataclass
class LSTConfig:
    name: Literal["lst"] = opt("lst", "Selects this method.")
    r: int = opt(
        8,
        "Reduction factor: side blocks are d/r wide, with head dims and MLP width divided by r (the paper: 8; "
        "QST: 16).",
    )
    side_layers: str | list[int] = opt(
        "all",
        "Backbone blocks that feed a ladder and get a side block: \"all\", \"every:K\" (every K-th block counting "
        "back from the last, which is always tapped) or a list of block indices (negative = from the end). T5: "
        "for both stacks.",
    )
    init: Literal["pruned", "pruned_fisher", "random"] = opt(
        "pruned",
        "pruned: side blocks, norms and ladders cut from the backbone by L1 structural pruning (the paper's "
        "choice); pruned_fisher: the same cut, units ranked by Fisher importance on calibration batches of the "
        "training data (Kwon et al. 2022); random: PyTorch's default init.",
    )
    fisher_batches: int = opt(8, "pruned_fisher: training batches the Fisher importance is summed over.")
    gate_temperature: float = opt(0.1, "Gate temperature T in g = sigmoid(alpha / T).")
    gate_init: float = opt(0.0, "Initial alpha of every gate (0 -> g = 0.5: half side state, half ladder input).")
    dropout: float = opt(0.0, "Dropout inside the side network (attention probabilities and residual branches).")
    backbone_dropout: bool = opt(
        False,
        "Run the backbone in train mode, dropout on. Off by default: no gradient reaches it, so its dropout only "
        "adds noise to the ladder inputs.",
    )
    gradient_checkpointing: bool = opt(
        True,
        "Recompute the side blocks in backward (the backbone is never recomputed: it stores nothing). Exact; costs "
        "one more side forward per step, small next to the backbone's.")
    ladder_grad_input: Literal["full", "int8"] = opt(
        "full",
        "What each ladder keeps of its B x T x d input for its weight gradient: full (exact) or int8 with one "
        "absmax scale per row (half of bf16; the forward is unchanged, only dW sees the rounded copy).")
    ladder_offload: bool = opt(
        False,
        "On CUDA, keep what the ladders save for their weight gradients (the B x T x d ladder inputs, or their int8 "
        "copies) in pinned host memory, copied back in backward: exact, and the GPU then holds no ladder input, "
        "the cost that grows with tokens (8.5 GiB of int8 at 128k tokens on Llama-3-8B, every:2). Costs one copy "
        "each way over PCIe per step; host memory holds them instead. A CPU run ignores it.")
    compile: bool = opt(False, "torch.compile each side block: small blocks are launch-bound on a GPU.")
    up_lr_ratio: float = opt(1.0, "Learning rate of the up-projection (d/r -> d, zero at the start) relative to "
                                  "train.lr.")
    ladder_lr_ratio: float = opt(1.0, "Learning rate of the ladders (down-projections and gates) relative to "
                                      "train.lr.")
    block_lr_ratio: float = opt(1.0, "Learning rate of the side blocks and the side output norm (pruned from the "
                                     "backbone's) relative to train.lr.")
    classifier_input: Literal["sum", "side"] = opt(
        "sum",
        "Classification: the classifier reads the backbone's final hidden state plus the side output (sum) or the "
        "side output alone (side).",
    )
    pooling: Literal["auto", "first", "last", "mean"] = opt(
        "auto",
        "Classification pooling: auto (first token for encoders, last real token for decoders), first, last or "
        "mean.",
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise SidetuneError(f"method.r must be >= 1, got {self.r}")
        if self.gate_temperature <= 0:
            raise SidetuneError(f"method.gate_temperature must be > 0, got {self.gate_temperature}")
        if not 0 <= self.dropout < 1:
            raise SidetuneError(f"method.dropout must be in [0, 1), got {self.dropout}")
        check_positive("method.fisher_batches", self.fisher_batches)
        for key in ("up_lr_ratio", "ladder_lr_ratio", "block_lr_ratio"):
            if not getattr(self, key) > 0:
                raise SidetuneError(f"method.{key} must be > 0, got {getattr(self, key)}")
        tapped_layers(self.side_layers, None)  # syntax check now; the range is checked against the model


class TaskHead(nn.Module):
    """Logits and loss from the merged hidden state, through the backbone's own LM head or classifier.

    Its role in the memory accounting is "head" (the logits and the loss are not the side network's cost: see
    LST.head_modules). It holds the backbone by reference, not as a child: the backbone is registered once, under
    LSTModel.backbone.
    """

    def __init__(self, backbone: nn.Module, task: Task, pooling: str) -> None:
        super().__init__()
        self.__dict__["backbone"] = backbone
        self.task, self.pooling = task, pooling
        c = backbone.config
        # T5 with tied embeddings rescales the decoder output before the LM head.
        self.scale = c.d_model**-0.5 if task.seq2seq and getattr(c, "scale_decoder_outputs", False) else None
        # Gemma2: logits = cap * tanh(logits / cap), as the model's own forward does after its LM head.
        self.softcap = getattr(c, "final_logit_softcapping", None)

    def forward(self, hidden, labels, attention_mask):
        if self.task.classifies:
            return self._classify(hidden, labels, attention_mask)
        if self.scale is not None:
            hidden = hidden * self.scale
        logits = self.backbone.get_output_embeddings()(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        loss = None
        if labels is not None:
            if self.task.shift_labels:  # next-token: position t predicts token t + 1
                logits_, labels_ = logits[:, :-1], labels[:, 1:]
            else:
                logits_, labels_ = logits, labels
            loss = F.cross_entropy(logits_.flatten(0, 1).float(), labels_.flatten(), ignore_index=-100)
        return (Seq2SeqLMOutput if self.task.seq2seq else CausalLMOutput)(loss=loss, logits=logits)

    def _classify(self, hidden, labels, attention_mask):
        return classify(self.backbone, pool(hidden, attention_mask, self.pooling), labels)


class LSTModel(ShardsLikeInner, nn.Module):
    """The module LST trains: the frozen backbone (run without grad), the side network(s), `up` and the task head."""

    def __init__(self, backbone: nn.Module, cfg: LSTConfig, task: Task,
                 calibration: list[dict[str, torch.Tensor]] = ()) -> None:
        super().__init__()
        self.backbone, self.cfg, self.task = backbone, cfg, task
        self.stacks: list[Stack] = stacks_of(backbone)
        d = self.stacks[-1].shape.d
        d_out = self.stacks[-1].out_dim or d  # the body's output width (OPT-350m projects it)
        if d // cfg.r < 1:
            raise SidetuneError(f"method.r={cfg.r} leaves no width of the model's {d}; use r <= {d}")
        shapes = [s.shape.reduced(cfg.r) for s in self.stacks]
        tapped = [tapped_layers(cfg.side_layers, len(s.layers)) for s in self.stacks]
        device = next(backbone.parameters()).device
        odd = [sh.head_dim for sh in shapes if sh.head_dim % 8]
        if device.type == "cuda" and odd:
            print(f"sidetune: LST's side attention has head dim {odd[0]} (the backbone's / method.r={cfg.r}); CUDA's "
                  f"fused attention kernels need a multiple of 8, so it runs in the math kernel (B x heads x T x T "
                  f"scores, as `sidetune plan` predicts); a smaller method.r keeps it fused")
        with torch.device(device):  # side modules are born on the backbone's device, in fp32 (master weights)
            sides = [SideStack(st.shape.d, sh, tp, cfg.gate_temperature, cfg.gate_init, cfg.dropout, st.inv_freq,
                               st.rope_scaling) for st, sh, tp in zip(self.stacks, shapes, tapped)]
            self.up = nn.Linear(shapes[-1].d, d_out, bias=False)
        self.side_encoder = sides[0] if len(sides) == 2 else None
        self.side = sides[-1]
        # auto pooling: an encoder's first token ([CLS]); a decoder's last real token, the only one that saw them all.
        pooling = cfg.pooling if cfg.pooling != "auto" else ("last" if self.stacks[-1].shape.causal else "first")
        self.head = TaskHead(backbone, task, pooling)
        keep, self.init_used = None, "random"
        if cfg.init != "random" and device.type != "meta":  # on meta (memory accounting) only shapes matter
            keep = self._init_pruned(sides, tapped, shapes,
                                      calibration if cfg.init == "pruned_fisher" and calibration else None)
        with torch.no_grad():
            if not task.classifies or cfg.classifier_input == "sum":
                self.up.weight.zero_()  # the side output starts at exactly 0: step 0 is the frozen model
            elif keep is not None and d_out == d:
                self.up.weight.zero_()
                self.up.weight[keep, torch.arange(len(keep), device=device)] = 1.0  # back to the kept coordinates
        if cfg.gradient_checkpointing:
            self.gradient_checkpointing_enable()
        for side in sides:
            side.set_ladder_storage(cfg.ladder_grad_input == "int8", cfg.ladder_offload)
        if cfg.compile:
            for side in sides:
                for block in side.blocks:
                    block.compile()

    def _init_pruned(self, sides: list[SideStack], tapped: list[list[int]], shapes,
                     calibration: list[dict] | None = None) -> torch.Tensor | None:
        """Pruned init, ranked by weight magnitude or, given calibration batches, by Fisher importance; a block
        layout it cannot map starts the side network from random init, with one line."""
        unmapped = next((s.unmapped for s in self.stacks if s.unmapped), None)
        if unmapped is None:
            try:
                scores = self._fisher(tapped, calibration) if calibration is not None else None
                keep = keep_hidden(self.stacks, tapped, shapes[-1].d, scores).to(self.up.weight.device)
                for k, (side, stack, shape) in enumerate(zip(sides, self.stacks, shapes)):
                    init_pruned(side, stack, shape, keep, scores.blocks[k] if scores is not None else None)
                self.init_used = "pruned" if scores is None else "pruned_fisher"
                return keep
            except (Unmapped, KeyError, RuntimeError) as e:  # a layout the reader misjudged: state dict mismatch
                unmapped = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                for side in sides:
                    for m in side.modules():
                        if hasattr(m, "reset_parameters") and m is not side:
                            m.reset_parameters()
        print(f"sidetune: LST cannot prune {self.backbone.config.model_type} blocks ({unmapped}); "
              f"the side network starts from random init (method.init=random)")
        return None

    def _fisher(self, tapped: list[list[int]], calibration: list[dict]):
        """Fisher scores of the backbone's units (`_lst_prune.fisher_scores`) for the task's loss on the frozen
        model's final hidden state, read as LST's head reads it at step 0 (T5: the model's own seq2seq loss). The
        backbone runs in eval mode, as it does under LST: dropout would only add noise to the scores."""
        def loss_of(batch):
            if self.side_encoder is not None:
                return self.backbone(**batch).loss
            hidden = self.backbone.base_model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state
            return self.head(hidden, batch.get("labels"), batch.get("attention_mask")).loss

        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return fisher_scores(self.stacks, tapped, loss_of, calibration)
        finally:
            self.backbone.train(was_training)

    @property
    def config(self):
        return self.backbone.config

    def train(self, mode: bool = True) -> LSTModel:
        super().train(mode)
        if not self.cfg.backbone_dropout:
            self.backbone.eval()  # no gradient flows into it, so its dropout would only be noise
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """train.gradient_checkpointing for LST: recompute the side blocks only (the backbone stores nothing)."""
        for side in (self.side_encoder, self.side):
            if side is not None:
                side.checkpointing = True

    def _inner(self) -> nn.Module:
        return self.backbone

    def forward(self, input_ids=None, attention_mask=None, labels=None, decoder_input_ids=None,
                decoder_attention_mask=None, **kwargs):
        if self.side_encoder is None:
            hidden = self.lm_hidden_states(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        else:
            enc, side_enc = self.encode(input_ids, attention_mask)
            if decoder_input_ids is None:
                decoder_input_ids = self.backbone.prepare_decoder_input_ids_from_labels(labels)
            hidden = self.decode(decoder_input_ids, enc, side_enc, attention_mask, decoder_attention_mask)
        return self.head(hidden, labels, attention_mask)

    def lm_hidden_states(self, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """The merged final hidden state (the chunked LM loss applies the LM head to it itself)."""
        if self.side_encoder is not None:
            raise SidetuneError("lm_hidden_states is for decoder-only models; T5 goes through forward()")
        final, downs = self._backbone(0, self.backbone.base_model,
                                      dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
        # Packed rows (data.packing) carry position_ids and no mask: the side blocks read the same examples there.
        side = self.side(downs[0], downs[1:], attention_mask, position_ids=kwargs.get("position_ids"))
        return self._merge(final, side)

    def lm_hidden_states_with_reference(self, input_ids=None, attention_mask=None,
                                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged final hidden state and the frozen backbone's own (detached), from one backbone forward: with
        `up` = 0 at the start, the backbone alone is the starting model, so its final hidden state through the LM
        head gives a DPO step's reference log-probabilities (sidetune.preference; `LST.reference`)."""
        if self.side_encoder is not None:
            raise SidetuneError("preference objectives are for decoder-only models")
        final, taps = self._backbone(0, self.backbone.base_model,
                                     dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
        side = self.side(taps[0], taps[1:], attention_mask, position_ids=kwargs.get("position_ids"))
        return self._merge(final, side), final

    def encode(self, input_ids, attention_mask):
        """T5: the backbone encoder's output and the side encoder's."""
        final, downs = self._backbone(0, self.backbone.encoder, dict(input_ids=input_ids, attention_mask=attention_mask))
        return final, self.side_encoder(downs[0], downs[1:], attention_mask)

    def decode(self, decoder_input_ids, enc, side_enc, attention_mask, decoder_attention_mask):
        """T5: the merged decoder hidden state; the side decoder cross-attends to the side encoder."""
        final, downs = self._backbone(1, self.backbone.decoder, dict(
            input_ids=decoder_input_ids, attention_mask=decoder_attention_mask, encoder_hidden_states=enc,
            encoder_attention_mask=attention_mask))
        side = self.side(downs[0], downs[1:], decoder_attention_mask, enc=side_enc, enc_mask=attention_mask)
        return self._merge(final, side)

    def _backbone(self, k: int, body: nn.Module, inputs: dict,
                  state: dict | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The backbone body's final hidden state and the ladders' projections [down_0(embeddings), down_i(h_i) for
        the tapped blocks]. Each tap is projected in its hook, as the backbone emits it, with the caller's grad mode:
        what a ladder keeps for its weight gradient is its own choice (full, int8, offloaded), and no B x T x d tap
        outlives its block. state (generation): the body runs on the new tokens only, with transformers' KV cache
        state["past"] (None at first: the body makes one), which is updated."""
        side = self.side if self.side_encoder is None or k == 1 else self.side_encoder
        ladder_of = {-1: 0, **{i: j + 1 for j, i in enumerate(side.tapped)}}
        grad = torch.is_grad_enabled()

        def project(key: int, h: torch.Tensor) -> torch.Tensor:
            with torch.set_grad_enabled(grad):
                return side.project(ladder_of[key], h)

        # no_grad, not inference_mode: the ladder inputs must stay usable as saved tensors of down_i.
        extra = dict(use_cache=True, **cache_kwargs(state["past"])) if state is not None else dict(use_cache=False)
        with torch.no_grad(), capture(self.stacks[k].layers, side.tapped, project) as downs:
            out = body(**inputs, **extra)
        if state is not None:
            state["past"] = returned_cache(out)
        return out.last_hidden_state, [downs[-1]] + [downs[i] for i in side.tapped]

    def _merge(self, final: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        out = self.up(side)
        if self.task.classifies and self.cfg.classifier_input == "side":
            return out
        return final + out.to(final.dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, eos_token_id=None,
                 pad_token_id: int | None = None, use_cache: bool = True, stop_strings: list[str] | None = None,
                 tokenizer=None) -> torch.Tensor:
        """Greedy or sampled decoding with the side network attached. Each row is decoded alone (no padding
        effects). With use_cache (default) the backbone keeps transformers' KV cache and the side network its own,
        so each new token costs one token's forward; without, every token reruns the full forward (the reference
        the cached path is tested against). Returns the prompt plus the new tokens for causal LMs, the decoder
        sequence for T5, right-padded with `pad_token_id`."""
        if self.task.classifies:
            raise SidetuneError("generate needs a causal_lm or seq2seq model; this LST model classifies")
        eos, pad = special_tokens(self.config, eos_token_id, pad_token_id)
        rows = []
        for ids in unpadded_rows(input_ids, attention_mask):
            if self.side_encoder is not None:
                enc, side_enc = self.encode(ids, None)
                start = torch.full((1, 1), self.config.decoder_start_token_id, dtype=ids.dtype, device=ids.device)
                if use_cache:
                    rows.append((start, _CachedStep(self, enc, side_enc)))
                    continue

                def step(s, enc=enc, side_enc=side_enc):
                    return self.head(self.decode(s, enc, side_enc, None, None), None, None).logits[:, -1]

                rows.append((start, step))
            else:
                rows.append((ids, _CachedStep(self) if use_cache else lambda s: self(input_ids=s).logits[:, -1]))
        return decode_rows(rows, max_new_tokens, eos, pad, do_sample, temperature, top_k,
                           stop_on_strings(stop_strings, tokenizer))


class _CachedStep:
    """One row's decoding state: feeds only the tokens it has not seen to the backbone (with its KV cache) and to
    the side network (with its own), and returns the next-token logits."""

    def __init__(self, model: LSTModel, enc: torch.Tensor | None = None, side_enc: torch.Tensor | None = None) -> None:
        self.model, self.enc, self.side_enc = model, enc, side_enc
        self.seen, self.state, self.side = 0, {"past": None}, SideCache()

    def __call__(self, seq: torch.Tensor) -> torch.Tensor:
        m, new = self.model, seq[:, self.seen:]
        self.seen = seq.shape[1]
        if self.enc is None:
            final, downs = m._backbone(0, m.backbone.base_model, dict(input_ids=new), self.state)
            side = m.side(downs[0], downs[1:], None, cache=self.side)
        else:
            final, downs = m._backbone(1, m.backbone.decoder, dict(input_ids=new, encoder_hidden_states=self.enc),
                                       self.state)
            side = m.side(downs[0], downs[1:], None, enc=self.side_enc, cache=self.side)
        return m.head(m._merge(final[:, -1:], side[:, -1:]), None, None).logits[:, -1]


class LST(Method):
    name: ClassVar[str] = "lst"
    Config: ClassVar[type] = LSTConfig
    # No gradient flows through the backbone: it may run in eval mode, and checkpointing it would be pointless.
    backbone_trains: ClassVar[bool] = False
    # Memory-cutting variants `sidetune plan` may propose: fewer ladders (the paper drops layers), a narrower side.
    plan_options: ClassVar[dict[str, dict]] = {
        "a side block on every 2nd layer": {"side_layers": "every:2"},
        "side width d/16": {"r": 16},
        "ladder inputs kept in int8 for the weight gradient": {"ladder_grad_input": "int8"},
        "ladder inputs kept in host memory (CUDA)": {"ladder_offload": True},
    }

    def __init__(self, cfg: LSTConfig) -> None:
        self.cfg = cfg

    def start_exact(self, task: Task) -> dict | None:
        # Classification: the classifier reads LST's own pooling of h_final + side (e.g. the last real token by
        # attention mask), not transformers' pooler, so step 0 is a different (linear-probe) model by design.
        return None if task.classifies else {}

    def head_modules(self, module: nn.Module) -> list[nn.Module]:
        return [module.head]

    def reference(self, from_trained: bool) -> str:
        # The side network adds up(...) = 0 at the start: the frozen backbone's own final hidden state, which every
        # forward computes, is the starting model's. A run starting from a trained side network is not there.
        return "precomputed" if from_trained else "in_forward"

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        task = ctx.task
        if task.classifies and model.config.is_encoder_decoder:
            raise SidetuneError("LST on an encoder-decoder model supports data.task=seq2seq only")
        freeze(model)
        # Only the classifier LST feeds trains; any other new module (e.g. an untrained BERT pooler) stays frozen.
        used = classifier_name(model) if task.classifies else None
        for name in head_module_names(model):
            if name != used:
                model.get_submodule(name).requires_grad_(False)
        # A reload loads the trained side network over the init: Fisher scores (training data) are not needed.
        calibration = (list(ctx.batches(self.name, self.cfg.fisher_batches))
                       if self.calibration_batches() and not ctx.reload else [])
        return LSTModel(model, self.cfg, task, calibration).train(model.training)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict] | None:
        """The up-projection, the ladders (with their gates) and the side blocks (with the side norms) at their own
        lr ratios; the rest (a classifier, T5's relative-position bias) at lr."""
        c = self.cfg
        if c.up_lr_ratio == c.ladder_lr_ratio == c.block_lr_ratio == 1.0:
            return None
        lst = next(m for m in model.modules() if isinstance(m, LSTModel))
        sides = [s for s in (lst.side_encoder, lst.side) if s is not None]
        parts = {"up": (list(lst.up.parameters()), c.up_lr_ratio),
                 "ladders": ([p for s in sides for p in [*s.ladders.parameters(), s.alpha]], c.ladder_lr_ratio),
                 "blocks": ([p for s in sides for p in [*s.blocks.parameters(), *s.norm.parameters()]],
                            c.block_lr_ratio)}
        seen = {id(p) for params, _ in parts.values() for p in params}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
        groups = [{"params": [p for p in params if p.requires_grad], "lr": lr * ratio} for params, ratio in
                  parts.values()]
        return [g for g in [*groups, {"params": rest, "lr": lr}] if g["params"]]

    def calibration_batches(self) -> int:
        return self.cfg.fisher_batches if self.cfg.init == "pruned_fisher" else 0

    def hf_export(self, model: LSTModel) -> HFExport:
        """The side network, `up` and the merge for sidetune/portable/modeling_sidetune.py (kind "lst")."""
        if model.side_encoder is not None:
            raise SidetuneError("sidetune export --hf writes decoder-only and encoder-only LST runs; this one is an "
                                "encoder-decoder (T5): serve it with sidetune.load(RUN_DIR)")
        stack, side = model.stacks[-1], model.side
        shape = dataclasses.asdict(stack.shape.reduced(self.cfg.r))
        shape["biases"] = sorted(shape["biases"])
        layers = next(n for n, m in model.backbone.named_modules() if m is stack.layers)
        classifies = model.task.classifies
        spec = {"kind": "lst", "layers": layers, "d_out": model.up.out_features,
                "stack": {"d": stack.shape.d, "shape": shape, "tapped": side.tapped,
                          "inv_freq": stack.inv_freq.float().tolist() if side.inv_freq is not None else None,
                          "rope_scaling": side.rope_scaling, "gate_temperature": side.temperature},
                "classifier_input": self.cfg.classifier_input if classifies else None,
                "pooling": model.head.pooling if classifies else None,
                "classifier": classifier_name(model.backbone) if classifies else None}
        tensors = {f"side_network.{k}": v for k, v in side.state_dict().items()} | {"side_up.weight": model.up.weight}
        return HFExport(spec, model.backbone, tensors)
