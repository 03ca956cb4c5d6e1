"""Six optimizers on an ill-conditioned 2-D quadratic, side by side.

f(w) = 1/2 (w1 - 1)^2 + 25 (w2 + 2)^2: curvature 1 along w1 and 50 along w2 (condition number 50),
from w = (-4, 1). Plain gradient descent must keep its lr below 2/50 to stay stable along w2,
so it crawls along w1; momentum builds up speed along the valley; Adagrad, RMSProp and Adam
rescale each coordinate by its gradient history. Every run is a graphengine model (one
parameter, the loss built from primitives) trained with model.train_step.

    .venv/bin/python examples/optimizer_trajectories.py
"""

from __future__ import annotations

import pathlib

import numpy as np

import graphengine as ge

CURVATURE = np.array([1.0, 50.0])
MINIMUM = np.array([1.0, -2.0])
START = np.array([-4.0, 1.0])
OPTIMIZERS = {
    "sgd": {"lr": 0.035},
    "momentum": {"lr": 0.01, "momentum": 0.8},
    "nesterov": {"lr": 0.01, "momentum": 0.8},
    "adagrad": {"lr": 1.0},
    "rmsprop": {"lr": 0.05, "alpha": 0.9},
    "adam": {"lr": 0.2},
}
IMAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "images" / "optimizer_trajectories.png"


def quadratic_model(optimizer: ge.Optimizer, backend: str = "numpy") -> ge.Model:
    """f(w) as a graph: one parameter, the loss built from primitives."""
    g = ge.Graph("quadratic")
    w = g.parameter("w", (2,), init="zeros", dtype="float64")
    diff = w - g.constant(MINIMUM, dtype="float64")
    loss = (diff * diff * g.constant(CURVATURE / 2, dtype="float64")).sum()
    model = g.compile(loss, outputs=[loss], optimizer=optimizer, backend=backend)
    model.set_parameters({"w": START})
    return model


def trajectory(name: str, steps: int) -> np.ndarray:
    """Positions w_0 .. w_steps under optimizer ``name``."""
    model = quadratic_model(ge.optimizer(name, **OPTIMIZERS[name]))
    path = [START.copy()]
    for _ in range(steps):
        model.train_step({})
        path.append(model.backend.to_numpy(model.parameters()["w"]).copy())
    return np.array(path)


def loss_at(w: np.ndarray) -> np.ndarray:
    return 0.5 * ((w - MINIMUM) ** 2 * CURVATURE).sum(axis=-1)


def steps_to_reach(path: np.ndarray, tolerance: float = 1e-3) -> int | None:
    """The first step from which the distance to the minimum stays below ``tolerance``."""
    far = np.nonzero(np.linalg.norm(path - MINIMUM, axis=1) >= tolerance)[0]
    first = int(far[-1]) + 1 if len(far) else 0
    return first if first < len(path) else None


def plot(paths: dict[str, np.ndarray], steps: int = 60) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w1, w2 = np.meshgrid(np.linspace(-4.5, 2.5, 200), np.linspace(-4.6, 1.4, 200))
    grid = np.stack([w1, w2], axis=-1)
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=80)
    ax.contour(w1, w2, loss_at(grid), levels=np.geomspace(0.05, 400, 12), colors="0.75", linewidths=0.6)
    markers = "os^vDP"
    for (name, path), marker in zip(paths.items(), markers):
        ax.plot(path[:steps, 0], path[:steps, 1], marker=marker, markersize=3, linewidth=1, label=name)
    ax.plot(*MINIMUM, "k*", markersize=12)
    ax.set_xlabel("w1 (curvature 1)")
    ax.set_ylabel("w2 (curvature 50)")
    ax.set_title(f"first {steps} steps from (-4, 1)")
    ax.legend(fontsize=8, ncol=3, loc="lower right")
    fig.tight_layout()
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMAGE)
    plt.close(fig)


def main(steps: int = 400, image: bool = True) -> dict[str, int | None]:
    paths = {name: trajectory(name, steps) for name in OPTIMIZERS}
    names = list(OPTIMIZERS)
    print("positions (w1, w2); minimum at (1, -2)")
    print(f"{'step':>4} " + " ".join(f"{n:>15}" for n in names))
    for t in (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, steps):
        print(f"{t:4d} " + " ".join(f"{paths[n][t, 0]:7.3f},{paths[n][t, 1]:7.3f}" for n in names))
    print("\nloss f(w)")
    print(f"{'step':>4} " + " ".join(f"{n:>15}" for n in names))
    for t in (0, 10, 20, 50, 100, 200, steps):
        print(f"{t:4d} " + " ".join(f"{loss_at(paths[n][t]):15.3e}" for n in names))
    reached = {n: steps_to_reach(paths[n]) for n in names}
    print("\nsteps until within 1e-3 of the minimum for good")
    print("     " + " ".join(f"{str(reached[n]) if reached[n] is not None else 'never':>15}"
                             for n in names))
    print("hyper-parameters: " + "; ".join(f"{n} {OPTIMIZERS[n]}" for n in names))
    if image:
        plot(paths)
        print(f"picture: {IMAGE.relative_to(IMAGE.parent.parent.parent)}")
    return reached


if __name__ == "__main__":
    main()
