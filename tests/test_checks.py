"""What session.build checks before loading anything (sidetune/checks.py), and bitsandbytes' held log lines."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig

from sidetune import bnb_log
from sidetune.checks import check_run, is_encoder, max_positions
from sidetune.config import ModelConfig, load_config
from sidetune.errors import SidetuneError
from sidetune.models import load_model


def _future_changes_the_past(preset: str) -> float:
    """How much position 3's logits move when tokens 8.. change: zero exactly when attention is causal."""
    model = load_model(ModelConfig(name=preset), "causal_lm").eval()
    ids = torch.randint(5, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, 8:] = torch.randint(5, 1000, (8,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(input_ids=ids).logits[0, 3] - model(input_ids=other).logits[0, 3]).abs().max().item()


def test_an_encoders_causal_lm_sees_the_future_so_it_is_refused():
    assert _future_changes_the_past("tiny-bert") > 1e-3  # what training on it would do: look ahead
    assert _future_changes_the_past("tiny-llama") == 0.0
    for task in ("causal_lm", "chat"):
        with pytest.raises(SidetuneError, match=f"data.task={task} needs a decoder, and model.name=tiny-bert is an "
                                                f"encoder \\(bert\\)"):
            check_run(load_config(None, ["model.name=tiny-bert", f"data.task={task}"]), "cpu")
    for preset in ("tiny-llama", "tiny-gpt2"):
        check_run(load_config(None, [f"model.name={preset}", "data.task=causal_lm"]), "cpu")
    check_run(load_config(None, ["model.name=tiny-bert", "data.task=classification"]), "cpu")


@pytest.mark.parametrize("model_type,kwargs,encoder,limit", [
    ("bert", {"max_position_embeddings": 512}, True, 512),
    ("roberta", {"max_position_embeddings": 514, "pad_token_id": 1}, True, 512),  # positions start after padding
    ("gpt2", {"n_positions": 1024}, False, 1024),
    ("llama", {"max_position_embeddings": 2048}, False, None),  # rotary: may run longer, left to the user
    ("t5", {}, False, None),  # relative positions
    ("bart", {"max_position_embeddings": 1024}, False, 1024),  # encoder-decoder: its decoder is causal
])
def test_encoders_and_position_limits_from_the_config(model_type, kwargs, encoder, limit):
    config = AutoConfig.for_model(model_type, **kwargs)
    assert is_encoder(config) == encoder
    assert max_positions(config) == limit
    assert not is_encoder(AutoConfig.for_model("bert", is_decoder=True))  # BERT as a decoder attends causally


def test_max_length_beyond_the_position_table():
    with pytest.raises(SidetuneError, match=r"data.max_length=513 .* position table has 512 positions .* <= 512"):
        check_run(load_config(None, ["model.name=tiny-bert", "data.max_length=513"]), "cpu")
    check_run(load_config(None, ["model.name=tiny-bert", "data.max_length=512"]), "cpu")
    check_run(load_config(None, ["model.name=tiny-llama", "data.task=causal_lm", "data.max_length=100000"]), "cpu")


def test_fp16_on_a_cpu_is_refused_only_where_it_would_train():
    cfg = load_config(None, ["model.name=tiny-bert", "train.mixed_precision=fp16"])
    with pytest.raises(SidetuneError, match=r"train\.mixed_precision=fp16 needs a CUDA GPU: on cpu"):
        check_run(cfg, "cpu")
    check_run(cfg, "cpu", precision=False)  # a reload for eval/export of a run trained on a GPU
    check_run(load_config(None, ["model.name=tiny-bert", "train.mixed_precision=bf16"]), "cpu")


def test_bitsandbytes_lines_are_held_until_a_run_uses_it(caplog):
    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")]

    bnb_log.hold()
    try:
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU kernel (test)")
        assert said() == []
        check_run(load_config(None, ["model.name=tiny-bert"]), "cpu")  # quantizes nothing: still held
        assert said() == []
        check_run(load_config(None, ["model.name=tiny-bert", "model.quantize=nf4"]), "cpu")
        assert said() == ["Failed to load CPU kernel (test)"]  # printed once it matters
        logging.getLogger("bitsandbytes.nn").warning("later line")
        assert said() == ["Failed to load CPU kernel (test)", "later line"]  # and later lines pass
    finally:
        bnb_log.release()
