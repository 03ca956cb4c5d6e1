"""A generative adversarial network: a generator against a discriminator (the notes' "two competing
neural networks"), on a ring of 8 Gaussians in 2-D and on scikit-learn's 8x8 digits.

Two models over shared parameters, each with its own optimizer, updated in turn:

- the discriminator model: data -> ``disc`` layers -> logit, binary cross-entropy against
  1 (real) / 0 (generated); it learns to tell the generator's samples from the data;
- the generator model: noise -> ``gen`` layers -> sample -> the same ``disc`` layers -> logit,
  binary cross-entropy against 1 ("real"). It is compiled with
  ``parameters=discriminator.parameters()``: its ``disc`` layers *are* the discriminator's arrays,
  and ``freeze("disc")`` keeps its optimizer off them, so the gradient flows through the
  discriminator into the generator without changing it.

On the ring it prints, over training, how many of the 8 modes hold at least 5% of the generated
samples, the share of samples within 3 standard deviations of a mode, and the maximum mean
discrepancy (MMD, Gaussian kernel) between 1,000 generated points and 1,000 held-out data points;
on the digits, the MMD and which digit a classifier reads in each generated image. Pictures go to
docs/images: gan_ring.png (samples over the data at several steps), gan_digits.png (a grid of
generated digits), gan_gradient_flow.svg/.png (the generator's graph, gradient flowing through the
frozen discriminator).

    .venv/bin/python examples/gan.py
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

import graphengine as ge

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "images")
RING_MODES = 8
RING_RADIUS = 2.0
RING_STD = 0.1


def ring_centres() -> np.ndarray:
    angles = 2 * np.pi * np.arange(RING_MODES) / RING_MODES
    return RING_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def ring_samples(n: int, rng: np.random.Generator) -> np.ndarray:
    centres = ring_centres()[rng.integers(RING_MODES, size=n)]
    return (centres + RING_STD * rng.standard_normal((n, 2))).astype(np.float32)


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits with pixels scaled to [-1, 1] (the generator's tanh range), and labels."""
    X, y = load_digits(return_X_y=True)
    return (X / 8.0 - 1.0).astype(np.float32), y


def mlp(g: ge.Graph, h: ge.Tensor, scope: str, widths: Sequence[int], out: int) -> ge.Tensor:
    """Dense layers ``<scope>/fc1, <scope>/fc2, ...`` with leaky ReLU between them and a linear
    last layer ``<scope>/out``; ``freeze(scope)`` names them all."""
    with g.name_scope(scope):
        for i, width in enumerate(widths, start=1):
            h = g.activation("leaky_relu", g.layer("dense", h, units=width, init="he", name=f"fc{i}"),
                             slope=0.2)
        return g.layer("dense", h, units=out, name="out")


class GAN:
    """The two models and their alternating updates; ``steps`` is the length of the run, over
    which both learning rates fall 10x."""

    def __init__(self, data_dim: int, noise_dim: int, hidden: Sequence[int], lr: float = 1e-3,
                 steps: int = 1000, tanh_output: bool = False, seed: int = 0) -> None:
        self.noise_dim = noise_dim
        self.rng = np.random.default_rng(seed)
        adam = {"lr": lr, "beta1": 0.5}
        # the two players chase each other around the data; a learning rate falling 10x over the
        # run lets them settle instead of circling
        def decay() -> ge.ExponentialDecay:
            return ge.ExponentialDecay(rate=np.log(10) / steps, per="step")

        d = ge.Graph("discriminator")
        x = d.input("x", (None, data_dim))
        label = d.input("y", (None, 1))
        d_loss = d.loss("binary_cross_entropy", mlp(d, x, "disc", hidden, 1), label)
        self.discriminator = d.compile(d_loss, optimizer=ge.optimizer("adam", **adam), seed=seed,
                                        schedule=decay())

        g = ge.Graph("generator")
        z = g.input("z", (None, noise_dim))
        sample = mlp(g, z, "gen", hidden, data_dim)
        if tanh_output:
            sample = g.activation("tanh", sample, name="sample")
        self.sample_name = sample.name
        # the same layer names as the discriminator's graph: parameters= makes them the same arrays
        fooled = g.loss("binary_cross_entropy", mlp(g, sample, "disc", hidden, 1), g.input("y", (None, 1)))
        self.generator = g.compile(fooled, optimizer=ge.optimizer("adam", **adam), seed=seed + 1,
                                   schedule=decay(),
                                   parameters=self.discriminator.parameters())
        self.generator.freeze("disc")

    def noise(self, n: int) -> np.ndarray:
        return self.rng.standard_normal((n, self.noise_dim)).astype(np.float32)

    def generate(self, n: int) -> np.ndarray:
        return self.generator.run({"z": self.noise(n)}, fetches=[self.sample_name])[self.sample_name]

    def step(self, real: np.ndarray) -> tuple[float, float]:
        """One discriminator update on real and generated samples, then one generator update;
        returns both losses."""
        n = len(real)
        fake = self.generate(n)
        labels = np.concatenate([np.ones((n, 1)), np.zeros((n, 1))]).astype(np.float32)
        d_loss = self.discriminator.train_step({"x": np.concatenate([real, fake]), "y": labels})
        # the generator's loss is low where the discriminator calls its samples real
        g_loss = self.generator.train_step({"z": self.noise(2 * n), "y": np.ones((2 * n, 1), np.float32)})
        return d_loss, g_loss


def mmd(a: np.ndarray, b: np.ndarray, bandwidths: Sequence[float]) -> float:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (biased estimate): 0 when
    the two samples come from one distribution, larger the more they differ."""
    def kernel(p, q):
        d2 = (p * p).sum(1)[:, None] + (q * q).sum(1)[None, :] - 2 * p @ q.T
        return sum(np.exp(-np.maximum(d2, 0) / (2 * s * s)) for s in bandwidths)
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean())


def ring_coverage(samples: np.ndarray) -> tuple[int, float, np.ndarray]:
    """Modes holding at least 5% of the samples within 3 standard deviations of their centre,
    the share of samples that lie that close to a mode, and each mode's share."""
    distance = np.linalg.norm(samples[:, None, :] - ring_centres()[None], axis=2)
    near = distance.min(axis=1) < 3 * RING_STD
    shares = np.bincount(distance.argmin(axis=1)[near], minlength=RING_MODES) / len(samples)
    return int((shares >= 0.05).sum()), float(near.mean()), shares


def train(gan: GAN, data: np.ndarray, steps: int, batch: int, every: int,
          measure: Callable[[int, GAN], None]) -> None:
    rng = np.random.default_rng(1)
    # matrices this small keep one core busy: a second BLAS thread only spins against the first
    with threadpool_limits(limits=1, user_api="blas"):
        for step in range(1, steps + 1):
            gan.step(data[rng.integers(len(data), size=batch)])
            if step % every == 0:
                measure(step, gan)


def ring(steps: int = 6000, snapshots: Sequence[int] = (500, 2000, 6000), seed: int = 0,
         every: int = 500, hidden: Sequence[int] = (64, 64), noise_dim: int = 2, lr: float = 1e-3,
         batch: int = 64) -> dict:
    data_rng = np.random.default_rng(100 + seed)
    train_set, held_out = ring_samples(20000, data_rng), ring_samples(1000, data_rng)
    gan = GAN(data_dim=2, noise_dim=noise_dim, hidden=hidden, lr=lr, steps=steps, seed=seed)
    curve, pictures = [], {}

    def measure(step: int, gan: GAN) -> None:
        samples = gan.generate(1000)
        modes, near, _ = ring_coverage(samples)
        curve.append({"step": step, "modes": modes, "near": near,
                      "mmd": mmd(samples, held_out, bandwidths=(0.1, 0.5))})
        if step in snapshots:
            pictures[step] = samples

    before = gan.generate(1000)
    start_mmd = mmd(before, held_out, bandwidths=(0.1, 0.5))
    start = time.perf_counter()
    train(gan, train_set, steps, batch=batch, every=every, measure=measure)
    return {"curve": curve, "pictures": pictures, "start_mmd": start_mmd, "gan": gan,
            "seconds": time.perf_counter() - start, "data": held_out}


def digits(steps: int = 4000, seed: int = 0, every: int = 500) -> dict:
    images, labels = digit_images()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    train_idx, held_idx = order[:1400], order[1400:]
    reader = LogisticRegression(max_iter=2000).fit(images[train_idx], labels[train_idx])
    gan = GAN(data_dim=64, noise_dim=16, hidden=(128,), tanh_output=True, lr=5e-4, steps=steps, seed=seed)
    curve = []

    def measure(step: int, gan: GAN) -> None:
        curve.append({"step": step, "mmd": mmd(gan.generate(len(held_idx)), images[held_idx],
                                                bandwidths=(4.0, 8.0))})

    start_mmd = mmd(gan.generate(len(held_idx)), images[held_idx], bandwidths=(4.0, 8.0))
    data_mmd = mmd(images[train_idx[:len(held_idx)]], images[held_idx], bandwidths=(4.0, 8.0))
    start = time.perf_counter()
    train(gan, images[train_idx], steps, batch=64, every=every, measure=measure)
    samples = gan.generate(1000)
    read = np.bincount(reader.predict(samples), minlength=10) / len(samples)
    return {"curve": curve, "start_mmd": start_mmd, "data_mmd": data_mmd, "read_as": read,
            "gan": gan, "samples": samples[:40], "seconds": time.perf_counter() - start}


def save_ring_picture(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = sorted(result["pictures"])
    fig, axes = plt.subplots(1, len(steps) + 1, figsize=(3.2 * (len(steps) + 1), 3.3))
    for ax, step in zip(axes, steps):
        samples = result["pictures"][step]
        modes, near, _ = ring_coverage(samples)
        ax.scatter(*result["data"].T, s=4, c="#bbbbbb", label="data (held out)")
        ax.scatter(*samples.T, s=4, c="#d62728", alpha=0.6, label="generated")
        ax.set_title(f"step {step}: {modes}/8 modes, {near:.0%} on a mode", fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="center", fontsize=7, markerscale=3)
    curve = result["curve"]
    ax = axes[-1]
    ax.plot([c["step"] for c in curve], [c["mmd"] for c in curve], "o-", c="#1f77b4")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("MMD to held-out data (log)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_digit_grid(samples: np.ndarray, read_as: np.ndarray, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = 4, 10
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.75, rows * 0.75 + 0.3))
    for i, ax in enumerate(axes.flat):
        ax.imshow(samples[i].reshape(8, 8), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("generated digits (read as 0-9: " + " ".join(f"{s:.0%}" for s in read_as) + ")",
                 fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_gradient_flow(gan: GAN, path: str) -> None:
    from graphengine.viz import render
    from graphengine.viz.render import GraphvizMissingError
    batch = {"z": gan.noise(256), "y": np.ones((256, 1), np.float32)}
    try:
        # one node per layer, in the boxes "gen" and then the frozen "disc"
        for suffix in (".svg", ".png"):
            render(gan.generator, path + suffix, data=batch, collapse=True, rankdir="LR")
        print(f"wrote {path}.svg and .png")
    except GraphvizMissingError as exc:
        print(exc, file=sys.stderr)


def main(ring_steps: int = 6000, digit_steps: int = 4000, images: str | None = IMAGES) -> dict:
    result = ring(steps=ring_steps, snapshots=(500, 2000, ring_steps))
    print(f"ring of 8 Gaussians (radius {RING_RADIUS}, std {RING_STD}); generator and discriminator "
          f"2-64-64-2 / 2-64-64-1, Adam 1e-3 falling to 1e-4, batch 64, {ring_steps} steps in "
          f"{result['seconds']:.1f} s")
    print(f"{'step':>6} {'modes >= 5%':>12} {'on a mode':>10} {'MMD':>9}")
    print(f"{0:6d} {'':>12} {'':>10} {result['start_mmd']:9.4f}")
    for c in result["curve"]:
        print(f"{c['step']:6d} {c['modes']:12d} {c['near']:10.1%} {c['mmd']:9.4f}")
    number = digits(steps=digit_steps)
    print(f"digits: generator 16-128-64 (tanh), discriminator 64-128-1, {digit_steps} steps in "
          f"{number['seconds']:.1f} s; MMD to 397 held-out digits: {number['start_mmd']:.4f} at the "
          f"start, " + ", ".join(f"{c['mmd']:.4f}" for c in number["curve"])
          + f" (two halves of the data: {number['data_mmd']:.4f})")
    print("generated digits read by a logistic regression as 0-9: "
          + " ".join(f"{s:.0%}" for s in number["read_as"]))
    if images:
        os.makedirs(images, exist_ok=True)
        save_ring_picture(result, os.path.join(images, "gan_ring.png"))
        save_digit_grid(number["samples"], number["read_as"], os.path.join(images, "gan_digits.png"))
        save_gradient_flow(result["gan"], os.path.join(images, "gan_gradient_flow"))
    return {"ring": result, "digits": number}


if __name__ == "__main__":
    main()
