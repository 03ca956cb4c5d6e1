"""Early stopping: stop when the validation loss stops improving, keep the best epoch's weights.

An over-parameterized MLP learns from 10% of scikit-learn's digits; another 20% is the
validation set that early stopping watches, the remaining 70% the test set. The validation
loss falls, then climbs as the network grows over-confident on what it memorized.
``ge.EarlyStopping(patience=10)`` stops 10 epochs after the best one and restores its weights.

    .venv/bin/python examples/early_stopping.py
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import graphengine as ge


def splits(seed: int = 0) -> tuple[dict, dict, dict]:
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, train_size=0.1, random_state=seed,
                                                        stratify=y)
    X_val, X_test, y_val, y_test = train_test_split(X_rest, y_rest, train_size=0.22,
                                                    random_state=seed, stratify=y_rest)
    return ({"x": X_train, "y": y_train}, {"x": X_val, "y": y_val}, {"x": X_test, "y": y_test})


def build(seed: int = 0) -> ge.Model:
    g = ge.Graph("mlp")
    x = g.input("x", (None, 64))
    y = g.input("y", (None,), dtype="int64")
    h = g.activation("relu", g.layer("dense", x, units=256, init="he", name="fc1"))
    h = g.activation("relu", g.layer("dense", h, units=256, init="he", name="fc2"))
    logits = g.layer("dense", h, units=10, name="out")
    return g.compile(g.loss("softmax_cross_entropy", logits, y),
                     optimizer=ge.optimizer("momentum", lr=0.05), seed=seed)


def main(max_epochs: int = 150, patience: int = 10) -> dict[str, float]:
    train, validation, test = splits()
    print(f"{len(train['y'])} training, {len(validation['y'])} validation, {len(test['y'])} test images")
    model = build()
    stopper = ge.EarlyStopping(monitor="val_loss", patience=patience)
    history = model.fit(train, epochs=max_epochs, batch_size=32, validation=validation,
                        callbacks=[stopper])
    print(f"{'epoch':>5} {'train loss':>10} {'val loss':>9} {'val acc':>8}")
    for i, epoch in enumerate(history.epochs):
        if epoch % 5 == 0 or epoch in (1, stopper.best_epoch, history.epochs[-1]):
            mark = "  <- best" if epoch == stopper.best_epoch else ""
            print(f"{epoch:5d} {history['loss'][i]:10.4f} {history['val_loss'][i]:9.4f} "
                  f"{history['val_accuracy'][i]:8.4f}{mark}")
    restored = model.evaluate(validation)["loss"]
    print(f"stopped at epoch {stopper.stopped_epoch}; best epoch {stopper.best_epoch} "
          f"(val loss {stopper.best:.4f}); the model now has val loss {restored:.4f}")
    early = model.evaluate(test)
    # the same network trained for every epoch, without early stopping, for comparison
    full = build()
    full.fit(train, epochs=max_epochs, batch_size=32)
    late = full.evaluate(test)
    print(f"test loss {early['loss']:.4f} / accuracy {early['accuracy']:.4f} with early stopping, "
          f"{late['loss']:.4f} / {late['accuracy']:.4f} after all {max_epochs} epochs")
    return {"best_epoch": stopper.best_epoch, "stopped_epoch": stopper.stopped_epoch,
            "best_val_loss": stopper.best, "restored_val_loss": restored,
            "min_history_val_loss": min(history["val_loss"]),
            "best_epoch_in_history": history.epochs[int(np.argmin(history["val_loss"]))],
            "test_loss_early": early["loss"], "test_loss_full": late["loss"],
            "test_accuracy_early": early["accuracy"], "test_accuracy_full": late["accuracy"]}


if __name__ == "__main__":
    main()
