"""Rank 1 raises in the middle of training while rank 0 goes on into the next gradient average,
where, without the abort, it would wait for rank 1 forever. Started plainly under mpiexec:

    mpiexec -n 2 python tests/mpi/fail.py
"""

from __future__ import annotations

import numpy as np

import graphengine as ge


class FailOnRankOne(ge.Callback):
    def on_batch_end(self, model, batch, loss):
        if batch == 2 and model.distributed.comm.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")


def main() -> None:
    comm = ge.distributed.init()
    g = ge.Graph("fail")
    x = g.input("x", shape=(None, 4))
    y = g.input("y", shape=(None,), dtype="int64")
    loss = g.loss("softmax_cross_entropy", g.layer("dense", x, units=3), y)
    model = g.compile(loss, optimizer=ge.optimizer("sgd", lr=0.1), distributed=comm)
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((64, 4)).astype(np.float32), "y": rng.integers(0, 3, 64)}
    model.fit(data, epochs=1, batch_size=8, callbacks=[FailOnRankOne()], verbose=0)


if __name__ == "__main__":
    main()
