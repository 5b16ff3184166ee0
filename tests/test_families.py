"""Every registered method, with its default settings, on tiny random models of 25 transformers families: it builds,
two Adam steps give finite losses and move its trainable parameters, and step 0 equals the frozen model wherever
the method declares `start_exact`. Default placements come from one place, `sidetune.anatomy` (a test below checks
that no other file names a family's modules), including the query / key / value rows of fused qkv projections, which
are checked here by behaviour, not by name. Also: CodeGen, whose model class rejects a `pad_token_id` keyword, loads
from a local directory, and a model class that fails is not reported as a damaged checkpoint.
"""

from __future__ import annotations

import ast
import copy
import functools
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import ROOT
from torch.testing import assert_close

from sidetune.anatomy import read
from sidetune.errors import SidetuneError
from sidetune.methods import METHODS, Context, build_method
from sidetune.methods.lora import LoRA, LoRAConfig, LoRALinear
from sidetune.tasks import get_task

V = 128
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
C = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
         max_position_embeddings=64, **IDS)
GQA = dict(C, num_key_value_heads=2)
GPT = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=64, **IDS)

DECODERS = {
    "llama": lambda: T.LlamaConfig(**GQA),
    "mistral": lambda: T.MistralConfig(**GQA, sliding_window=None),
    "qwen2": lambda: T.Qwen2Config(**GQA),
    "qwen3": lambda: T.Qwen3Config(**GQA, head_dim=8),
    "gemma": lambda: T.GemmaConfig(**GQA, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**GQA, head_dim=8, query_pre_attn_scalar=8, sliding_window=16),
    "gemma3": lambda: T.Gemma3TextConfig(**GQA, head_dim=8, query_pre_attn_scalar=8, sliding_window=16),
    "phi3": lambda: T.Phi3Config(**GQA),  # fused qkv_proj (concat) and gate_up_proj
    "gpt_neox": lambda: T.GPTNeoXConfig(**C),  # fused query_key_value (per head q k v), parallel residual
    "opt": lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                               max_position_embeddings=64, word_embed_proj_dim=32, **IDS),
    "falcon": lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                                     **IDS),  # multi-query: one key/value head
    "falcon_new": lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
                                         new_decoder_architecture=True, num_kv_heads=2, **IDS),
    "gpt2": lambda: T.GPT2Config(**GPT),  # Conv1D, fused c_attn
    "bloom": lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=V, **IDS),  # ALiBi
    "gptj": lambda: T.GPTJConfig(**GPT, rotary_dim=4),
    "phi": lambda: T.PhiConfig(**C),
    "codegen": lambda: T.CodeGenConfig(**GPT, rotary_dim=4),  # fused qkv_proj in 4 chunks of q|v|k
    "mpt": lambda: T.MptConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=V, expansion_ratio=2, **IDS),  # Wqkv
    "gpt_neo": lambda: T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=V,
                                      max_position_embeddings=64, attention_types=[[["global", "local"], 1]], **IDS),
}
ENCODERS = {
    "bert": lambda: T.BertConfig(**C),
    "roberta": lambda: T.RobertaConfig(**C),
    "deberta_v2": lambda: T.DebertaV2Config(**C),
    "distilbert": lambda: T.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=V,
                                             max_position_embeddings=64, pad_token_id=0),
    "electra": lambda: T.ElectraConfig(**C, embedding_size=16),
}
FAMILIES = [*DECODERS, *ENCODERS, "t5"]
FUSED = ["phi3", "gpt_neox", "falcon", "falcon_new", "gpt2", "bloom", "codegen", "mpt"]

# What a method refuses, by design, in one line: PET scores with a causal LM's own head; a prefix needs a model that
# carries a key/value cache to its attention.
REFUSED = {("pet", f): "causal LMs only" for f in ("bert", "roberta", "electra")} | {
    (m, f): "key/value cache" for m in ("prefix_tuning", "ptuning_v2") for f in ("distilbert", "deberta_v2")}

# Families whose attention is their own code, not transformers' attention functions: zero-init attention (the prefix
# methods' start_exact) never reaches it, and says so in one line instead of silently starting elsewhere.
OWN_ATTENTION = {"falcon", "falcon_new", "bloom", "mpt", "gpt_neo"}


def _config(family: str):
    if family == "t5":
        return T.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=V,
                          decoder_start_token_id=0, **IDS)
    return (DECODERS.get(family) or ENCODERS[family])()


@functools.cache
def _base(family: str, task: str) -> torch.nn.Module:
    """A seeded random model for the task, built once per test session (each test works on a deep copy)."""
    torch.manual_seed(0)
    auto = get_task(task).model_class()
    model = auto.from_config(_config(family))
    model.sidetune_head = [n for n in ("classifier", "score") if hasattr(model, n)]
    return model.eval()


def _task(method: str, family: str) -> str | None:
    """The task a method trains on this family (None: the method declares none the family has)."""
    tasks = METHODS[method].tasks
    natural = "causal_lm" if family in DECODERS else "seq2seq" if family == "t5" else "classification"
    task = natural if natural in tasks else "classification" if "classification" in tasks and family != "t5" else None
    if task is None:
        return None
    # PET loads a causal LM: a family without one is refused by the loader before any method runs
    model_task = build_method(METHODS[method].Config()).model_task(get_task(task))
    mapping = model_task.model_class()._model_mapping
    return task if type(_config(family)) in mapping else None


@functools.cache
def _tokenizer():
    """A word-level tokenizer inside the tiny vocabulary (PET tokenizes its pattern and label words)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[EOS]", "negative", "positive", "all", "in", ",", "it", "was", "a", "sentence"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _ctx(task: str) -> Context:
    return Context.for_task(task, tokenizer=_tokenizer(), label_names=["negative", "positive"])


def _batch(task: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(12, V, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    if task == "classification":
        return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    if task == "seq2seq":
        return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(12, V, (2, 5), generator=g))
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _cases():
    for family in FAMILIES:
        for method in METHODS:
            if _task(method, family) is not None:
                yield pytest.param(method, family, id=f"{method}-{family}")


@pytest.mark.parametrize("method,family", list(_cases()))
def test_every_method_trains_every_family_with_defaults(method, family):
    task = _task(method, family)
    m = build_method(METHODS[method].Config())
    base = _base(family, m.model_task(get_task(task)).name)
    batch = _batch(task)
    if (method, family) in REFUSED:
        with pytest.raises(SidetuneError, match=REFUSED[method, family]) as e:
            m.apply(copy.deepcopy(base), _ctx(task))
        assert "\n" not in str(e.value)
        return
    model = m.apply(copy.deepcopy(base), _ctx(task)).train()
    if method == "lst":  # every role of every family was read: the side network is cut from the backbone
        assert model.init_used == "pruned"
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    for _ in range(2):
        loss = model(**batch).loss
        assert torch.isfinite(loss), loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(before[n], p) for n, p in params.items()), "no trainable parameter moved"
    exact = m.start_exact(get_task(task))
    if exact is not None:  # step 0 equals the frozen model (on the real tokens: OPT numbers padding positions
        # from the mask, a prefix method from 0..T-1, and no loss or prediction reads a padding position's logits)
        exact_method = build_method(METHODS[method].Config(**exact))
        if "zero_init_attention" in exact and family in OWN_ATTENTION:
            with pytest.raises(SidetuneError, match="does not start at the frozen"):
                exact_method.apply(copy.deepcopy(base), _ctx(task))
            return
        start = exact_method.apply(copy.deepcopy(base), _ctx(task)).eval()
        with torch.no_grad():
            ours, theirs = start(**batch).logits, base(**batch).logits
        real = batch["attention_mask"].bool() if task == "causal_lm" else slice(None)
        assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Fused q/k/v projections


def _set_rows(layer, rows, value_fn) -> None:
    w = layer.weight.data
    conv = isinstance(layer, T.pytorch_utils.Conv1D)
    if conv:
        w[:, rows] = value_fn(w[:, rows])
    else:
        w[rows] = value_fn(w[rows])
    if layer.bias is not None:
        layer.bias.data[rows] = value_fn(layer.bias.data[rows])


@pytest.mark.parametrize("family", FUSED)
def test_fused_qkv_rows_are_queries_keys_and_values(family):
    """The anatomy's row split, checked by what the model computes: with the key rows zeroed every score is 0, so
    changing the query rows changes nothing, while changing the value rows changes the output."""
    model = copy.deepcopy(_base(family, "causal_lm"))
    anatomy = read(model)
    fused = anatomy.names("qkv")
    assert len(fused) == 2
    ids = _batch("causal_lm")["input_ids"]
    g = torch.Generator().manual_seed(0)
    noise = lambda x: x + torch.randn(x.shape, generator=g)  # noqa: E731
    with torch.no_grad():
        for name in fused:
            _set_rows(model.get_submodule(name), anatomy.rows(name, "k"), torch.zeros_like)
        ref = model(input_ids=ids).logits
        for name in fused:
            _set_rows(model.get_submodule(name), anatomy.rows(name, "q"), noise)
        assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
        for name in fused:
            _set_rows(model.get_submodule(name), anatomy.rows(name, "v"), noise)
        assert (model(input_ids=ids).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt_neox", "falcon", "falcon_new", "gpt2"])
def test_fused_qkv_lora_changes_only_query_and_value_rows(family):
    base = _base(family, "causal_lm")
    batch = _batch("causal_lm")
    model = LoRA(LoRAConfig()).apply(copy.deepcopy(base), _ctx("causal_lm"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    anatomy = read(base)
    assert sorted(layers) == sorted(anatomy.names("qkv"))  # the default targets: the fused layers, row-masked
    with torch.no_grad():
        assert_close(model.eval()(**batch).logits, base(**batch).logits, rtol=0, atol=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    for name, layer in layers.items():
        delta = layer.delta_weight()
        delta = delta.T if isinstance(layer.base, T.pytorch_utils.Conv1D) else delta  # rows = outputs
        k, qv = anatomy.rows(name, "k"), anatomy.rows(name, "qv")
        assert torch.equal(delta[k], torch.zeros_like(delta[k])), name
        assert delta[qv].abs().amax(1).gt(0).all(), name  # every query and value row moved
        assert torch.equal(layer.lora_B.weight[k], torch.zeros_like(layer.lora_B.weight[k]))  # PEFT-exportable
    merged = model.eval()
    with torch.no_grad():
        before = merged(**batch).logits
    LoRA(LoRAConfig()).merge(merged)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        assert_close(merged(**batch).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "falcon"])
def test_fused_qkv_lora_exports_as_the_peft_lora_of_the_whole_layer(family):
    """What `export --peft` writes for a row-masked LoRA (its parameters under PEFT's names, the target_modules of
    `peft_config`) is a whole-layer PEFT LoRA whose key rows of B are 0: it computes the same function."""
    peft = pytest.importorskip("peft")
    base = _base(family, "causal_lm")
    batch = _batch("causal_lm")
    method = LoRA(LoRAConfig())
    ours = method.apply(copy.deepcopy(base), _ctx("causal_lm")).train()
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        ours(**batch).loss.backward()
        opt.step()
    config = method.peft_config(ours)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
        fan_in_fan_out=config["fan_in_fan_out"], task_type="CAUSAL_LM"))
    state = {f"base_model.model.{n}": p for n, p in ours.named_parameters() if p.requires_grad}
    missing = set(state) - {k.replace(".default", "") for k in ref.state_dict()}
    assert not missing, missing
    result = peft.set_peft_model_state_dict(ref, state)
    assert not [k for k in result.unexpected_keys if "lora_" in k], result.unexpected_keys
    with torch.no_grad():
        expected = ref.eval()(**batch).logits
        actual = ours.eval()(**batch).logits
        assert (actual - base(**batch).logits).abs().max() > 1e-4  # trained: not trivially the base
    assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_kv_layouts_come_from_the_projections():
    """(blocks, key/value heads the cache holds, head dim): Falcon's multi-query caches one key/value head (its
    config says 4 attention heads), its new architecture caches its 2 groups broadcast to all 4 heads."""
    layout = {f: read(_base(f, "causal_lm")).kv_layout() for f in ("llama", "falcon", "falcon_new", "gpt_neox")}
    assert layout == {"llama": (2, 2, 8), "falcon": (2, 1, 8), "falcon_new": (2, 4, 8), "gpt_neox": (2, 4, 8)}
    t5 = read(_base("t5", "seq2seq"))
    assert t5.kind == "encoder-decoder" and [s.shape.cross for s in t5.stacks] == [False, True]
    assert t5.position == "relative" and set(t5.names("xq", "xv")) and not t5.stacks[0].blocks[0].keys() & {"xq"}
    assert read(_base("bloom", "causal_lm")).position == "alibi"
    assert read(_base("gpt2", "causal_lm")).position == "learned"


def test_an_unreadable_anatomy_is_one_line_naming_the_override():
    albert = T.AutoModelForSequenceClassification.from_config(T.AlbertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
        embedding_size=16))
    albert.sidetune_head = ["classifier"]
    for method in ("lora", "adapter", "ia3"):
        with pytest.raises(SidetuneError, match=r"found no .*set method\.targets") as e:
            build_method(METHODS[method].Config()).apply(copy.deepcopy(albert), _ctx("classification"))
        assert "\n" not in str(e.value)
    # the override works as before
    model = LoRA(LoRAConfig(targets=["query", "value"])).apply(copy.deepcopy(albert), _ctx("classification"))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2  # ALBERT shares one layer


# ---------------------------------------------------------------------------------------------------------------------
# Adding a family is one place

FAMILY_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "c_attn", "c_proj", "c_fc", "qkv_proj",
                "Wqkv", "q_lin", "k_lin", "v_lin", "out_lin", "query_proj", "value_proj", "gate_proj", "up_proj",
                "down_proj", "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h", "fc_in", "fc_out", "SelfAttention",
                "EncDecAttention", "DenseReluDense", "wi_0", "wi_1", "self_attn", "relative_attention_bias"}


def _code_names(path: Path) -> set[str]:
    """String constants (docstrings aside) and attribute names in a source file."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            out |= {w for w in FAMILY_NAMES if w in n.value}
        elif isinstance(n, ast.Attribute) and n.attr in FAMILY_NAMES:
            out.add(n.attr)
    return out


def test_only_the_anatomy_module_knows_family_module_names():
    offenders = {str(p.relative_to(ROOT)): names for p in sorted((ROOT / "sidetune").rglob("*.py"))
                 if p.name != "anatomy.py" and (names := _code_names(p))}
    assert not offenders, offenders
    # the check can fail: the anatomy's own names, and a test's expected module names, are caught
    assert _code_names(ROOT / "sidetune" / "anatomy.py") >= {"query_key_value", "c_attn"}
    assert "down_proj" in _code_names(ROOT / "tests" / "test_adapter.py")


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def test_a_family_whose_model_class_rejects_pad_token_id_loads(tmp_path):
    from sidetune.config import ModelConfig
    from sidetune.models import load_model

    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(DECODERS["codegen"]()).save_pretrained(tmp_path)
    model = load_model(ModelConfig(name=str(tmp_path)), "causal_lm", pad_token_id=5)
    assert type(model).__name__ == "CodeGenForCausalLM" and model.config.pad_token_id == 5


def test_a_failing_model_class_is_not_called_a_damaged_checkpoint(tmp_path, monkeypatch):
    from sidetune.config import ModelConfig
    from sidetune.models import load_model

    T.AutoModelForCausalLM.from_config(DECODERS["llama"]()).save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise TypeError("LlamaForCausalLM.__init__() got an unexpected keyword argument 'foo'")

    monkeypatch.setattr(T.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(SidetuneError, match="could not build") as e:
        load_model(ModelConfig(name=str(tmp_path)), "causal_lm", pad_token_id=0)
    assert "damaged" not in str(e.value) and "\n" not in str(e.value)
