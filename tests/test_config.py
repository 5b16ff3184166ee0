"""Config: YAML + dotted overrides, typed and validated with one-line errors."""

from __future__ import annotations

import pytest
import yaml

from sidetune.config import Config, load_config, save_config
from sidetune.errors import SidetuneError
from sidetune.methods.lora import LoRAConfig


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny-bert"}, "method": {"name": "lora", "r": 4}}))
    cfg = load_config(path, ["train.lr=3e-4", "method.r=16", "method.targets=q_proj", "train.max_steps=5",
                             "data.max_train_samples=null"])
    assert isinstance(cfg.method, LoRAConfig)
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string: coerced
    assert cfg.method.r == 16 and cfg.method.targets == ["q_proj"]
    assert cfg.train.max_steps == 5 and cfg.data.max_train_samples is None
    assert cfg.model.name == "tiny-bert"


def test_template_overrides_stay_text():
    # YAML would read `{sentence}` as a mapping and drop the leading space of ` {label_name}`.
    cfg = load_config(None, ["data.prompt_template=Review: {sentence}", "data.completion_template= {label_name}"])
    assert cfg.data.prompt_template == "Review: {sentence}" and cfg.data.completion_template == " {label_name}"


def test_roundtrip(tmp_path):
    cfg = load_config(None, ["method.name=lora", "method.alpha=32", "train.batch_size=4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(again, Config)


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian.lr=1", "unknown config section 'trian' (did you mean 'train'?)"),
    ("method.rank=4", "unknown config key 'method.rank'"),
    ("train.batch_size=big", "train.batch_size must be an integer, got 'big'"),
    ("train.lr=fast", "train.lr must be a number, got 'fast'"),
    ("train.progress=maybe", "train.progress must be true or false"),
    ("data.task=regression", "data.task='regression' is not allowed"),
    ("method.name=nope", "unknown method 'nope'"),
    ("model.quantize=nf3", "model.quantize='nf3' is not supported"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("trainlr", "must look like section.key=value"),
])
def test_bad_input_is_one_line(override, message):
    with pytest.raises(SidetuneError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(SidetuneError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_typo_in_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  name: lora\n  aplha: 8\n")
    with pytest.raises(SidetuneError, match=r"did you mean 'method.alpha'"):
        load_config(path)
