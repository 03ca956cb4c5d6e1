"""What does the CNN learn? Gradients with respect to the *input* image, on the digits CNN.

    .venv/bin/python examples/cnn_input_gradients.py

1. Class maximization: start from a blank image and climb the gradient of one class's score
   (its logit) with respect to the pixels, keeping pixels in [0, 1] with a small L2 penalty.
   The CNN is certain of every image it finds, strokes and all, though no one writes digits
   with ink in those places.
2. Adversarial examples ("DNNs are easily fooled"): move every pixel of a correctly classified
   test image a little (at most ``eps``) in the direction that increases the loss of the true
   label (iterated fast gradient sign). Random noise of the same size barely matters; the
   gradient's direction fools the network.

The class score is built on the trained graph and compiled as a second model that shares the
trained arrays (``parameters=model.parameters()``); ``backward(wrt=["x"])`` then
``input_gradient("x")`` give the gradient for the pixels. Writes docs/images/cnn_class_maximization.png
and docs/images/cnn_adversarial.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from digits_cnn import trained_cnn

import graphengine as ge

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
CLASSES = 10


def class_score_model(model: ge.Model) -> ge.Model:
    """A model whose 'loss' is the sum over the batch of the logit picked by ``class_mask``."""
    g = model.graph
    logits = g[model.output_names[0]]
    mask = g.input("class_mask", (None, CLASSES)) if "class_mask" not in g else g["class_mask"]
    score = (logits * mask).sum()
    return g.compile(score, outputs=[logits], parameters=model.parameters())


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def maximize_classes(scorer: ge.Model, steps: int = 300, lr: float = 0.05,
                     l2: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """One image per class, all ten climbed at once (one batch row each)."""
    x = np.zeros((CLASSES, 1, 8, 8), np.float32)
    mask = np.eye(CLASSES, dtype=np.float32)
    for _ in range(steps):
        scorer.forward({"x": x, "class_mask": mask})
        scorer.backward(wrt=["x"])
        x += lr * (scorer.input_gradient("x") - l2 * x)
        np.clip(x, 0.0, 1.0, out=x)
    logits = scorer.run({"x": x})[scorer.output_names[0]]
    return x, softmax(logits)


def fgsm(model: ge.Model, x: np.ndarray, y: np.ndarray, eps: float, steps: int = 10) -> np.ndarray:
    """Iterated fast gradient sign: steps of eps/4 up the loss, kept within eps of x and in [0, 1]."""
    adversarial = x.copy()
    for _ in range(steps):
        model.forward({"x": adversarial, "y": y})
        model.backward(wrt=["x"])
        adversarial += (eps / 4) * np.sign(model.input_gradient("x"))
        np.clip(adversarial, x - eps, x + eps, out=adversarial)
        np.clip(adversarial, 0.0, 1.0, out=adversarial)
    return adversarial


def accuracy(model: ge.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict({"x": x}).argmax(axis=1) == y).mean())


def plot_classes(images: np.ndarray, probs: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, CLASSES, figsize=(12, 1.8))
    for k, ax in enumerate(axes):
        ax.imshow(images[k, 0], cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"'{k}' p={probs[k, k]:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("images that maximize each class score (gradient ascent on the input)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_adversarial(originals, adversarials, labels, predicted, confidence, eps, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    count = len(originals)
    fig, axes = plt.subplots(3, count, figsize=(1.5 * count, 5))
    for j in range(count):
        delta = adversarials[j, 0] - originals[j, 0]
        panels = [(originals[j, 0], "gray_r", 0, 1, f"label {labels[j]}"),
                  (delta, "RdBu_r", -eps, eps, "perturbation"),
                  (adversarials[j, 0], "gray_r", 0, 1, f"-> {predicted[j]} ({confidence[j]:.0%})")]
        for row, (image, cmap, low, high, title) in enumerate(panels):
            axes[row, j].imshow(image, cmap=cmap, vmin=low, vmax=high)
            axes[row, j].set_title(title, fontsize=9)
            axes[row, j].axis("off")
    fig.suptitle(f"test digits the CNN got right, and fooled after moving each pixel by at most {eps}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(epochs: int = 20, images: Path | None = IMAGES) -> dict[str, float]:
    model, data = trained_cnn(epochs)
    x_test, y_test = data["x_test"], data["y_test"]
    clean = accuracy(model, x_test, y_test)
    print(f"digits CNN: test accuracy {clean:.4f}")

    scorer = class_score_model(model)
    maximized, probs = maximize_classes(scorer)
    print("\n1. gradient ascent on a blank image, one per class: the CNN's confidence in it")
    print("   " + "  ".join(f"'{k}' {probs[k, k]:.3f}" for k in range(CLASSES)))
    print(f"   mean ink (pixel value) {maximized.mean():.3f} vs {x_test.mean():.3f} in real digits")

    print("\n2. adversarial perturbations of the test set (each pixel in [0, 1] moved by at most eps)")
    print(f"{'eps':>6}{'accuracy: gradient sign':>25}{'random sign':>13}")
    noise = np.sign(np.random.default_rng(0).standard_normal(x_test.shape)).astype(np.float32)
    results = {"clean": clean}
    for eps in (0.05, 0.1, 0.2):
        fooled = accuracy(model, fgsm(model, x_test, y_test, eps), y_test)
        random = accuracy(model, np.clip(x_test + eps * noise, 0, 1), y_test)
        results[f"eps={eps}"], results[f"random eps={eps}"] = fooled, random
        print(f"{eps:>6}{fooled:>25.4f}{random:>13.4f}")

    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        plot_classes(maximized, probs, images / "cnn_class_maximization.png")
        eps = 0.1
        attacked = fgsm(model, x_test, y_test, eps)
        was_right = model.predict({"x": x_test}).argmax(axis=1) == y_test
        now = model.predict({"x": attacked})
        picks = np.flatnonzero(was_right & (now.argmax(axis=1) != y_test))[:8]
        plot_adversarial(x_test[picks], attacked[picks], y_test[picks], now[picks].argmax(axis=1),
                         now[picks].max(axis=1), eps, images / "cnn_adversarial.png")
        print(f"\npictures: {images / 'cnn_class_maximization.png'}, {images / 'cnn_adversarial.png'}")
    return results


if __name__ == "__main__":
    main()
