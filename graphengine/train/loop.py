"""The training loop: batching, shuffling, metrics, validation, callbacks, history, and the
fitting of data-fitted layers (preprocessing) before training."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, GraphEngineError, NumericalError, require_int
from ..hooks import get_plugin_manager
from ..ir.contracts import LossOp

if TYPE_CHECKING:
    from ..model import Model


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
    """Hooks into :func:`fit`. Set ``model.stop_training = True`` to end training early.

    ``logs`` holds the epoch's metrics: ``loss``, ``accuracy``, ``error`` and, with
    ``validation=``, ``val_loss``, ``val_accuracy``, ``val_error``.
    """

    def on_train_begin(self, model: Model, history: History) -> None: ...
    def on_epoch_begin(self, model: Model, epoch: int) -> None: ...
    def on_batch_end(self, model: Model, batch: int, loss: float) -> None: ...
    def on_epoch_end(self, model: Model, epoch: int, logs: dict[str, float]) -> None: ...
    def on_train_end(self, model: Model, history: History) -> None: ...


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs; with ``restore_best``,
    the model ends with the weights of its best epoch (not those of the last).

    ``mode`` is "min", "max", or "auto" (max for accuracies, min otherwise); an improvement
    must exceed ``min_delta``. After fit: ``best_epoch``, ``best`` (the value there),
    ``stopped_epoch`` (None if training ran out of epochs first).
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "auto", restore_best: bool = True) -> None:
        if mode not in ("auto", "min", "max"):
            raise GraphEngineError(f"EarlyStopping mode must be 'auto', 'min' or 'max', got {mode!r}")
        patience = require_int(patience, "EarlyStopping patience", 0, GraphEngineError)
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.restore_best = restore_best
        self.sign = 1.0 if (mode == "max" or mode == "auto" and monitor.endswith("accuracy")) else -1.0

    def on_train_begin(self, model, history):
        self.best, self.best_epoch, self.stopped_epoch = -math.inf * self.sign, None, None
        self.last_epoch, self.wait, self.best_weights = None, 0, None

    def on_epoch_end(self, model, epoch, logs):
        if self.monitor not in logs:
            hint = "; pass validation= to fit()" if self.monitor.startswith("val_") else ""
            raise GraphEngineError(f"EarlyStopping monitors {self.monitor!r}, but the epoch logs "
                                   f"have only {sorted(logs)}{hint}")
        value, self.last_epoch = logs[self.monitor], epoch
        if self.sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self.best_weights = {name: model.backend.to_numpy(array).copy()
                                     for name, array in model.parameters().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            model.stop_training = True

    def on_train_end(self, model, history):
        if self.best_weights is not None and self.best_epoch != self.last_epoch:
            model.set_parameters(self.best_weights)


class Checkpoint(Callback):
    """Save the model every ``every`` epochs (and after the last epoch) with its training state,
    so that ``ge.load(path)`` and ``fit`` resume the run as if never interrupted. ``path`` may
    hold ``{epoch}`` to keep one file per checkpoint; each save is atomic."""

    def __init__(self, path: str | os.PathLike, every: int = 1, training_state: bool = True) -> None:
        every = require_int(every, "Checkpoint every", 1, GraphEngineError)
        self.path, self.every, self.training_state = os.fspath(path), every, training_state
        self.saved: list[str] = []

    def _save(self, model: Model) -> None:
        path = self.path.format(epoch=model.epoch)
        model.save(path, training_state=self.training_state)
        self.saved.append(path)

    def on_epoch_end(self, model, epoch, logs):
        if epoch % self.every == 0:
            self._save(model)

    def on_train_end(self, model, history):
        if model.epoch % self.every != 0:
            self._save(model)


def dataset_length(data: Mapping[str, Any]) -> int:
    if not isinstance(data, Mapping) or not data:
        raise DataError("the dataset must be a non-empty dict of input name -> array")
    lengths = {name: _rows(array) for name, array in data.items()}
    scalars = [name for name, rows in lengths.items() if rows is None]
    if scalars:
        raise DataError(f"dataset entries {scalars} are not arrays with a first (batch) dimension: "
                        f"give each input one row per example")
    if len(set(lengths.values())) != 1:
        raise DataError(f"the dataset's arrays differ in length: {lengths}; give every input "
                        f"one row per example")
    n = next(iter(lengths.values()))
    if n <= 0:
        raise DataError(f"the dataset is empty ({lengths}): pass at least one example")
    return n


def _rows(array: Any) -> int | None:
    """The length of the first dimension, or None for a scalar."""
    shape = getattr(array, "shape", None)
    if shape is not None:
        return shape[0] if len(shape) else None
    return len(array) if hasattr(array, "__len__") and not isinstance(array, (str, bytes)) else None


def batches(data: Mapping[str, Any], n: int, batch_size: int,
            order: np.ndarray | None) -> Iterator[dict[str, Any]]:
    """Slices of ``data`` of ``batch_size`` rows (the last may be smaller), in ``order``."""
    batch_size = require_int(batch_size, "batch_size", 1, DataError)
    for start in range(0, n, batch_size):
        if order is None:
            yield {k: v[start:start + batch_size] for k, v in data.items()}
        else:
            index = order[start:start + batch_size]
            rows = index.tolist()  # arrays of other backends take a list, not a host array
            yield {k: v[index] if isinstance(v, np.ndarray) else v[rows] for k, v in data.items()}


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

    Epochs are counted on from ``model.epoch``: after ``ge.load`` of a checkpoint,
    ``fit(data, epochs=total - model.epoch)`` finishes the run, drawing the same shuffles and
    dropout masks as an uninterrupted run. Data-fitted layers not fitted yet (preprocessing) are
    fitted on ``data`` first, see :func:`fit_preprocessing`. The batches run in training mode;
    afterwards the model is in the mode it was in before (see :meth:`Model.mode`).
    """
    if model.loss_name is None:
        raise GraphEngineError("fit() needs a model compiled with a loss")
    if model.optimizer is None:
        raise GraphEngineError("fit() needs an optimizer: compile(..., optimizer=ge.optimizer('sgd'))")
    n = dataset_length(data)
    batch_size = require_int(batch_size, "batch_size", 1, DataError)
    epochs = require_int(epochs, "epochs", 0, DataError)
    if batch_size > n:
        raise DataError(f"batch_size {batch_size} is larger than the dataset ({n} rows); use "
                        f"batch_size={n} for full-batch gradient descent")
    data = {k: model.feed_array(k, v) for k, v in data.items()}
    fit_preprocessing(model, data)
    history = history or History()
    model.stop_training = False
    loss_op, pred_name, target_name = _loss_parts(model)
    with model.mode(training=True):
        for callback in callbacks:
            callback.on_train_begin(model, history)
        first_epoch = model.epoch
        for epoch in range(first_epoch + 1, first_epoch + epochs + 1):
            for callback in callbacks:
                callback.on_epoch_begin(model, epoch)
            order = model.data_rng.permutation(n) if shuffle else None
            bar = _progress(progress, math.ceil(n / batch_size), f"epoch {epoch}")
            totals = {"loss": 0.0, "correct": 0.0}
            for b, batch in enumerate(batches(data, n, batch_size, order)):
                size = len(next(iter(batch.values())))
                loss = model.forward(batch, training=True)
                if not math.isfinite(loss):
                    raise NumericalError(
                        f"the loss became {loss} at epoch {epoch}, batch {b}: lower the learning rate, "
                        f"clip gradients, or set model.debug = True to find the node that made it")
                totals["loss"] += loss * size
                if loss_op is not None:
                    acc = loss_op.loss.accuracy(model.xp, model.tape.value(pred_name),
                                                model.tape.value(target_name))
                    if acc is not None:
                        totals["correct"] += float(model.backend.to_numpy(acc)) * size
                    else:
                        totals["correct"] = math.nan
                model.backward()
                _check_gradients(model, epoch, b, loss)
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


def fit_preprocessing(model: Model, data: Mapping[str, Any], *, refit: bool = False,
                      batch_size: int = 4096) -> list[str]:
    """Fit the model's data-fitted layers (preprocessing such as ``zscore`` or ``pca``) on
    ``data``; returns the names of the layers fitted.

    A layer is data-fitted when its class has ``fit_data(x) -> {name: array}``: given its
    input over the whole of ``data`` (a host array), it returns values for its parameters by
    local name. Layers are fitted in graph order, so each sees its input as transformed by the
    layers before it (z-score, then PCA). A layer fitted already is skipped unless ``refit``:
    the statistics belong to the model, are saved with it and survive fine-tuning.
    """
    layers = get_plugin_manager().layers
    fitted: list[str] = []
    for call in model.graph.calls:
        if call["call"] != "layer" or not hasattr(layers.get(call["kind"]), "fit_data"):
            continue
        scope = call["name"]
        if scope in model.fitted_layers and not refit:
            continue
        layer = layers.get(call["kind"])(**call["config"])
        statistics = layer.fit_data(_host_values(model, data, call["inputs"][0], batch_size))
        model.set_parameters({f"{scope}/{name}": value for name, value in statistics.items()})
        model.fitted_layers.add(scope)
        fitted.append(scope)
    return fitted


def _host_values(model: Model, data: Mapping[str, Any], node: str, batch_size: int) -> np.ndarray:
    """Node ``node`` evaluated over ``data``, in evaluation mode, as one host array."""
    n = dataset_length(data)
    parts = [model.run(batch, fetches=[node])[node]
             for batch in batches(data, n, batch_size, order=None)]
    return np.concatenate(parts)


def _check_gradients(model: Model, epoch: int, batch: int, loss: float) -> None:
    """Refuse an update from non-finite gradients, so that a failed fit leaves the parameters
    as they were before the step that would have spoiled them."""
    grads = model.gradients()
    if not grads:
        return
    # Reductions on the device and one transfer: a NaN or Inf anywhere makes the sum non-finite.
    total = sum(g.sum() for g in grads.values())
    if math.isfinite(float(model.backend.to_numpy(total))):
        return
    bad = [name for name, g in grads.items()
           if not bool(model.backend.to_numpy(model.xp.all(model.xp.isfinite(g))))]
    if not bad:  # finite gradients whose sum overflowed
        return
    raise NumericalError(
        f"the gradients of {bad} are not finite at epoch {epoch}, batch {batch} "
        f"(loss {loss:.6g}); the update was skipped, so the parameters are unchanged: set "
        f"model.debug = True to find the node that made them, lower the learning rate or clip "
        f"gradients")


def evaluate(model: Model, data: Mapping[str, Any], batch_size: int | None = None) -> dict[str, float]:
    """Mean loss, and accuracy and 0/1 error where the loss defines them, in evaluation mode."""
    if model.loss_name is None:
        raise GraphEngineError("evaluate() needs a model compiled with a loss")
    n = dataset_length(data)
    loss_op, pred_name, target_name = _loss_parts(model)
    fetch = (model.loss_name,) + ((pred_name, target_name) if loss_op else ())
    plan = model.plan("infer", fetch)
    total_loss, correct = 0.0, 0.0
    observers = model.active_observers(inference=True)
    for batch in batches(data, n, n if batch_size is None else batch_size, order=None):
        size = len(next(iter(batch.values())))
        tape = model.executor.forward(plan, batch, training=False, rng=model.rng, observers=observers)
        total_loss += float(model.backend.to_numpy(tape.value(model.loss_name))) * size
        if loss_op is not None:
            acc = loss_op.loss.accuracy(model.xp, tape.value(pred_name), tape.value(target_name))
            correct = math.nan if acc is None else correct + float(model.backend.to_numpy(acc)) * size
    out = {"loss": total_loss / n}
    if loss_op is not None and not math.isnan(correct):
        out["accuracy"] = correct / n
        out["error"] = 1.0 - out["accuracy"]
    return out
