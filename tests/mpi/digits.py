"""Train a small CNN on scikit-learn's 8x8 digits, data-parallel over the ranks of the job that
runs this script (one rank when started plainly), and leave what the tests compare in ``OUT``.

    mpiexec -n 2 python tests/mpi/digits.py OUT [--data DIGITS.npz] [--sync-bn] [--resume CHECKPOINT]

``--data``: the digits as ``x``, ``y`` arrays (see :func:`save_digits`), which spares every rank
the import of scikit-learn (seconds on a busy machine); without it, scikit-learn loads them.

Rank 0 writes ``OUT/result.npz``: the parameters after training, the epoch losses and
validation losses, the gradient-flow record of one global batch before training, and how many
allreduce calls averaged the gradients of one step after training. Every rank
asks ``viz.render`` to draw ``OUT/flow-<rank>.svg`` and ``Checkpoint`` to save
``OUT/checkpoint-<epoch>.ge``: only rank 0 may write.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import graphengine as ge
from graphengine import viz

#: 575 = 14 x 41 + 1: shares of 21 and 20 rows, and a last batch of one row, which leaves the
#: second rank without rows. The synchronized batch norm needs rows on every rank: 570 rows end
#: in a batch of 37 (19 and 18).
ROWS = {False: 575, True: 570}
BATCH = 41
EPOCHS = 2


def save_digits(path: Path) -> Path:
    """The 1797 digits, scaled to [0, 1] as NCHW images, with their labels, into ``path``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    np.savez(path, x=(data.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8),
             y=data.target.astype(np.int64))
    return path


def digits(rows: int, path: Path | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The first ``rows`` digits to train on, and the last 297 to validate on."""
    if path is None:
        import tempfile

        path = save_digits(Path(tempfile.mkdtemp()) / "digits.npz")
    with np.load(path) as data:
        x, y = data["x"], data["y"]
    return {"x": x[:rows], "y": y[:rows]}, {"x": x[1500:], "y": y[1500:]}


def own_share(comm: ge.distributed.Communicator, data: dict[str, np.ndarray],
              rows: int) -> dict[str, np.ndarray]:
    """This rank's share of the global batch made of the first ``rows`` rows of ``data``."""
    start, stop = comm.share(0, rows)
    return {k: v[start:stop] for k, v in data.items()}


def build(sync_bn: bool, comm: ge.distributed.Communicator | None) -> ge.Model:
    """The CNN, data-parallel over ``comm`` (None: not distributed)."""
    g = ge.Graph("digits")
    x = g.input("x", shape=(None, 1, 8, 8))
    y = g.input("y", shape=(None,), dtype="int64")
    # No bias before a batch norm: it cancels, its gradient is rounding noise, which Adam would
    # turn into steps of full size.
    h = g.layer("conv2d", x, filters=6, kernel_size=3, padding="same", bias=not sync_bn, name="conv")
    if sync_bn:
        h = g.layer("batch_norm", h, axis=1, sync=True, name="bn")
    h = g.layer("max_pool2d", g.activation("relu", h), kernel_size=2, name="pool")
    logits = g.layer("dense", g.layer("flatten", h), units=10, name="out")
    # A seed per rank: the broadcast from rank 0 must make the models equal all the same.
    return g.compile(g.loss("softmax_cross_entropy", logits, y),
                     optimizer=ge.optimizer("adam", lr=0.01), seed=comm.rank if comm else 0,
                     distributed=comm)


def allreduce_calls(model: ge.Model, feeds: dict[str, np.ndarray]) -> int:
    """The communicator's allreduce calls in one forward and backward on ``feeds``."""
    comm, calls = model.distributed.comm, []
    reduce = comm.allreduce
    comm.allreduce = lambda *args, **kwargs: (calls.append(args), reduce(*args, **kwargs))
    try:
        model.forward(feeds)
        model.backward()
    finally:
        del comm.allreduce
    return len(calls)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, help="the digits, as save_digits writes them")
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--resume", type=Path, help="a checkpoint to train on from, to EPOCHS")
    args = parser.parse_args(argv)
    comm = ge.distributed.init()
    train, validation = digits(ROWS[args.sync_bn], args.data)
    if args.resume:
        model = ge.distributed.attach(ge.load(args.resume), comm)
        record = None
    else:
        model = build(args.sync_bn, comm)
        record = viz.snapshot(model, own_share(comm, train, 64))
    history = model.fit(train, epochs=EPOCHS - model.epoch, batch_size=BATCH, validation=validation,
                        callbacks=[ge.Checkpoint(args.out / "checkpoint-{epoch}.ge")])
    viz.render(model, args.out / f"flow-{comm.rank}.svg")
    calls = allreduce_calls(model, own_share(comm, train, BATCH))
    if comm.is_root:
        extra = {} if record is None else {"record": record.table, "record_loss": record.loss}
        extra["allreduce_calls"] = calls
        np.savez(args.out / "result.npz", loss=history["loss"], val_loss=history["val_loss"],
                 **{f"param:{k}": v for k, v in model.parameters().items()}, **extra)


if __name__ == "__main__":
    main()
