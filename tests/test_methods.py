"""The contract every registered method keeps, checked for each entry of METHODS on tiny models, read off the
method's own declarations (`tasks`, `start_exact`): a new method is picked up here with no edit.

- step 0 equals the frozen model wherever the method says it can (`start_exact`);
- after backward, exactly the trainable set has gradients (the frozen backbone has `grad is None`);
- the trainable set is what `apply` left with requires_grad, and it is not empty;
- a task the method does not declare is refused when the config is parsed, in one line.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, ctx, tiny
from torch.testing import assert_close

from sidetune.config import load_config
from sidetune.errors import SidetuneError
from sidetune.methods import METHODS, build_method, trainable_parameters
from sidetune.tasks import TASKS, get_task

# Every method must train on tiny-llama for each task it declares but seq2seq, and on T5 for seq2seq. The other
# presets are tried too: there a method either trains or refuses in one line (SidetuneError).
NATURAL = {"causal_lm": "tiny-llama", "chat": "tiny-llama", "classification": "tiny-llama", "seq2seq": "tiny-t5",
           "preference": "tiny-llama"}
OTHERS = {"causal_lm": ["tiny-gpt2"], "chat": [], "classification": ["tiny-bert"], "seq2seq": [], "preference": []}


def _params():
    for name, cls in METHODS.items():
        for task in sorted(cls.tasks):
            for preset in [NATURAL[task], *OTHERS[task]]:
                yield pytest.param(name, preset, task, preset == NATURAL[task], id=f"{name}-{preset}-{task}")


def _build(name, task, base, overrides=None):
    method = METHODS[name]
    cfg = method.Config(**(overrides or {}))
    m = build_method(cfg)
    return m.apply(copy.deepcopy(base), ctx(task))


def _base(name, preset, task):
    model_task = build_method(METHODS[name].Config()).model_task(get_task(task))
    return tiny(preset, model_task.name)


@pytest.mark.parametrize("name,preset,task,must", list(_params()))
def test_step0_equals_frozen_model(name, preset, task, must):
    overrides = build_method(METHODS[name].Config()).start_exact(get_task(task))
    if overrides is None:
        pytest.skip(f"{name} declares that step 0 cannot equal the frozen model on {task} (see its file)")
    base = _base(name, preset, task).eval()
    batch = batch_for(base, task)
    try:
        model = _build(name, task, base, overrides).eval()
    except SidetuneError:
        assert not must, f"{name} must train {preset} {task}"
        return
    with torch.no_grad():
        expected = base(**batch)
        actual = model(**batch)
    assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,preset,task,must", list(_params()))
def test_exactly_the_trainable_set_gets_gradients(name, preset, task, must):
    base = _base(name, preset, task)
    try:
        model = _build(name, task, base).train()
    except SidetuneError:
        assert not must, f"{name} must train {preset} {task}"
        return
    trainable = trainable_parameters(model)
    assert trainable
    model(**batch_for(base, task)).loss.backward()
    for pname, p in model.named_parameters():
        if pname in trainable:
            assert p.grad is not None, f"{pname} is trainable but got no gradient"
        else:
            assert p.grad is None, f"{pname} is frozen but got a gradient"


@pytest.mark.parametrize("name", [n for n, cls in METHODS.items() if len(cls.tasks) < len(TASKS)])
def test_an_undeclared_task_is_refused_when_the_config_is_parsed(name):
    task = next(t for t in TASKS if t not in METHODS[name].tasks)
    with pytest.raises(SidetuneError, match=f"does not train data.task={task}"):
        load_config(None, [f"method.name={name}", f"data.task={task}"])


def test_the_profiled_step_is_the_trainers_step(monkeypatch):
    """`sidetune profile` and the trainer call the one `session.train_step`."""
    import sidetune.session
    import sidetune.train
    from sidetune.profiling.measure import measure

    assert sidetune.train.train_step is sidetune.session.train_step
    calls = []
    real = sidetune.session.train_step
    monkeypatch.setattr(sidetune.session, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = load_config(None, ["model.name=tiny-llama", "data.task=causal_lm", "train.batch_size=1",
                             "data.max_length=8", "method.name=lora"])
    measure(cfg, True, "cpu", fake=False)
    assert calls == [1]


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if "preference" in cls.tasks))
def test_the_declared_dpo_reference_is_the_frozen_model(name):
    """`Method.reference`: "parts_off" gives the frozen model's logits inside `reference_off` (after the parts have
    moved off their init); "in_forward" gives the frozen model's final hidden state beside the policy's."""
    method = build_method(METHODS[name].Config())
    kind = method.reference(False)
    assert kind in ("in_forward", "parts_off", "precomputed")
    assert method.reference(True) == "precomputed"  # a trained starting model is never the frozen base
    if kind == "precomputed":
        pytest.skip(f"{name}: reference precomputed (tests/test_preference.py covers it)")
    base = tiny("tiny-llama", "causal_lm").eval()
    batch = batch_for(base, "causal_lm")
    model = method.apply(copy.deepcopy(base), ctx("preference")).eval()
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))  # away from the init, where the parts contribute
        frozen = base(**batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        if kind == "parts_off":
            assert (model(**batch).logits - frozen.logits).abs().max() > 1e-3
            with method.reference_off(model):
                assert_close(model(**batch).logits, frozen.logits, rtol=1e-5, atol=1e-5)
            assert (model(**batch).logits - frozen.logits).abs().max() > 1e-3  # switched back on
        else:
            policy, ref = model.lm_hidden_states_with_reference(**inputs)
            assert torch.equal(ref, base.model(**inputs).last_hidden_state)
            assert (policy - ref).abs().max() > 1e-3
