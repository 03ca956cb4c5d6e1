"""The training loop: batching, shuffling, metrics, validation, callbacks, history, and the
fitting of data-fitted layers (preprocessing) before training."""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..distributed import writes
from ..errors import (
    DataError,
    GraphEngineError,
    NumericalError,
    checked_keywords,
    require_int,
    require_number,
)
from ..hooks import get_plugin_manager
from ..ir.contracts import LossOp
from ..runtime.feeds import batch_rows, rows
from ..tools.monitor import GradientMonitor, find_monitor
from .metrics import Meter, Metric, get_metrics
from .regularization import Schedule

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
        patience = require_int(patience, "EarlyStopping patience", 0, GraphEngineError)
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.restore_best = restore_best
        self.sign = 1.0 if _higher_is_better(mode, monitor, "EarlyStopping") else -1.0

    def on_train_begin(self, model, history):
        self.best, self.best_epoch, self.stopped_epoch = -math.inf * self.sign, None, None
        self.last_epoch, self.wait, self.best_weights = None, 0, None

    def on_epoch_end(self, model, epoch, logs):
        value, self.last_epoch = _logged(logs, self.monitor, "EarlyStopping"), epoch
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


def _higher_is_better(mode: str, monitor: str, who: str) -> bool:
    """``mode`` "max", or "auto" on an accuracy; "min" and "auto" on anything else: lower."""
    if mode not in ("auto", "min", "max"):
        raise GraphEngineError(f"{who} mode must be 'auto', 'min' or 'max', got {mode!r}")
    return mode == "max" or mode == "auto" and monitor.endswith("accuracy")


def _logged(logs: Mapping[str, float], monitor: str, who: str) -> float:
    """The monitored value from an epoch's logs, or an error saying which there are."""
    if monitor not in logs:
        hint = "; pass validation= to fit()" if monitor.startswith("val_") else ""
        raise GraphEngineError(f"{who} monitors {monitor!r}, but the epoch logs have only "
                               f"{sorted(logs)}{hint}")
    return logs[monitor]


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not improved for more
    than ``patience`` epochs, as ``torch.optim.lr_scheduler.ReduceLROnPlateau`` does, with its
    defaults and meanings: an improvement beats the best value by more than ``threshold``,
    relative (``threshold_mode="rel"``: below ``best * (1 - threshold)`` in mode "min") or
    absolute (``"abs"``: below ``best - threshold``); after a reduction, ``cooldown`` epochs
    pass before bad epochs count again; the lr never drops below ``min_lr``.

    ``mode`` is "min", "max", or "auto" (max for accuracies, min otherwise). In ``fit``
    it reads the epoch's logs; a hand-written loop calls ``plateau.step(model, value)`` once
    per epoch (PyTorch's ``scheduler.step(val_loss)``). ``reductions`` lists the ``(epoch,
    new lr)`` of each reduction. It sets ``model.optimizer.lr``, so it cannot share a model
    with a :class:`~graphengine.train.regularization.Schedule`, which sets it on every update.
    """

    def __init__(self, factor: float = 0.1, patience: int = 10, monitor: str = "val_loss",
                 mode: str = "auto", threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float = 0.0) -> None:
        self.factor = require_number(factor, "ReduceLROnPlateau factor", 0, 1,
                                     exclusive_minimum=True, exclusive_maximum=True,
                                     error=GraphEngineError)
        self.patience = require_int(patience, "ReduceLROnPlateau patience", 0, GraphEngineError)
        self.cooldown = require_int(cooldown, "ReduceLROnPlateau cooldown", 0, GraphEngineError)
        self.threshold = require_number(threshold, "ReduceLROnPlateau threshold", 0,
                                        error=GraphEngineError)
        self.min_lr = require_number(min_lr, "ReduceLROnPlateau min_lr", 0, error=GraphEngineError)
        if threshold_mode not in ("rel", "abs"):
            raise GraphEngineError(f"ReduceLROnPlateau threshold_mode must be 'rel' or 'abs', "
                                   f"got {threshold_mode!r}")
        self.monitor, self.threshold_mode = monitor, threshold_mode
        self.higher = _higher_is_better(mode, monitor, "ReduceLROnPlateau")
        self.best = -math.inf if self.higher else math.inf
        self.bad_epochs = self.cooldown_left = self.epochs = 0
        self.reductions: list[tuple[int, float]] = []

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than the threshold."""
        sign = 1.0 if self.higher else -1.0
        if self.threshold_mode == "rel":  # torch's formula, also where the best is negative
            bar = self.best * (1.0 + sign * self.threshold)
        else:
            bar = self.best + sign * self.threshold
        return value > bar if self.higher else value < bar

    def step(self, model: Model, value: float) -> None:
        """Count one epoch whose monitored value is ``value``; lower the lr after a plateau."""
        if model.optimizer is None:
            raise GraphEngineError("ReduceLROnPlateau needs a model compiled with an optimizer")
        _refuse_schedules(model)
        self.epochs += 1
        value = float(value)
        if self.improves(value):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            old = model.optimizer.lr
            new = max(old * self.factor, self.min_lr)
            if old - new > 1e-8:  # torch's eps: changes smaller than this are skipped
                model.optimizer.lr = new
                self.reductions.append((self.epochs, new))
            self.cooldown_left, self.bad_epochs = self.cooldown, 0

    def on_train_begin(self, model, history):
        _refuse_schedules(model)

    def on_epoch_end(self, model, epoch, logs):
        self.step(model, _logged(logs, self.monitor, "ReduceLROnPlateau"))


def _refuse_schedules(model: Model) -> None:
    schedules = [t for t in model.gradient_transforms if isinstance(t, Schedule)]
    if schedules:
        raise GraphEngineError(f"ReduceLROnPlateau and the schedule {schedules[0]!r} would both "
                               f"set the learning rate: compile without schedule=, or drop the "
                               f"callback")


class Checkpoint(Callback):
    """Save the model every ``every`` epochs (and after the last epoch) with its training state,
    so that ``ge.load(path)`` and ``fit`` resume the run as if never interrupted. ``path`` may
    hold ``{epoch}`` to keep one file per checkpoint; each save is atomic."""

    def __init__(self, path: str | os.PathLike, every: int = 1, training_state: bool = True) -> None:
        every = require_int(every, "Checkpoint every", 1, GraphEngineError)
        self.path, self.every, self.training_state = os.fspath(path), every, training_state
        self._check_path()
        self.saved: list[str] = []

    def _check_path(self) -> None:
        """Fail now, not after the first epoch's training: a pattern ``str.format`` cannot fill
        with ``epoch`` alone, or a directory that does not exist or cannot be written."""
        try:
            example = self.path.format(epoch=1)
        except (IndexError, KeyError, ValueError, AttributeError, TypeError) as exc:
            raise GraphEngineError(
                f"Checkpoint path {self.path!r} is not a valid pattern ({type(exc).__name__}: "
                f"{exc}): it may hold {{epoch}} and nothing else in braces; write a literal "
                f"brace as {{{{ or }}}}") from None
        directory = os.path.dirname(os.path.abspath(example))
        if os.path.dirname(self.path) != os.path.dirname(self.path.format(epoch=2)):
            return  # one directory per epoch: each is checked when its save comes
        if not os.path.isdir(directory):
            raise GraphEngineError(f"Checkpoint directory {directory!r} does not exist (or is not "
                                   f"a directory): create it first (os.makedirs)")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise GraphEngineError(f"Checkpoint directory {directory!r} is not writable")

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
    lengths = {name: rows(array) for name, array in data.items()}
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


def batches(data: Mapping[str, Any], n: int, batch_size: int, order: np.ndarray | None,
            share: Callable[[int, int], tuple[int, int]] | None = None) -> Iterator[dict[str, Any]]:
    """Slices of ``data`` of ``batch_size`` rows (the last may be smaller), in ``order``; with
    ``share`` (a distributed model's), each the part ``share(start, stop)`` of such a slice."""
    batch_size = require_int(batch_size, "batch_size", 1, DataError)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if share is not None:
            start, stop = share(start, stop)
        if order is None:
            yield {k: v[start:stop] for k, v in data.items()}
        else:
            index = order[start:stop]
            rows = index.tolist()  # arrays of other backends take a list, not a host array
            yield {k: v[index] if isinstance(v, np.ndarray) else v[rows] for k, v in data.items()}


def _share(model: Model) -> Callable[[int, int], tuple[int, int]] | None:
    """How a distributed model's rank takes its part of each global batch (None: all of it)."""
    return model.distributed.comm.share if model.distributed else None


def _own_part(model: Model, batch: Mapping[str, Any], rows: int) -> tuple[int, Mapping[str, Any]]:
    """A distributed model's rank's part of a global batch from a stream, and its rows."""
    share = _share(model)
    if share is None:
        return rows, batch
    start, stop = share(0, rows)
    return stop - start, {k: v[start:stop] for k, v in batch.items()}


def _loss_parts(model: Model, metrics: Sequence[Metric] = ()
                ) -> tuple[LossOp | None, str | None, str | None]:
    """The loss operator, its prediction and its target, where the loss is a registered one."""
    node = model.graph.nodes[model.loss_name]
    if isinstance(node.op, LossOp):
        return node.op, node.inputs[0], node.inputs[1]
    if metrics:
        raise GraphEngineError(f"metrics {[m.name for m in metrics]} need a loss built with "
                               f"g.loss(kind, prediction, target); the loss "
                               f"{model.loss_name!r} is built by hand, so the prediction and the "
                               f"target are not known")
    return None, None, None


#: Steps between the gradient statistics ``fit`` records by default (see ``monitor=``). A
#: recorded step and the one after it cost about two extra steps on the deep narrow MLP, whose
#: steps are mostly per-operator overhead (``benchmarks/monitor_overhead.py``: 2.1% of training
#: time at 100 steps), so 200 keeps the cost near 1%, under the 2% allowed.
MONITOR_EVERY = 200

#: What ``fit`` takes as data: one dataset dict, or batch dicts (a list, a generator, ...).
Data = Mapping[str, Any] | Iterable[Mapping[str, Any]]


def _progress(verbose: int, total: int | None, desc: str):
    if verbose < 2:
        return None
    from tqdm.auto import tqdm  # a widget in notebooks, text on a terminal or in a pipe
    return tqdm(total=total, desc=desc, leave=False, unit="batch")


def _epoch_line(epoch: int, last: int, logs: Mapping[str, float], seconds: float) -> str:
    """``epoch 3/10  loss 0.2345  accuracy 0.95  val_loss 0.3  (0.12 s)``; the 0/1 error,
    which is 1 - accuracy, is left to the History."""
    width = len(str(last))
    values = "  ".join(f"{k} {v:.4g}" for k, v in logs.items() if not k.endswith("error"))
    return f"epoch {epoch:>{width}}/{last}  {values}  ({seconds:.2f} s)"


def _data_fitted_calls(model: Model) -> Iterator[tuple[str, dict[str, Any]]]:
    """The model's data-fitted layers (preprocessing), in graph order: (full name, builder call)."""
    layers = get_plugin_manager().layers
    for scope, call in model.graph.layers().items():
        if hasattr(layers.get(call["kind"]), "fit_data"):
            yield scope, call


class _Batches:
    """The batches of each epoch, from a dataset dict (shuffled, sliced) or from batch dicts
    (an iterable, walked once per epoch, or an iterator, read on across epochs)."""

    def __init__(self, model: Model, data: Data, epochs: int, batch_size: int, shuffle: bool,
                 steps_per_epoch: int | None) -> None:
        self.model, self.shuffle, self.steps = model, shuffle, steps_per_epoch
        self.batch_size = require_int(batch_size, "batch_size", 1, DataError)
        if isinstance(data, Mapping):
            self.n = dataset_length(data)
            if self.batch_size > self.n:
                raise DataError(f"batch_size {self.batch_size} is larger than the dataset "
                                f"({self.n} rows); use batch_size={self.n} for full-batch "
                                f"gradient descent")
            self.data: Any = {k: model.feed_array(k, v) for k, v in data.items()}
            if model.distributed:
                model.distributed.check_batches(self.batch_size, self.n % self.batch_size)
            return
        if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise DataError(f"fit() takes a dataset dict (input name -> array) or an iterable of "
                            f"batch dicts, got {type(data).__name__}")
        self.n, self.data = None, data
        if iter(data) is data and steps_per_epoch is None and epochs > 1:
            raise DataError(f"a generator or iterator of batches is used up after one pass, and "
                            f"fit() was asked for {epochs} epochs: pass steps_per_epoch=N (N "
                            f"batches make an epoch), or a list of batches, or an object whose "
                            f"__iter__ starts the batches afresh")
        unfitted = [scope for scope, _ in _data_fitted_calls(model) if scope not in model.fitted_layers]
        if unfitted:
            raise DataError(f"data-fitted layers {unfitted} need the whole training set, which a "
                            f"stream of batches does not give: call "
                            f"model.fit_preprocessing(dataset_dict) before fit()")

    @property
    def per_epoch(self) -> int | None:
        """Batches per epoch where known beforehand (for the progress bar)."""
        if self.n is not None:
            return math.ceil(self.n / self.batch_size)
        if self.steps is not None:
            return self.steps
        return len(self.data) if hasattr(self.data, "__len__") else None

    def epoch(self, epoch: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(rows, batch) pairs of one epoch."""
        if self.n is not None:
            order = self.model.data_rng.permutation(self.n) if self.shuffle else None
            for batch in batches(self.data, self.n, self.batch_size, order, _share(self.model)):
                yield len(next(iter(batch.values()))), batch
            return
        stream = itertools.islice(iter(self.data), self.steps)
        count = 0
        for count, batch in enumerate(stream, start=1):
            if not isinstance(batch, Mapping):
                raise DataError(f"batch {count - 1} of epoch {epoch} is a {type(batch).__name__}, "
                                f"not a dict of input name -> array")
            rows = dataset_length(batch)
            if self.model.distributed:
                self.model.distributed.check_batches(rows)
            rows, batch = _own_part(self.model, batch, rows)
            yield rows, {k: self.model.feed_array(k, v) for k, v in batch.items()}
        if count == 0:
            raise DataError(f"the batches ran out before epoch {epoch}: a generator is used up "
                            f"after one pass; give one that yields at least epochs x "
                            f"steps_per_epoch batches, or a list")


@checked_keywords
def fit(model: Model, data: Data, *, epochs: int = 1, batch_size: int = 32,
        shuffle: bool = True, validation: Data | None = None,
        callbacks: Sequence[Callback] = (), metrics: Any = None, verbose: int = 1,
        monitor: bool = True, steps_per_epoch: int | None = None,
        history: History | None = None) -> History:
    """Train ``model`` on ``data`` for ``epochs``; returns a :class:`History`.

    ``data`` is a dataset dict (input name -> array, targets included): each epoch shuffles it
    (``shuffle=True``) and runs mini-batches of ``batch_size`` rows (the whole set for
    full-batch gradient descent, 1 for stochastic). Or ``data`` is an iterable of batch dicts
    (a list, a generator): each epoch walks it once, or takes ``steps_per_epoch`` batches from
    it (needed for a generator and more than one epoch). ``validation`` (the same forms) is
    evaluated after each epoch.

    The History holds per epoch ``loss``, ``accuracy`` and ``error`` (0/1 error, where the loss
    defines accuracy), each metric, and their ``val_`` counterparts. ``metrics`` (names such as
    ``"mae"``, ``"rmse"``, ``"r2"``, ``"top5_accuracy"``, or functions ``fn(pred, target)``;
    see :mod:`graphengine.train.metrics`) replace for this call those given to ``compile``.

    ``verbose``: 0 prints nothing, 1 (default) one line per epoch on stdout (loss, metrics,
    validation, time), whether or not stdout is a terminal, 2 a tqdm progress bar as well
    (``tqdm.auto``: a widget in notebooks).

    ``monitor``: without a :class:`~graphengine.tools.monitor.GradientMonitor` on the model,
    fit attaches one recording every :data:`MONITOR_EVERY` steps (about 1% of training time),
    which stays attached, so the visualizer can draw the gradient flow after a plain fit;
    ``monitor=False`` attaches none.

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
    epochs = require_int(epochs, "epochs", 0, DataError)
    if steps_per_epoch is not None:
        steps_per_epoch = require_int(steps_per_epoch, "steps_per_epoch", 1, DataError)
    if verbose not in (0, 1, 2):
        raise GraphEngineError(f"verbose must be 0 (silent), 1 (a line per epoch) or 2 (a "
                               f"progress bar as well), got {verbose!r}")
    source = _Batches(model, data, epochs, batch_size, shuffle, steps_per_epoch)
    meter_metrics = model.metrics if metrics is None else get_metrics(metrics)
    loss_op, pred_name, target_name = _loss_parts(model, meter_metrics)
    if source.n is not None:
        fit_preprocessing(model, source.data)
    if monitor and find_monitor(model) is None:
        recorder = GradientMonitor(every=MONITOR_EVERY)
        recorder.automatic = True
        recorder.attach(model)
    history = history or History()
    model.stop_training = False
    out = sys.stdout
    with model.mode(training=True):
        for callback in callbacks:
            callback.on_train_begin(model, history)
        first_epoch = model.epoch
        last_epoch = first_epoch + epochs
        for epoch in range(first_epoch + 1, last_epoch + 1):
            started = time.perf_counter()
            for callback in callbacks:
                callback.on_epoch_begin(model, epoch)
            bar = _progress(verbose if writes(model) else 0, source.per_epoch, f"epoch {epoch}")
            totals = {"rows": 0, "loss": 0.0, "correct": 0.0}
            meter = Meter(meter_metrics, model.backend)
            for b, (size, batch) in enumerate(source.epoch(epoch)):
                if not size:  # a distributed rank's part of a global batch shorter than the ranks
                    loss = math.nan
                    model.idle_step()
                else:
                    loss = model.forward(batch, training=True)
                    if not math.isfinite(loss):
                        raise NumericalError(
                            f"the loss became {loss} at epoch {epoch}, batch {b}: lower the learning "
                            f"rate, clip gradients, or set model.debug = True to find the node that "
                            f"made it")
                    totals["rows"] += size
                    totals["loss"] += loss * size
                    if loss_op is not None:
                        _score(model, model.tape, loss_op, pred_name, target_name, size, totals, meter)
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
            if model.distributed:
                model.distributed.reduce_sums(totals, meter)
            logs = _logs(totals, meter, loss_op)
            if validation is not None:
                scores = evaluate(model, validation, batch_size, metrics=meter_metrics)
                logs.update({f"val_{k}": v for k, v in scores.items()})
            history.append(epoch, logs)
            if verbose and writes(model):
                print(_epoch_line(epoch, last_epoch, logs, time.perf_counter() - started),
                      file=out, flush=True)
            for callback in callbacks:
                callback.on_epoch_end(model, epoch, logs)
            if model.stop_training:
                break
        for callback in callbacks:
            callback.on_train_end(model, history)
    return history


def _score(model: Model, tape: Any, loss_op: LossOp, pred_name: str, target_name: str,
           size: int, totals: dict[str, float], meter: Meter) -> None:
    """Add a batch's correct predictions (where the loss defines accuracy) and metric sums."""
    pred, target = tape.value(pred_name), tape.value(target_name)
    acc = loss_op.loss.accuracy(model.xp, pred, target)
    if acc is None:
        totals["correct"] = math.nan
    else:
        totals["correct"] += float(model.backend.to_numpy(acc)) * size
    if meter.metrics:
        meter.update(model.xp, loss_op.loss.predict(model.xp, pred), target)


def _logs(totals: Mapping[str, float], meter: Meter, loss_op: LossOp | None) -> dict[str, float]:
    rows = totals["rows"]
    logs = {"loss": totals["loss"] / rows}
    if loss_op is not None and not math.isnan(totals["correct"]):
        logs["accuracy"] = totals["correct"] / rows
        logs["error"] = 1.0 - logs["accuracy"]
    logs.update(meter.results())
    return logs


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
    for scope, call in _data_fitted_calls(model):
        if scope in model.fitted_layers and not refit:
            continue
        layer = layers.get(call["kind"])(**call["config"])
        try:
            statistics = layer.fit_data(_host_values(model, data, call["inputs"][0], batch_size))
        except DataError as exc:
            raise DataError(f"layer {scope!r}: {exc}") from None
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


@checked_keywords
def evaluate(model: Model, data: Data, batch_size: int | None = None, *,
             metrics: Any = None) -> dict[str, float]:
    """Mean loss, accuracy and 0/1 error where the loss defines them, and the ``metrics`` (by
    default those given to ``compile``), in evaluation mode. ``data`` is a dataset dict, run in
    batches of ``batch_size`` rows (default: all at once), or an iterable of batch dicts."""
    if model.loss_name is None:
        raise GraphEngineError("evaluate() needs a model compiled with a loss")
    chosen = model.metrics if metrics is None else get_metrics(metrics)
    loss_op, pred_name, target_name = _loss_parts(model, chosen)
    if isinstance(data, Mapping):
        n = dataset_length(data)
        parts: Iterable[Any] = batches(data, n, n if batch_size is None else batch_size, order=None,
                                       share=_share(model))
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        parts = (_own_part(model, batch, dataset_length(batch))[1] for batch in data)
    else:
        raise DataError(f"evaluate() takes a dataset dict (input name -> array) or an iterable "
                        f"of batch dicts, got {type(data).__name__}")
    fetch = (model.loss_name,) + ((pred_name, target_name) if loss_op else ())
    plan = model.plan("infer", fetch)
    totals = {"rows": 0, "loss": 0.0, "correct": 0.0}
    meter = Meter(chosen, model.backend)
    observers = model.active_observers(inference=True)
    for batch in parts:
        size = batch_rows(batch) if model.distributed else dataset_length(batch)
        if not size:  # a distributed rank's empty part of a batch
            continue
        tape = model.executor.forward(plan, batch, training=False, rng=model.rng, observers=observers)
        totals["rows"] += size
        totals["loss"] += float(model.backend.to_numpy(tape.value(model.loss_name))) * size
        if loss_op is not None:
            _score(model, tape, loss_op, pred_name, target_name, size, totals, meter)
    if model.distributed:
        model.distributed.reduce_sums(totals, meter)
    if not totals["rows"]:
        raise DataError("evaluate() was given no batches")
    return _logs(totals, meter, loss_op)
