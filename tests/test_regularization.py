"""Weight penalties, max-norm, gradient clipping and learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

import graphengine as ge
from graphengine.train.regularization import select_parameters

rng = np.random.default_rng(0)
X = rng.standard_normal((32, 5)).astype(np.float32)
Y = rng.integers(0, 3, 32)
DATA = {"x": X, "y": Y}


def mlp(backend: str = "numpy", optimizer: ge.Optimizer | None = None, **options) -> ge.Model:
    g = ge.Graph("mlp")
    x, y = g.input("x", (None, 5)), g.input("y", (None,), dtype="int64")
    h = g.activation("tanh", g.layer("dense", x, units=4, name="fc1"))
    logits = g.layer("dense", h, units=3, name="fc2")
    return g.compile(g.loss("softmax_cross_entropy", logits, y),
                     optimizer=optimizer or ge.optimizer("sgd", lr=0.1), backend=backend, **options)


def host_params(model: ge.Model) -> dict[str, np.ndarray]:
    return {k: model.backend.to_numpy(v).astype(np.float64) for k, v in model.parameters().items()}


def data_gradients(model: ge.Model) -> dict[str, np.ndarray]:
    model.forward(DATA)
    model.backward()
    return {k: model.backend.to_numpy(v).astype(np.float64) for k, v in model.gradients().items()}


# --------------------------------------------------------------------------- penalties

def test_penalties_apply_to_weights_not_biases_by_default():
    model = mlp()
    assert select_parameters(model, None, "test") == ["fc1/W", "fc2/W"]
    assert select_parameters(model, ["fc1/"], "test") == ["fc1/W", "fc1/b"]
    assert select_parameters(model, lambda n: n.endswith("/b"), "test") == ["fc1/b", "fc2/b"]
    with pytest.raises(ge.GraphEngineError, match="no parameter matches 'fc9/'.*fc1/W"):
        mlp(regularizer=ge.L2(0.1, params=["fc9/"]))


@pytest.mark.parametrize("penalty", [ge.L2(0.3), ge.L1(0.2), ge.L1L2(l1=0.1, l2=0.4),
                                     ge.L2(0.5, params=["fc1/"])], ids=repr)
def test_a_penalty_adds_the_gradient_of_its_value(penalty, backend):
    model = mlp(backend)
    before = host_params(model)
    grads = data_gradients(model)
    updated = {k: model.backend.asarray(v) for k, v in grads.items()}
    penalty(model, updated)
    chosen = penalty.parameters(model)
    # central differences of penalty.value along a random direction, per parameter
    direction_rng = np.random.default_rng(1)
    for name, grad in grads.items():
        added = model.backend.to_numpy(updated[name]) - grad
        if name not in chosen:
            np.testing.assert_array_equal(added, 0)
            continue
        d = direction_rng.standard_normal(grad.shape)
        eps = 1e-3
        values = []
        for sign in (1, -1):
            model.set_parameters({name: before[name] + sign * eps * d})
            values.append(penalty.value(model))
        model.set_parameters({name: before[name]})
        numeric = (values[0] - values[1]) / (2 * eps)
        assert float(np.sum(added * d)) == pytest.approx(numeric, rel=1e-3, abs=1e-4), name


def test_l2_with_sgd_is_weight_decay():
    lr, decay = 0.1, 0.05
    model = mlp(optimizer=ge.optimizer("sgd", lr=lr), regularizer=ge.L2(decay))
    before = host_params(model)
    grads = data_gradients(model)
    model.step()
    after = host_params(model)
    np.testing.assert_allclose(after["fc1/W"], (1 - lr * decay) * before["fc1/W"] - lr * grads["fc1/W"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after["fc1/b"], before["fc1/b"] - lr * grads["fc1/b"], atol=1e-6)


def test_l2_shrinks_and_l1_sparsifies_the_weights():
    def train(regularizer):
        model = mlp(optimizer=ge.optimizer("sgd", lr=0.1), regularizer=regularizer)
        model.fit(DATA, epochs=150, batch_size=32, verbose=0)
        return model.backend.to_numpy(model.parameters()["fc1/W"])

    plain, l2, l1 = train(None), train(ge.L2(0.1)), train(ge.L1(0.05))
    assert np.linalg.norm(l2) < 0.7 * np.linalg.norm(plain)
    assert np.mean(np.abs(l1) < 1e-2) > np.mean(np.abs(plain) < 1e-2) + 0.5


def test_penalty_value():
    model = mlp()
    w = host_params(model)
    assert ge.L1L2(l1=0.1, l2=0.2).value(model) == pytest.approx(
        sum(0.1 * np.abs(w[n]).sum() + 0.1 * (w[n] ** 2).sum() for n in ("fc1/W", "fc2/W")))


def test_decay_flag_of_a_parameter_is_respected():
    g = ge.Graph()
    v = g.parameter("v", (3,), init="ones", decay=True)
    u = g.parameter("u", (2, 2), init="ones", decay=False)
    loss = v.sum() + u.sum()
    model = g.compile(loss, outputs=[loss], optimizer=ge.optimizer("sgd", lr=0.1))
    assert select_parameters(model, None, "test") == ["v"]


def test_frozen_parameters_get_no_penalty():
    model = mlp(regularizer=[ge.L2(0.1), ge.L1(0.1, params=["fc1/"])])
    model.freeze("fc1/")
    assert ge.L2(0.1).parameters(model) == ["fc2/W"]
    assert ge.L1(0.1, params=["fc1/"]).parameters(model) == []
    before = host_params(model)["fc1/W"]
    model.train_step(DATA)
    np.testing.assert_array_equal(host_params(model)["fc1/W"], before)


# --------------------------------------------------------------------------- max-norm

def test_max_norm_caps_each_units_incoming_weights(backend):
    model = mlp(backend, optimizer=ge.optimizer("sgd", lr=5.0), constraint=ge.MaxNorm(0.5))
    for _ in range(3):
        model.train_step(DATA)
    w = host_params(model)
    for name in ("fc1/W", "fc2/W"):
        assert np.linalg.norm(w[name], axis=0).max() <= 0.5 + 1e-5
    assert np.linalg.norm(w["fc1/b"]) > 0  # biases are not constrained and still move


def test_max_norm_leaves_small_weights_alone():
    model = mlp()
    before = host_params(model)
    ge.MaxNorm(100.0)(model)
    np.testing.assert_array_equal(host_params(model)["fc1/W"], before["fc1/W"])


# --------------------------------------------------------------------------- clipping

def test_clip_norm_scales_all_gradients_together(backend):
    model = mlp(backend)
    grads = data_gradients(model)
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    device = {k: model.backend.asarray(v) for k, v in grads.items()}
    ge.ClipNorm(norm / 4)(model, device)
    clipped = {k: model.backend.to_numpy(v) for k, v in device.items()}
    for name, g in grads.items():
        np.testing.assert_allclose(clipped[name], g / 4, rtol=1e-6)
    device = {k: model.backend.asarray(v) for k, v in grads.items()}
    ge.ClipNorm(norm * 2)(model, device)
    for name, g in grads.items():
        np.testing.assert_allclose(model.backend.to_numpy(device[name]), g, rtol=1e-6)


def test_clip_value(backend):
    model = mlp(backend)
    grads = {"a": model.backend.asarray(np.array([-3.0, 0.1, 2.0]))}
    ge.ClipValue(0.5)(model, grads)
    np.testing.assert_array_equal(model.backend.to_numpy(grads["a"]), [-0.5, 0.1, 0.5])


def test_clipping_through_compile_bounds_the_update():
    lr = 1.0
    model = mlp(optimizer=ge.optimizer("sgd", lr=lr), clip_norm=1e-3)
    before = host_params(model)
    model.train_step(DATA)
    after = host_params(model)
    step = math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before))
    assert step == pytest.approx(lr * 1e-3, rel=1e-3)


# --------------------------------------------------------------------------- schedules

def test_schedule_formulas():
    assert [ge.StepDecay(0.5, every=3, initial_lr=1.0).lr(t) for t in range(7)] == [
        1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert ge.ExponentialDecay(0.1, initial_lr=2.0).lr(5) == pytest.approx(2 * math.exp(-0.5))
    assert ge.InverseTimeDecay(0.5, initial_lr=1.0).lr(4) == pytest.approx(1 / 3)


def test_schedule_sets_the_learning_rate_per_epoch_during_fit():
    seen = []

    class Record(ge.Callback):
        def on_epoch_end(self, model, epoch, logs):
            seen.append(model.optimizer.lr)

    model = mlp(optimizer=ge.optimizer("sgd", lr=0.4), schedule=ge.StepDecay(0.5, every=2))
    model.fit(DATA, epochs=5, batch_size=8, verbose=0, callbacks=[Record()])
    # the lr in use during epochs 1..5 (t = completed epochs 0..4)
    assert seen == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])


def test_schedule_per_step():
    model = mlp(optimizer=ge.optimizer("sgd", lr=1.0), schedule=ge.InverseTimeDecay(1.0, per="step"))
    for _ in range(4):
        model.train_step(DATA)
    assert model.optimizer.lr == pytest.approx(1 / 4)  # t = 3 completed updates


def test_compile_options_are_checked():
    with pytest.raises(ge.GraphEngineError, match="regularizer must be ge.L1"):
        mlp(regularizer=0.01)
    with pytest.raises(ge.GraphEngineError, match="clip_norm must be a positive number"):
        mlp(clip_norm=-1)
    with pytest.raises(ge.GraphEngineError, match="schedule must be a ge.Schedule"):
        mlp(schedule=lambda t: 0.1)
    with pytest.raises(ge.GraphEngineError, match="per must be 'epoch' or 'step'"):
        ge.StepDecay(per="batch")
    with pytest.raises(ge.GraphEngineError, match="constraint must be ge.MaxNorm"):
        mlp(constraint=ge.L2(0.1))


def test_hooks_are_installed_in_order():
    model = mlp(regularizer=[ge.L2(1e-4), ge.L1(1e-3, params=["fc1/"])], clip_value=1.0,
                clip_norm=5.0, schedule=ge.ExponentialDecay(0.1), constraint=ge.MaxNorm(3.0))
    kinds = [type(t).__name__ for t in model.gradient_transforms]
    assert kinds == ["L2", "L1", "ClipNorm", "ClipValue", "ExponentialDecay"]
    assert [type(c).__name__ for c in model.constraints] == ["MaxNorm"]
