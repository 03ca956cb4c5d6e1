"""Optimizers against torch.optim over several steps: weight_decay on each optimizer, adamw,
and the conventions docs/from_pytorch.md states (momentum's velocity and a changing lr,
RMSProp's first mean square, Adagrad's eps, penalties before clipping, the dense layout)."""

from __future__ import annotations

import numpy as np
import pytest
from test_optimizers import W0, gradient, run_optimizer

import graphengine as ge

torch = pytest.importorskip("torch")

STEPS = 5


def torch_trajectory(make, steps: int = STEPS, lrs=None, prepare=None) -> list[np.ndarray]:
    """The trajectory of ``w`` under ``make([w])``, a torch.optim optimizer, in float64, on the
    quadratic of test_optimizers; ``lrs`` sets each step's lr, ``prepare(optimizer, w, grad)``
    runs before the first step."""
    w = torch.tensor(W0.copy(), requires_grad=True)
    opt = make([w])
    path = [W0.copy()]
    for t in range(steps):
        w.grad = torch.tensor(gradient(w.detach().numpy()))
        if prepare is not None and t == 0:
            prepare(opt, w)
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[t]
        opt.step()
        path.append(w.detach().numpy().copy())
    return path


def _seed_rmsprop_with_first_square(weight_decay):
    """torch's RMSprop with its mean square started at g1^2 instead of 0 (graphengine's
    convention): seeded so that ``alpha * s0 + (1 - alpha) g1^2 = g1^2``."""
    def prepare(opt, w):
        g1 = w.grad + weight_decay * w.detach()
        opt.state[w] = {"step": torch.tensor(0.0, dtype=torch.float64), "square_avg": g1 * g1}
    return prepare


CASES = {
    "sgd": ({"lr": 0.1, "weight_decay": 0.05},
            lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05), None),
    "momentum": ({"lr": 0.1, "momentum": 0.8, "weight_decay": 0.05},
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, weight_decay=0.05), None),
    "nesterov": ({"lr": 0.1, "momentum": 0.8, "weight_decay": 0.05},
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True,
                                           weight_decay=0.05), None),
    "adagrad": ({"lr": 0.5, "weight_decay": 0.05},
                lambda p: torch.optim.Adagrad(p, lr=0.5, eps=1e-8, weight_decay=0.05), None),
    "rmsprop": ({"lr": 0.05, "alpha": 0.7, "weight_decay": 0.05},
                lambda p: torch.optim.RMSprop(p, lr=0.05, alpha=0.7, eps=1e-8, weight_decay=0.05),
                _seed_rmsprop_with_first_square(0.05)),
    "adam": ({"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "weight_decay": 0.05},
             lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05),
             None),
    "adamw": ({"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "weight_decay": 0.3},
              lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.3),
              None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_weight_decay_matches_torch_optim_over_five_steps(name, backend):
    hyper, make, prepare = CASES[name]
    ours = run_optimizer(name, hyper, backend, steps=STEPS)
    theirs = torch_trajectory(make, prepare=prepare)
    for t in range(1, STEPS + 1):
        np.testing.assert_allclose(ours[t], theirs[t], rtol=1e-10, atol=1e-12,
                                   err_msg=f"{name} step {t}")
    # the decay is not a no-op: without it the path differs
    plain = run_optimizer(name, {**hyper, "weight_decay": 0.0}, backend, steps=STEPS)
    assert not np.allclose(plain[-1], ours[-1], rtol=0, atol=1e-6)


def test_adamw_defaults_are_torchs():
    adamw = ge.optimizer("adamw")
    reference = torch.optim.AdamW([torch.zeros(1)]).defaults
    assert (adamw.lr, adamw.weight_decay, adamw.eps) == (reference["lr"], reference["weight_decay"],
                                                          reference["eps"])
    assert (adamw.beta1, adamw.beta2) == reference["betas"]


def test_adamw_decay_is_decoupled_from_the_adam_normalization():
    # a zero gradient: adam's coupled decay is normalized to a step of about lr; adamw's is lr*wd*w
    w = np.array([2.0])
    for name, expected in (("adamw", 2.0 * (1 - 0.1 * 0.5)), ("adam", 2.0 - 0.1)):
        opt = ge.optimizer(name, lr=0.1, weight_decay=0.5)
        param = w.copy()
        opt.update(np, param, np.zeros(1), opt.init_state(np, param), 1)
        np.testing.assert_allclose(param, [expected], rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_bad_weight_decay_is_refused(name):
    with pytest.raises(ge.GraphEngineError, match="weight_decay"):
        ge.optimizer(name, weight_decay=-0.1)


# --------------------------------------------------------------------------- through a model

def dense_model(optimizer, **compile_options):
    """x (5, 3) -> dense(2) -> mse, float64, with fixed weights; and its torch twin."""
    g = ge.Graph("dense")
    x, y = g.input("x", (None, 3), dtype="float64"), g.input("y", (None, 2), dtype="float64")
    out = g.layer("dense", x, units=2, name="fc")
    model = g.compile(g.loss("mse", out, y), optimizer=optimizer, **compile_options)
    rng = np.random.default_rng(3)
    model.set_parameters({"fc/W": rng.standard_normal((3, 2)), "fc/b": rng.standard_normal(2)})
    feeds = {"x": rng.standard_normal((5, 3)), "y": rng.standard_normal((5, 2))}
    linear = torch.nn.Linear(3, 2, dtype=torch.float64)
    with torch.no_grad():  # the dense W is (in, out): torch's Linear weight is its transpose
        linear.weight.copy_(torch.tensor(model.parameters()["fc/W"].T))
        linear.bias.copy_(torch.tensor(model.parameters()["fc/b"]))
    return model, feeds, linear


def torch_loss(linear, feeds):
    pred = linear(torch.tensor(feeds["x"]))
    return torch.nn.functional.mse_loss(pred, torch.tensor(feeds["y"]))


def assert_same_weights(model, linear, rtol=1e-10):
    params = model.parameters()
    np.testing.assert_allclose(params["fc/W"], linear.weight.detach().numpy().T, rtol=rtol)
    np.testing.assert_allclose(params["fc/b"], linear.bias.detach().numpy(), rtol=rtol)


def test_adamw_in_a_model_decays_weights_and_biases_as_torch():
    model, feeds, linear = dense_model(ge.optimizer("adamw", lr=0.05, weight_decay=0.2))
    opt = torch.optim.AdamW(linear.parameters(), lr=0.05, weight_decay=0.2)
    for _ in range(STEPS):
        model.train_step(feeds)
        opt.zero_grad()
        torch_loss(linear, feeds).backward()
        opt.step()
    assert_same_weights(model, linear)


#: clip_grad_norm_ divides by the norm + 1e-6, ge's clip_norm by the norm + 1e-12.
CLIP_RTOL = 1e-7


def test_penalties_are_added_before_clipping_and_weight_decay_after():
    # ge.L2(l2) is a term of the loss (weights only): clip_grad_norm_ then sees it;
    # weight_decay= acts in the optimizer, after clipping, on every parameter: torch's
    l2, lr, clip = 0.5, 0.1, 0.05
    penalized, feeds, linear = dense_model(ge.optimizer("sgd", lr=lr), regularizer=ge.L2(l2),
                                           clip_norm=clip)
    opt = torch.optim.SGD(linear.parameters(), lr=lr)
    for _ in range(3):
        penalized.train_step(feeds)
        opt.zero_grad()
        (torch_loss(linear, feeds) + l2 / 2 * linear.weight.pow(2).sum()).backward()
        torch.nn.utils.clip_grad_norm_(linear.parameters(), clip)
        opt.step()
    assert_same_weights(penalized, linear, rtol=CLIP_RTOL)

    decayed, feeds, linear = dense_model(ge.optimizer("sgd", lr=lr, weight_decay=l2), clip_norm=clip)
    opt = torch.optim.SGD(linear.parameters(), lr=lr, weight_decay=l2)
    for _ in range(3):
        decayed.train_step(feeds)
        opt.zero_grad()
        torch_loss(linear, feeds).backward()
        torch.nn.utils.clip_grad_norm_(linear.parameters(), clip)
        opt.step()
    assert_same_weights(decayed, linear, rtol=CLIP_RTOL)
    assert not np.allclose(penalized.parameters()["fc/W"], decayed.parameters()["fc/W"])


# --------------------------------------------------------------------------- conventions

LRS = [0.1, 0.1, 0.02, 0.02, 0.3]


def test_momentum_keeps_the_old_lr_inside_the_velocity():
    # ours: v <- mu v - lr_t g, w <- w + v. torch.optim.SGD scales the whole velocity by the
    # new lr, so the two part when the lr changes; torch with lr=1 fed lr_t * g is ours.
    mu = 0.8
    for name, nesterov in (("momentum", False), ("nesterov", True)):
        opt = ge.optimizer(name, lr=LRS[0], momentum=mu)
        w = W0.copy()
        state = opt.init_state(np, w)
        path = [W0.copy()]
        for t, lr in enumerate(LRS, 1):
            opt.lr = lr
            opt.update(np, w, gradient(w), state, t)
            path.append(w.copy())

        w_torch = torch.tensor(W0.copy(), requires_grad=True)
        torch_opt = torch.optim.SGD([w_torch], lr=1.0, momentum=mu, nesterov=nesterov)
        changed = torch_trajectory(lambda p, nesterov=nesterov: torch.optim.SGD(
            p, lr=LRS[0], momentum=mu, nesterov=nesterov), lrs=LRS)
        for t, lr in enumerate(LRS, 1):
            w_torch.grad = torch.tensor(gradient(w_torch.detach().numpy())) * lr
            torch_opt.step()
            np.testing.assert_allclose(path[t], w_torch.detach().numpy(), rtol=1e-10,
                                       err_msg=f"{name} step {t}")
        assert not np.allclose(path[-1], changed[-1])


def test_rmsprop_starts_its_mean_square_at_the_first_squared_gradient():
    ours = run_optimizer("rmsprop", {"lr": 0.05, "alpha": 0.7}, "numpy", steps=STEPS)
    seeded = torch_trajectory(lambda p: torch.optim.RMSprop(p, lr=0.05, alpha=0.7, eps=1e-8),
                              prepare=_seed_rmsprop_with_first_square(0.0))
    plain = torch_trajectory(lambda p: torch.optim.RMSprop(p, lr=0.05, alpha=0.7, eps=1e-8))
    np.testing.assert_allclose(ours[-1], seeded[-1], rtol=1e-10)
    assert not np.allclose(ours[-1], plain[-1])


def test_adagrad_default_eps_is_1e_8_where_torchs_is_1e_10():
    assert ge.optimizer("adagrad").eps == 1e-8
    assert torch.optim.Adagrad([torch.zeros(1)]).defaults["eps"] == 1e-10
