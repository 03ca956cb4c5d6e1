"""Data-parallel scaling: the time of a training step against the number of ranks, the share of
it the gradient allreduce takes, and what the cost model of docs/distributed.md predicts for
8, 64 and 512 ranks on 10 Gb/s and 100 Gb/s networks.

    .venv/bin/python benchmarks/distributed.py            # runs itself under mpiexec -n 1, 2

Workloads: the MLP (784-512-512-10, Adam, batch 128) and the CNN (28x28, two conv layers, Adam,
batch 64) of benchmarks/workloads.py and workloads_cnn_lstm.py. Weak scaling: every rank keeps
the workload's batch, so the global batch grows with the ranks (the way data-parallel training
is run; a fixed global batch split 512 ways leaves less than a row per rank). One BLAS thread
per rank: one process per core, as one process per device on a cluster.

Writes benchmarks/results/distributed.json and prints both tables as markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RANKS = (1, 2)
ROUNDS, STEPS, WARMUP = 7, 10, 5
#: Networks of the cost model: bandwidth (bytes/s) and the latency of one message (s); 10 Gb/s
#: Ethernet through TCP, 100 Gb/s InfiniBand-class with RDMA.
NETWORKS = {"10 Gb/s": (10e9 / 8, 30e-6), "100 Gb/s": (100e9 / 8, 3e-6)}
SCALES = (8, 64, 512)
#: The share of a step's compute that its backward takes (about two thirds: two matmuls per
#: forward one), the time an allreduce could hide under with overlap.
BACKWARD_SHARE = 2 / 3


def workloads():
    from workloads import MLP, graphengine_mlp
    from workloads_cnn_lstm import graphengine_cnn
    return {"mlp": (lambda batch: graphengine_mlp(MLP, batch), 128),
            "cnn": (graphengine_cnn, 64)}


def worker(out: Path) -> None:
    """One rank: time steps of every workload, and the allreduce inside them."""
    from threadpoolctl import threadpool_limits

    import graphengine as ge

    comm = ge.distributed.init()
    results = {}
    with threadpool_limits(limits=1):
        for name, (build, batch) in workloads().items():
            model, feeds = build(batch)
            ge.distributed.attach(model, comm)
            reduce, spent = comm.allreduce, [0.0]

            def timed(*args, reduce=reduce, spent=spent, **kwargs):
                start = time.perf_counter()
                reduce(*args, **kwargs)
                spent[0] += time.perf_counter() - start

            comm.allreduce = timed
            for _ in range(WARMUP):
                model.train_step(feeds)
            steps, shares = [], []
            for _ in range(ROUNDS):
                comm.barrier()
                spent[0] = 0.0
                start = time.perf_counter()
                for _ in range(STEPS):
                    model.train_step(feeds)
                seconds = time.perf_counter() - start
                steps.append(seconds / STEPS)
                shares.append(spent[0] / STEPS)
            del comm.allreduce
            gradient_bytes = sum(model.parameters()[n].nbytes for n in model.trainable_parameters())
            mine = {"step": statistics.median(steps), "allreduce": statistics.median(shares),
                    "allreduce_alone": alone(comm, model.backend, gradient_bytes)}
            everyone = comm.mpi.allgather(mine) if comm.size > 1 else [mine]
            results[name] = {"batch_per_rank": batch, "gradient_bytes": gradient_bytes,
                             "step": max(r["step"] for r in everyone),
                             "allreduce": max(r["allreduce"] for r in everyone),
                             "allreduce_alone": max(r["allreduce_alone"] for r in everyone)}
    if comm.is_root:
        out.write_text(json.dumps(results))


def alone(comm, backend, gradient_bytes: int) -> float:
    """The median time of an allreduce of the gradients' bytes that starts on every rank at
    once: the transfer alone. Inside a step the allreduce also waits for the slowest rank."""
    import numpy as np

    buffer, times = np.zeros(gradient_bytes // 4 + 1, dtype=np.float32), []
    for _ in range(30):
        comm.barrier()
        start = time.perf_counter()
        comm.allreduce(buffer, backend)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def allreduce_seconds(gradient_bytes: int, ranks: int, bandwidth: float, latency: float) -> float:
    """Ring allreduce: each rank sends and receives 2 (n - 1) / n of the gradient bytes; the
    latency term is that of recursive halving and doubling, 2 log2(n) messages (MPICH's choice
    for large messages, Rabenseifner's algorithm, which moves the same bytes as the ring)."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * gradient_bytes / bandwidth + 2 * math.log2(ranks) * latency


def predictions(measured: dict) -> list[dict]:
    rows = []
    for name, runs in measured.items():
        one = runs["1"]
        compute = one["step"]
        for network, (bandwidth, latency) in NETWORKS.items():
            for ranks in SCALES:
                reduce = allreduce_seconds(one["gradient_bytes"], ranks, bandwidth, latency)
                plain = compute + reduce
                overlapped = compute + max(0.0, reduce - BACKWARD_SHARE * compute)
                rows.append({"workload": name, "network": network, "ranks": ranks,
                             "compute_ms": 1e3 * compute, "allreduce_ms": 1e3 * reduce,
                             "efficiency": compute / plain,
                             "efficiency_overlapped": compute / overlapped,
                             "rows_per_s": ranks * one["batch_per_rank"] / plain})
    return rows


def markdown(measured: dict, predicted: list[dict]) -> str:
    lines = ["| workload | ranks | rows per step | ms per step | allreduce ms in a step | share "
             "| allreduce alone ms | rows/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in measured.items():
        for ranks, run in runs.items():
            rows = int(ranks) * run["batch_per_rank"]
            lines.append(f"| {name} ({run['gradient_bytes'] / 1e6:.2f} MB of gradients) | {ranks} "
                         f"| {rows} | {1e3 * run['step']:.2f} | {1e3 * run['allreduce']:.3f} "
                         f"| {run['allreduce'] / run['step']:.1%} | {1e3 * run['allreduce_alone']:.3f} "
                         f"| {rows / run['step']:,.0f} |")
    lines += ["", "| workload | network | ranks | compute ms | allreduce ms | efficiency "
              "| with overlap | rows/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in predicted:
        lines.append(f"| {row['workload']} | {row['network']} | {row['ranks']} "
                     f"| {row['compute_ms']:.2f} | {row['allreduce_ms']:.3f} "
                     f"| {row['efficiency']:.0%} | {row['efficiency_overlapped']:.0%} "
                     f"| {row['rows_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    mpiexec = Path(sys.executable).parent / "mpiexec"
    measured: dict[str, dict[str, dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        for ranks in RANKS:
            out = Path(folder) / f"{ranks}.json"
            subprocess.run([str(mpiexec), "-n", str(ranks), sys.executable, __file__, "--worker",
                            str(out)], check=True, env=env, timeout=600)
            for name, run in json.loads(out.read_text()).items():
                measured.setdefault(name, {})[str(ranks)] = run
    predicted = predictions(measured)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "distributed.json").write_text(json.dumps(
        {"measured": measured, "predicted": predicted, "networks": NETWORKS,
         "cpus": os.cpu_count()}, indent=1))
    print(markdown(measured, predicted))


if __name__ == "__main__":
    main()
