"""P-tuning v1: the template parser, forward equals PEFT's P-tuning (PromptEncoder, LSTM and MLP) where the layouts
match (all virtual tokens first), a split template equals the frozen model fed [h_before ; E(x) ; h_after] by hand,
padded rows compute what they compute alone, only the encoder and the head train, and one-line refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, ctx, tiny
from torch.testing import assert_close

from sidetune.errors import SidetuneError
from sidetune.methods.ptuning_v1 import PTuningV1, PTuningV1Config, parse_template

TASK_TYPE = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}
CASES = [("tiny-llama", "causal_lm"), ("tiny-gpt2", "causal_lm"), ("tiny-bert", "classification"),
         ("tiny-llama", "classification")]


def _apply(base, task, **kw):
    return PTuningV1(PTuningV1Config(hidden_size=16, **kw)).apply(copy.deepcopy(base), ctx(task))


def test_templates():
    assert parse_template("[P]*10 {x}") == (10, 0)
    assert parse_template("[P][P][P]{x}[P][P]") == (3, 2)
    assert parse_template(" [P]*3 {x} [P]*2 [P] ") == (3, 3)
    assert parse_template("{x} [P]*4") == (0, 4)
    for bad, why in [("[P]*3", "has no {x}"), ("{x} {x} [P]", "twice"), ("{x}", "no virtual token"),
                     ("[P] x", "cannot read 'x'"), ("[Q] {x}", "cannot read")]:
        with pytest.raises(SidetuneError, match=f"method.template=.*{why}"):
            PTuningV1Config(template=bad)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
@pytest.mark.parametrize("preset,task", CASES)
def test_forward_equals_peft_ptuning(preset, task, encoder):
    peft = pytest.importorskip("peft")
    base = tiny(preset, task).eval()
    ours = _apply(base, task, template="[P]*5 {x}", encoder=encoder).eval()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.PromptEncoderConfig(
        num_virtual_tokens=5, encoder_hidden_size=16, encoder_reparameterization_type=encoder.upper(),
        task_type=TASK_TYPE[task])).eval()
    ref.prompt_encoder["default"].load_state_dict(ours.prompt.state_dict())  # same names, same shapes: all of them
    batch = batch_for(base, task)
    if task == "causal_lm":
        batch["labels"][:, 0] = -100  # PEFT also scores the first token from the prompt; the model alone never does
    if preset == "tiny-llama" and task == "classification":
        batch["attention_mask"][:] = 1  # PEFT pools a pad of a right-padded row (see test_prompt_tuning)
    with torch.no_grad():
        expected, actual, plain = ref(**batch), ours(**batch), base(**batch)
    expected_logits, actual_logits = expected.logits, actual.logits
    assert (actual_logits - plain.logits).abs().max() > 1e-3
    if task == "causal_lm":
        real = batch["attention_mask"].bool()
        expected_logits, actual_logits = expected_logits[:, 5:][real], actual_logits[real]
    assert_close(actual_logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-llama"])
def test_split_template_is_the_frozen_model_fed_the_prompt_by_hand(preset):
    base = tiny(preset, "classification").eval()
    model = _apply(base, "classification", template="[P]*3 {x} [P]*2").eval()
    batch = batch_for(base, "classification", batch=3)
    batch["attention_mask"][2, :2] = 0  # row 0 right-padded, row 2 left-padded
    if preset == "tiny-bert":
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        batch["token_type_ids"][:, 6:] = 1  # a sentence pair: the virtual tokens after it get type 0, as in PEFT
    with torch.no_grad():
        out = model(**batch)
        h = model.prompt()
        for row in range(3):
            keep = batch["attention_mask"][row].bool()
            x = base.get_input_embeddings()(batch["input_ids"][row, keep])
            extra = {}
            if preset == "tiny-bert":
                types = batch["token_type_ids"][row, keep]
                extra["token_type_ids"] = torch.cat([types.new_zeros(3), types, types.new_zeros(2)])[None]
            expected = base(inputs_embeds=torch.cat([h[:3], x, h[3:]])[None], **extra).logits
            assert_close(out.logits[row:row + 1], expected, rtol=1e-5, atol=1e-5)
        # The virtual tokens after the input matter (they are not hidden behind padding).
        shifted = model.prompt().clone()
        shifted[3:] += torch.randn_like(shifted[3:])  # (a constant shift would vanish in a LayerNorm)
        fed = base(inputs_embeds=torch.cat([shifted[:3], x, shifted[3:]])[None], **extra).logits
        assert (fed - expected).abs().max() > 1e-6  # (a random tiny BERT's logits are small)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
@pytest.mark.parametrize("preset,task", CASES)
def test_only_the_encoder_and_head_get_gradients(preset, task, encoder):
    template = "[P]*2 {x} [P]*2" if task == "classification" else "[P]*4 {x}"
    model = _apply(tiny(preset, task), task, template=template, encoder=encoder).train()
    model(**batch_for(model.model, task)).loss.backward()
    head = tuple(f"model.{h}." for h in model.model.sidetune_head)
    encoder_params = 0
    for name, p in model.named_parameters():
        if name.startswith("prompt.") or name.startswith(head):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            assert p.dtype == torch.float32
            encoder_params += name.startswith("prompt.")
        else:
            assert not p.requires_grad and p.grad is None, name
    # embedding + 2 layers x 2 directions x 4 LSTM tensors + 2 linears; or embedding + 3 linears
    assert encoder_params == (1 + 16 + 4 if encoder == "lstm" else 1 + 6)


def test_generate_with_the_prompt():
    base = tiny("tiny-llama", "causal_lm").eval()
    model = _apply(base, "causal_lm", template="[P]*4 {x}").eval()
    ids = batch_for(base, "causal_lm", batch=1, seq=6)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, eos_token_id=[])
        assert out.shape == (1, 9) and out[0, 6] == model(input_ids=ids).logits[0, -1].argmax()


def test_unsupported_layouts_and_models_fail_in_one_line():
    with pytest.raises(SidetuneError, match="puts every virtual token before the input"):
        _apply(tiny("tiny-llama", "causal_lm"), "causal_lm", template="[P]*2 {x} [P]")
    with pytest.raises(SidetuneError, match="not encoder-decoder t5"):
        _apply(tiny("tiny-t5", "seq2seq"), "seq2seq")
    with pytest.raises(SidetuneError, match=r"method\.hidden_size must be >= 1"):
        PTuningV1Config(hidden_size=0)
