"""Learning-rate schedules and ReduceLROnPlateau: against torch.optim.lr_scheduler, in fit and
in a hand-written loop, saved with a model."""

from __future__ import annotations

import math

import numpy as np
import pytest

import graphengine as ge

rng = np.random.default_rng(5)


def regression(lr: float = 0.01, **compile_options):
    g = ge.Graph("regression")
    x, y = g.input("x", (None, 2)), g.input("y", (None, 1))
    out = g.layer("dense", x, units=1, name="fc")
    model = g.compile(g.loss("mse", out, y), optimizer=ge.optimizer("sgd", lr=lr), **compile_options)
    data = {"x": rng.standard_normal((8, 2)).astype(np.float32),
            "y": rng.standard_normal((8, 1)).astype(np.float32)}
    return model, data


def torch_lrs(make_scheduler, steps: int, lr: float = 1.0) -> list[float]:
    """The lr of each of ``steps`` updates under a torch scheduler stepped after each."""
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make_scheduler(torch, opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("total, warmup, floor", [(10, 3, 0.0), (12, 4, 0.1), (7, 0, 0.0),
                                                   (9, 0, 0.25)])
def test_cosine_decay_matches_torch_linear_warmup_then_cosine_annealing(total, warmup, floor):
    def make(torch, opt):
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup,
                                                            eta_min=floor)
        if not warmup:
            return cosine
        linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0,
                                                   total_iters=warmup - 1)
        return torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warmup])

    schedule = ge.CosineDecay(total, warmup=warmup, floor=floor, initial_lr=1.0)
    ours = [schedule.lr(t) for t in range(total + 1)]
    np.testing.assert_allclose(ours, torch_lrs(make, total + 1), rtol=1e-9, atol=1e-12)
    assert schedule.lr(total + 5) == pytest.approx(floor)  # torch's climbs again; ours stays


def test_cosine_decay_moves_per_step_in_a_hand_written_loop():
    schedule = ge.CosineDecay(6, warmup=2, per="step")
    model, data = regression(lr=0.4, schedule=schedule)
    seen = []
    for _ in range(8):
        model.train_step(data)
        seen.append(model.optimizer.lr)  # the lr the update just used
    np.testing.assert_allclose(seen, [0.4 * schedule.factor(t) for t in range(8)], rtol=1e-12)
    assert seen[0] == pytest.approx(0.2) and seen[1] == pytest.approx(0.4)
    assert seen[-1] == 0.0


def test_an_epoch_schedule_moves_in_a_hand_written_loop_that_advances_model_epoch():
    by_hand, data = regression(lr=0.1, schedule=ge.StepDecay(0.5, every=1))
    used = []
    for _epoch in range(3):
        for _batch in range(2):
            by_hand.train_step(data)
            used.append(by_hand.optimizer.lr)
        by_hand.epoch += 1  # what fit does after each epoch
    assert used == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])

    by_fit, _ = regression(lr=0.1, schedule=ge.StepDecay(0.5, every=1))
    by_fit.fit([data, data], epochs=3, verbose=0, monitor=False)
    assert by_fit.optimizer.lr == pytest.approx(used[-1])
    np.testing.assert_allclose(by_fit.parameters()["fc/W"], by_hand.parameters()["fc/W"], rtol=1e-6)


def test_without_advancing_model_epoch_an_epoch_schedule_stays_put():
    model, data = regression(lr=0.1, schedule=ge.StepDecay(0.5, every=1))
    for _ in range(4):
        model.train_step(data)
    assert model.optimizer.lr == 0.1  # per="epoch" counts model.epoch, which only fit advances


def test_cosine_decay_is_saved_with_the_model(tmp_path):
    model, _ = regression(schedule=ge.CosineDecay(20, warmup=5, floor=0.1, per="step"))
    model.save(tmp_path / "m.ge")
    loaded = ge.load(tmp_path / "m.ge")
    (schedule,) = [h for h in loaded.gradient_transforms if isinstance(h, ge.CosineDecay)]
    assert (schedule.total, schedule.warmup, schedule.floor, schedule.per) == (20, 5, 0.1, "step")


@pytest.mark.parametrize("arguments, message", [
    ({"total": 5, "warmup": 5}, "shorter than total"),
    ({"total": 0}, "total"),
    ({"total": 5, "floor": 1.5}, "floor"),
    ({"total": 5, "per": "batch"}, "per must be"),
])
def test_cosine_decay_refuses_bad_arguments(arguments, message):
    with pytest.raises(ge.GraphEngineError, match=message):
        ge.CosineDecay(**arguments)


# --------------------------------------------------------------------------- ReduceLROnPlateau

LOSSES = [1.0, 0.9, 0.9, 0.95, 0.9, 0.89995, 0.5, 0.5, 0.5, 0.5, 0.5, 0.4, 0.41, 0.42, 0.43,
          0.44, 0.45, 0.46, 0.47, -1.0, -0.99995, -0.99, -0.98]


@pytest.mark.parametrize("options", [
    {"factor": 0.5, "patience": 1},
    {"factor": 0.1, "patience": 2, "cooldown": 2, "min_lr": 2e-3},
    {"factor": 0.5, "patience": 0, "threshold": 0.05, "threshold_mode": "abs"},
    {"factor": 0.3, "patience": 1, "mode": "max"},
])
def test_reduce_lr_on_plateau_matches_torch_over_a_loss_sequence(options):
    torch = pytest.importorskip("torch")
    model, _ = regression(lr=1.0)
    plateau = ge.ReduceLROnPlateau(**options)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **options)
    for value in LOSSES:
        plateau.step(model, value)
        theirs.step(value)
        assert model.optimizer.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), value
    assert plateau.reductions  # the sequence does reduce under every setting


def test_reduce_lr_on_plateau_in_fit_reads_the_epoch_logs():
    model, data = regression(lr=0.01)
    # a gain under half the loss counts as none: a plateau from the second epoch on
    plateau = ge.ReduceLROnPlateau(factor=0.5, patience=1, monitor="loss", threshold=0.5)
    history = model.fit(data, epochs=6, batch_size=8, verbose=0, callbacks=[plateau],
                        monitor=False)
    assert history["loss"][-1] < history["loss"][0]
    assert [epoch for epoch, _ in plateau.reductions] == [3, 5]
    assert model.optimizer.lr == pytest.approx(0.0025)


def test_reduce_lr_on_plateau_names_a_missing_metric_and_refuses_a_schedule():
    model, data = regression()
    with pytest.raises(ge.GraphEngineError, match="monitors 'val_loss'.*pass validation="):
        model.fit(data, epochs=1, batch_size=8, verbose=0, callbacks=[ge.ReduceLROnPlateau()],
                  monitor=False)
    scheduled, data = regression(schedule=ge.StepDecay())
    with pytest.raises(ge.GraphEngineError, match="both set the learning rate"):
        scheduled.fit(data, epochs=1, batch_size=8, verbose=0,
                      callbacks=[ge.ReduceLROnPlateau(monitor="loss")])


@pytest.mark.parametrize("arguments", [{"factor": 1.0}, {"factor": 0.0}, {"patience": -1},
                                       {"mode": "lowest"}, {"threshold_mode": "relative"},
                                       {"min_lr": math.nan}])
def test_reduce_lr_on_plateau_refuses_bad_arguments(arguments):
    with pytest.raises(ge.GraphEngineError, match="ReduceLROnPlateau"):
        ge.ReduceLROnPlateau(**arguments)
