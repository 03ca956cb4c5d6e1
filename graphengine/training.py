"""The training loop: batching, shuffling, metrics, validation, callbacks, history."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import LossOp
from .errors import DataError, GraphEngineError

if TYPE_CHECKING:
    from .model import Model


class History:
    """Per-epoch metrics: ``history["loss"]``, ``history["val_accuracy"]``, ..."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.metrics: dict[str, list[float]] = {}

    def append(self, epoch: int, logs: Mapping[str, float]) -> None:
        self.epochs.append(epoch)
        for key, value in logs.items():
            self.metrics.setdefault(key, []).append(float(value))

    def __getitem__(self, key: str) -> list[float]:
        try:
            return self.metrics[key]
        except KeyError:
            raise KeyError(f"no metric {key!r} in this history; it has {sorted(self.metrics)}") from None

    def __contains__(self, key: str) -> bool:
        return key in self.metrics

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), **{k: list(v) for k, v in self.metrics.items()}}

    def __repr__(self) -> str:
        last = {k: round(v[-1], 4) for k, v in self.metrics.items() if v}
        return f"<History {len(self.epochs)} epochs, last {last}>"


class Callback:
    """Hooks into :func:`fit`. Set ``model.stop_training = True`` to end training early."""

    def on_train_begin(self, model: Model, history: History) -> None: ...
    def on_epoch_begin(self, model: Model, epoch: int) -> None: ...
    def on_batch_end(self, model: Model, batch: int, loss: float) -> None: ...
    def on_epoch_end(self, model: Model, epoch: int, logs: dict[str, float]) -> None: ...
    def on_train_end(self, model: Model, history: History) -> None: ...


def dataset_length(data: Mapping[str, Any]) -> int:
    if not isinstance(data, Mapping) or not data:
        raise DataError("the dataset must be a non-empty dict of input name -> array")
    lengths = {name: len(array) if hasattr(array, "__len__") else -1 for name, array in data.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"the dataset's arrays differ in length: {lengths}")
    n = next(iter(lengths.values()))
    if n <= 0:
        raise DataError(f"the dataset is empty ({lengths})")
    return n


def batches(data: Mapping[str, Any], n: int, batch_size: int,
            order: np.ndarray | None) -> Iterator[dict[str, Any]]:
    """Slices of ``data`` of ``batch_size`` rows (the last may be smaller), in ``order``."""
    for start in range(0, n, batch_size):
        if order is None:
            yield {k: v[start:start + batch_size] for k, v in data.items()}
        else:
            index = order[start:start + batch_size]
            yield {k: v[index] for k, v in data.items()}


def _loss_parts(model: Model) -> tuple[LossOp | None, str | None, str | None]:
    node = model.graph.nodes[model.loss_name]
    if isinstance(node.op, LossOp):
        return node.op, node.inputs[0], node.inputs[1]
    return None, None, None


def _progress(enabled: bool | None, total: int, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, unit="batch")


def fit(model: Model, data: Mapping[str, Any], *, epochs: int = 1, batch_size: int = 32,
        shuffle: bool = True, validation: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callback] = (), progress: bool | None = None,
        history: History | None = None) -> History:
    """Train ``model`` on ``data`` (input name -> array, targets included) for ``epochs``.

    Each epoch shuffles (``shuffle=True``), runs mini-batches of ``batch_size`` (the whole set
    for full-batch gradient descent, 1 for stochastic), then evaluates on ``validation`` if
    given. Returns a :class:`History` with ``loss``, ``accuracy``, ``error`` (0/1 error, where
    the loss defines accuracy) and their ``val_`` counterparts per epoch.
    ``progress`` shows a tqdm bar (default: only on a terminal).
    """
    if model.loss_name is None:
        raise GraphEngineError("fit() needs a model compiled with a loss")
    if model.optimizer is None:
        raise GraphEngineError("fit() needs an optimizer: compile(..., optimizer=ge.optimizer('sgd'))")
    n = dataset_length(data)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size > n:
        raise DataError(f"batch_size {batch_size} is larger than the dataset ({n} rows); use "
                        f"batch_size={n} for full-batch gradient descent")
    data = {k: np.asarray(v) if not model.backend.is_array(v) else v for k, v in data.items()}
    history = history or History()
    model.stop_training = False
    loss_op, pred_name, target_name = _loss_parts(model)
    pred_slot = model.train_plan.slots[pred_name] if pred_name else None
    rng = getattr(model, "data_rng", None)
    if rng is None:
        rng = model.data_rng = np.random.default_rng(model.seed + 2)
    for callback in callbacks:
        callback.on_train_begin(model, history)
    first_epoch = model.epoch
    for epoch in range(first_epoch + 1, first_epoch + epochs + 1):
        for callback in callbacks:
            callback.on_epoch_begin(model, epoch)
        order = rng.permutation(n) if shuffle else None
        bar = _progress(progress, math.ceil(n / batch_size), f"epoch {epoch}")
        totals = {"loss": 0.0, "correct": 0.0}
        for b, batch in enumerate(batches(data, n, batch_size, order)):
            size = len(next(iter(batch.values())))
            loss = model.forward(batch, training=True)
            if not math.isfinite(loss):
                raise GraphEngineError(
                    f"the loss became {loss} at epoch {epoch}, batch {b}: lower the learning rate, "
                    f"clip gradients, or set model.debug = True to find the node that made it")
            totals["loss"] += loss * size
            if loss_op is not None:
                acc = loss_op.loss.accuracy(model.xp, model._values[pred_slot],
                                            model._values[model.train_plan.slots[target_name]])
                if acc is not None:
                    totals["correct"] += float(model.backend.to_numpy(acc)) * size
                else:
                    totals["correct"] = math.nan
            model.backward()
            model.step()
            for callback in callbacks:
                callback.on_batch_end(model, b, loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
        if bar is not None:
            bar.close()
        model.epoch = epoch
        logs = {"loss": totals["loss"] / n}
        if not math.isnan(totals["correct"]) and loss_op is not None:
            logs["accuracy"] = totals["correct"] / n
            logs["error"] = 1.0 - logs["accuracy"]
        if validation is not None:
            logs.update({f"val_{k}": v for k, v in evaluate(model, validation, batch_size).items()})
        history.append(epoch, logs)
        for callback in callbacks:
            callback.on_epoch_end(model, epoch, logs)
        if model.stop_training:
            break
    for callback in callbacks:
        callback.on_train_end(model, history)
    return history


def evaluate(model: Model, data: Mapping[str, Any], batch_size: int | None = None) -> dict[str, float]:
    """Mean loss, and accuracy and 0/1 error where the loss defines them, in evaluation mode."""
    if model.loss_name is None:
        raise GraphEngineError("evaluate() needs a model compiled with a loss")
    n = dataset_length(data)
    loss_op, pred_name, target_name = _loss_parts(model)
    fetch = (model.loss_name,) + ((pred_name, target_name) if loss_op else ())
    plan = model._get_plan("infer", fetch)
    was_training = model.training
    model._set_mode(False)
    total_loss, correct = 0.0, 0.0
    try:
        for batch in batches(data, n, batch_size or n, order=None):
            size = len(next(iter(batch.values())))
            values = model._prepare(plan, batch)
            model._run_forward(plan, values)
            total_loss += float(model.backend.to_numpy(values[plan.slots[model.loss_name]])) * size
            if loss_op is not None:
                acc = loss_op.loss.accuracy(model.xp, values[plan.slots[pred_name]],
                                            values[plan.slots[target_name]])
                correct = math.nan if acc is None else correct + float(model.backend.to_numpy(acc)) * size
    finally:
        model._set_mode(was_training)
    out = {"loss": total_loss / n}
    if loss_op is not None and not math.isnan(correct):
        out["accuracy"] = correct / n
        out["error"] = 1.0 - out["accuracy"]
    return out
