"""Data-parallel training: the digits CNN on one process or on N, by the same script.

    .venv/bin/python examples/distributed_digits.py                    # one process
    .venv/bin/mpiexec -n 4 .venv/bin/python examples/distributed_digits.py   # four processes

Every rank runs the whole script. ``ge.distributed.init()`` is the job's communicator (a job of
one rank without mpiexec, with no MPI needed); ``compile(..., distributed=comm)`` starts every
rank from rank 0's parameters and averages the gradients over the ranks after each backward.
``fit``'s ``batch_size`` is the global batch: each rank trains on its share of every batch, so
the run computes what one process computes on the same batches, N times faster where the
network keeps up (docs/distributed.md). Rank 0 alone prints, writes the checkpoints and draws
the gradient flow, which is that of the global batches. On GPUs: ``backend="cupy"`` and
``cupy.cuda.Device(comm.local_rank).use()``, one rank per GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

from digits_cnn import build_cnn
from digits_mlp import digits_split
from threadpoolctl import threadpool_limits

import graphengine as ge
from graphengine import viz


def main(epochs: int = 10, out: str | Path = "distributed_output") -> float:
    """Train, checkpoint every 5 epochs and draw the gradient flow into ``out``; returns the
    test accuracy (evaluated over the ranks' shares of the test set)."""
    comm = ge.distributed.init()
    out = Path(out)
    if comm.is_root:
        out.mkdir(parents=True, exist_ok=True)
    comm.barrier()  # the folder exists before any rank's Checkpoint looks at it
    x_train, x_test, y_train, y_test = digits_split()
    train = {"x": x_train.reshape(-1, 1, 8, 8), "y": y_train}
    test = {"x": x_test.reshape(-1, 1, 8, 8), "y": y_test}
    g, loss = build_cnn()
    model = g.compile(loss, optimizer=ge.optimizer("adam", lr=3e-3), distributed=comm)
    # One BLAS thread per rank: the ranks are the parallelism (start one rank per core).
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(train, epochs=epochs, batch_size=64, validation=test,
                  callbacks=[ge.Checkpoint(out / "digits-{epoch}.ge", every=5)])
        accuracy = model.evaluate(test)["accuracy"]
    viz.render(model, out / "gradient_flow.svg")
    if comm.is_root:
        print(f"{comm.size} rank(s): test accuracy {accuracy:.3f}; checkpoints and the gradient "
              f"flow in {out}/")
    return accuracy


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
