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


@pytest.mark.parametrize("order", ["fields_first", "name_first"])
def test_overrides_apply_in_any_order(tmp_path, order):
    """method.name starts the method section afresh (the recipe's LoRA fields do not fit LST), but a method field
    given on the command line survives it in either order."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "lora", "r": 4, "targets": ["query"]}}))
    overrides = ["method.r=16", "method.name=lst"] if order == "fields_first" else ["method.name=lst", "method.r=16"]
    cfg = load_config(path, overrides)
    assert cfg.method.name == "lst" and cfg.method.r == 16
    assert load_config(path, ["method.dropout=0.2", "train.lr=1e-3"]).method.r == 4  # same method: the YAML stays


def test_duplicate_yaml_key_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 1.0e-5\n")
    with pytest.raises(SidetuneError, match=r"key 'lr' appears twice in one section \(lines 2 and 4\)"):
        load_config(path)
    path.write_text("train:\n  lr: 1.0e-3\ntrain:\n  batch_size: 4\n")  # a section given twice
    with pytest.raises(SidetuneError, match=r"key 'train' appears twice"):
        load_config(path)
    path.write_text("train:\n  lr: 1.0e-3\nmodel:\n  lr: 3\n")  # the same name in two sections is no duplicate
    with pytest.raises(SidetuneError, match=r"unknown config key 'model\.lr'"):
        load_config(path)


def test_tilde_is_expanded_in_every_path_field(tmp_path, monkeypatch):
    from sidetune.config import PATH_FIELDS

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["train.output_dir=~/runs/x", "train.resume=~/runs/x/checkpoints/step-0000004",
                             "data.train=~/d/train.tsv", "data.eval=~/d/dev.tsv", "model.tokenizer=~/tok",
                             "data.chat_template=~/t.jinja"])
    assert cfg.train.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.train.resume == str(tmp_path / "runs/x/checkpoints/step-0000004")
    assert cfg.data.train == str(tmp_path / "d/train.tsv") and cfg.data.eval == str(tmp_path / "d/dev.tsv")
    assert cfg.model.tokenizer == str(tmp_path / "tok") and cfg.data.chat_template == str(tmp_path / "t.jinja")
    assert load_config(None, ["model.name=~/m"]).model.name == str(tmp_path / "m")
    assert load_config(None, ["model.init_from=~/sft"]).model.init_from == str(tmp_path / "sft")
    assert len(PATH_FIELDS) == 8
    assert load_config(None, ["data.train=sst2/train.tsv"]).data.train == "sst2/train.tsv"  # no ~: as given


def test_recipe_path_that_is_a_directory(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  lr: 1.0e-3\n")
    with pytest.raises(SidetuneError, match=r"is a directory; pass the path to a YAML run config in it \(e\.g\. "):
        load_config(tmp_path)


def test_a_field_of_another_method_is_refused_in_either_order():
    for overrides in (["method.r=4", "method.name=full"], ["method.name=full", "method.r=4"]):
        with pytest.raises(SidetuneError, match=r"unknown config key 'method\.r' for method 'full'"):
            load_config(None, overrides)
