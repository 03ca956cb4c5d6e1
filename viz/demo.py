"""``graphengine demo vanishing``: the course notes' vanishing-gradient experiment, measured.

The same deep network (8 hidden layers) is trained on scikit-learn's digits twice, with sigmoid
and Xavier initialization, and with ReLU and He initialization, plus a shallow one (2 hidden
layers) of each for the notes' "deeper is not always better": with sigmoid the deeper network
ends with a higher *training* loss than the shallow one after the same epochs (a training
problem, not overfitting), with ReLU it does not. It writes both annotated diagrams, the
gradient-flow chart and the statistics tables, and prints the diagnosis.
"""

from __future__ import annotations

import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

import graphengine as ge
from graphengine.tools.monitor import GradientMonitor
from graphengine.train.loop import Callback, History

from .charts import gradient_flow_chart
from .gradflow import Diagnosis, diagnose, diagnose_history
from .render import GraphvizMissingError, render, stats_table


@dataclass(frozen=True)
class DemoConfig:
    epochs: int = 30
    deep: int = 8
    shallow: int = 2
    width: int = 64
    lr: float = 0.05
    batch_size: int = 32
    every: int = 10
    seed: int = 0


#: (label, activation, initializer): the network the notes warn about, and their fix.
VARIANTS = (("sigmoid", "sigmoid", "xavier"), ("relu", "relu", "he"))


@dataclass
class Run:
    variant: str
    activation: str
    init: str
    depth: int
    model: ge.Model
    history: History

    @property
    def label(self) -> str:
        return f"{self.activation} + {self.init}, {self.depth} hidden"

    @property
    def final_loss(self) -> float:
        return self.history["loss"][-1]


def digits() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn's 8x8 digits scaled to [0, 1], split 75/25 (random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    X_train, X_val, y_train, y_val = train_test_split((X / 16.0).astype(np.float32), y,
                                                      test_size=0.25, random_state=0)
    return {"x": X_train, "y": y_train}, {"x": X_val, "y": y_val}


def deep_mlp(activation: str, init: str, depth: int, width: int, name: str) -> tuple[ge.Graph, ge.Tensor]:
    """64 -> ``depth`` x (dense ``width`` + activation) -> dense 10, softmax cross-entropy."""
    g = ge.Graph(name)
    h = g.input("x", shape=(None, 64))
    labels = g.input("y", shape=(None,), dtype="int64")
    for i in range(1, depth + 1):
        h = g.activation(activation, g.layer("dense", h, units=width, init=init, name=f"fc{i}"))
    logits = g.layer("dense", h, units=10, init=init, name="out")
    return g, g.loss("softmax_cross_entropy", logits, labels)


class _Progress(Callback):
    """One tqdm bar over every epoch of every run (shown on a terminal only)."""

    def __init__(self, bar, label: str) -> None:
        self.bar, self.label = bar, label

    def on_epoch_end(self, model, epoch, logs):
        self.bar.set_postfix_str(f"{self.label}: loss {logs['loss']:.4f}")
        self.bar.update(1)


def train_all(config: DemoConfig, progress: bool) -> list[Run]:
    from tqdm.auto import tqdm
    train, val = digits()
    runs = []
    total = len(VARIANTS) * 2 * config.epochs
    with tqdm(total=total, desc="training", unit="epoch", disable=not progress, leave=False) as bar:
        for variant, activation, init in VARIANTS:
            for depth in (config.deep, config.shallow):
                g, loss = deep_mlp(activation, init, depth, config.width, f"{variant}_{depth}_hidden")
                model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=config.lr), seed=config.seed)
                GradientMonitor(every=config.every).attach(model)
                history = model.fit(train, epochs=config.epochs, batch_size=config.batch_size,
                                    validation=val, verbose=0,
                                    callbacks=[_Progress(bar, f"{variant}, {depth} hidden")])
                runs.append(Run(variant, activation, init, depth, model, history))
    return runs


def _first_last(diagnosis: Diagnosis) -> tuple[str, float, str, float]:
    first, last = diagnosis.layers[0], diagnosis.layers[-1]
    return first.name, first.grad_rms, last.name, last.grad_rms


#: Width of the printed findings: the README quotes them as printed, within its code blocks.
WIDTH = 100


def vanishing_demo(out: str | Path = "demo_output", config: DemoConfig = DemoConfig(),
                   progress: bool | None = None, stream: TextIO = sys.stdout,
                   images: str | Path | None = None) -> int:
    """Run the experiment, write the pictures to ``out``, print the findings. Returns 0 when the
    outcome is the one the notes describe, 1 otherwise.

    ``images``: also write the documentation's pictures there (``make docs``): each diagram
    collapsed to its layers (legible at page width) and in full, and the chart."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()

    def say(text: str = "") -> None:
        print(text, file=stream)

    def finding(text: str) -> None:
        say(textwrap.fill(f"- {text}", WIDTH, subsequent_indent="  "))

    say("graphengine demo: vanishing gradients in a deep sigmoid network (and the ReLU fix)")
    say(f"digits (8x8 images, 10 classes), {config.deep} vs {config.shallow} hidden layers of "
        f"{config.width}, SGD lr {config.lr}, batch {config.batch_size}, {config.epochs} epochs")
    start = time.perf_counter()
    runs = train_all(config, progress)
    say(f"trained {len(runs)} networks in {time.perf_counter() - start:.1f} s")

    by = {(r.variant, r.depth): r for r in runs}
    say("")
    say(f"final training loss          {config.shallow} hidden   {config.deep} hidden")
    verdicts = {}
    for variant, activation, init in VARIANTS:
        shallow, deep = by[variant, config.shallow], by[variant, config.deep]
        verdicts[variant] = deep.final_loss > shallow.final_loss
        words = ("deeper is WORSE on the training set" if verdicts[variant]
                 else "deeper is no worse")
        say(f"{activation + ' + ' + init:<26} {shallow.final_loss:>10.4f} {deep.final_loss:>10.4f}   {words}")

    deep_runs = [by[variant, config.deep] for variant, *_ in VARIANTS]
    diagnoses = {run.variant: diagnose(run.model) for run in deep_runs}
    say("")
    say(f"gradient RMS of the first vs the last layer, {config.deep} hidden layers "
        f"(median of the last {diagnoses['sigmoid'].records} records):")
    for run in deep_runs:
        first, first_rms, last, last_rms = _first_last(diagnoses[run.variant])
        say(f"{run.activation + ' + ' + run.init:<18} {first} {first_rms:.2e}   {last} {last_rms:.2e}   "
            f"first/last {first_rms / last_rms:.1e}")

    written: list[Path] = []
    missing_dot: str | None = None
    for run in deep_runs:
        say("")
        say(f"diagnosis, {run.label}:")
        for line in diagnoses[run.variant].findings:
            finding(str(line))
        for line in diagnose_history(run.history):
            finding(str(line))
        stem = out / f"{run.variant}_deep"
        table = stem.with_suffix(".txt")
        table.write_text(stats_table(run.model, diagnoses[run.variant]))
        written.append(table)
        pictures = [(stem.with_suffix(".svg"), False), (stem.with_suffix(".png"), False),
                    (out / f"{run.variant}_deep_layers.svg", True)]
        if images is not None:
            pictures += [(Path(images) / f"vanishing_{run.variant}.svg", True),
                         (Path(images) / f"vanishing_{run.variant}_full.svg", False)]
        for path, collapsed in pictures:
            try:
                written.append(render(run.model, path, diagnosis=diagnoses[run.variant],
                                      collapse=collapsed))
            except GraphvizMissingError as exc:
                missing_dot = str(exc)
                written.append(exc.source_path)
                break
    title = f"gradient flow on digits, {config.deep} hidden layers"
    models = {run.label: run.model for run in deep_runs}
    written.append(gradient_flow_chart(models, out / "gradient_flow.png", title=title))
    if images is not None:
        written.append(gradient_flow_chart(models, Path(images) / "vanishing_gradient_flow.png",
                                           title=title))

    sigmoid_flagged = diagnoses["sigmoid"].flagged_layers("vanishing")
    relu_flagged = diagnoses["relu"].flagged_layers("vanishing")
    checks = {
        f"early sigmoid layers flagged vanishing ({', '.join(sigmoid_flagged) or 'none'})":
            "fc1" in sigmoid_flagged,
        f"no ReLU layer flagged vanishing ({', '.join(relu_flagged) or 'none'})": not relu_flagged,
        "sigmoid: the deeper network ends with the higher training loss": verdicts["sigmoid"],
        "relu: the deeper network does not": not verdicts["relu"],
    }
    say("")
    say("as the notes describe:")
    for text, ok in checks.items():
        say(f"  [{'yes' if ok else 'NO '}] {text}")
    say("")
    if missing_dot:
        say(f"note: {missing_dot}")
    say("wrote " + ", ".join(str(p) for p in written))
    return 0 if all(checks.values()) else 1
