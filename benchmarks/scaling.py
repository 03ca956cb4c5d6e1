"""How building, compiling, planning and running a graph scale with its number of nodes.

    python benchmarks/scaling.py                  # 1k .. 32k nodes, two shapes: ~2.5 minutes
    python benchmarks/scaling.py --max-nodes 8000 --shapes chain --rounds 1
    python benchmarks/scaling.py --cpu --json     # CPU time (steadier on a busy machine), JSON

Every phase should cost the same per node at any size: the last table gives, for each phase,
the cost per node at the largest size over the cost per node at the smallest (1.0 = linear; a
quadratic phase doubles it with every doubling of the size), taken within each round and then
the median over rounds, so that a round run under another process's load does not count twice.

Shapes:

* ``chain``: a long chain of elementwise ``* c`` and ``+ d`` on a (batch, 4) input scaled by a
  parameter, the loss the mean square of its end.
* ``dense``: branches of ``dense(units=4) -> tanh`` layers from one input, their ends summed
  into one MSE loss: many layers (names ``dense_0``, ``dense_1``, ...), parameters and fusible
  ``matmul -> add -> tanh`` chains.

Phases: ``build`` (the builder calls), ``compile`` (``g.compile``: training plan, parameters),
``first run`` (``model.run``, which plans inference first) and ``step`` (the median of
``--steps`` training steps after one untimed). Each starts after a full garbage collection.
Every size runs once per round (``--rounds``, interleaved, so that the machine's drift touches
all sizes alike), sizes under ``--repeat-nodes`` several times; the tables give medians.

The garbage collector's time within each phase is measured too (``gc%``), and the ratios are
given with and without it. CPython runs a full collection once the objects that survived
younger collections have grown by a quarter: a small graph grows the process's objects
(imports: ~50k) by less than that and never pays one, a large one pays a few, each traversing
all objects. That is linear in the long run (a constant share per node once the graph dominates
the process), but it raises the per-node cost from 1k to 32k nodes by itself.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import graphengine as ge

HERE = Path(__file__).resolve().parent
SIZES = (1000, 2000, 4000, 8000, 16000, 32000)
PHASES = ("build", "compile", "first run", "step")
BATCH = 8
LAYERS_PER_BRANCH = 4
NODES_PER_LAYER = 5  # W, matmul, b, add, tanh


def build_chain(nodes: int):
    g = ge.Graph("chain")
    x = g.input("x", shape=(None, 4))
    w = g.parameter("w", (4,), init="ones")
    c, d = g.constant(1.0), g.constant(0.001)
    h = x * w
    for k in range(nodes - 7):  # 5 nodes so far, 2 for the loss
        h = h * c if k % 2 else h + d
    loss = (h * h).mean()
    return g, loss, [h], {"x": np.random.default_rng(0).standard_normal((BATCH, 4)).astype("float32")}


def build_dense(nodes: int):
    g = ge.Graph("dense")
    x = g.input("x", shape=(None, 4))
    y = g.input("y", shape=(None, 4))
    per_branch = LAYERS_PER_BRANCH * NODES_PER_LAYER + 1  # + the add into the sum
    total = None
    for _ in range(max(1, (nodes - 3) // per_branch)):
        h = x
        for _ in range(LAYERS_PER_BRANCH):
            h = g.activation("tanh", g.layer("dense", h, units=4))
        total = h if total is None else total + h
    loss = g.loss("mse", total, y)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((BATCH, 4)).astype("float32"),
             "y": rng.standard_normal((BATCH, 4)).astype("float32")}
    return g, loss, None, feeds


SHAPES = {"chain": build_chain, "dense": build_dense}


class GCClock:
    """Seconds the cyclic garbage collector ran, from its callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = clock()
        else:
            self.seconds += clock() - self._start


GC = GCClock()
clock = time.perf_counter  # --cpu: time.process_time


def timed(fn):
    """(seconds, seconds of garbage collection within, fn's result), after a full collection."""
    gc.collect()
    collected = GC.seconds
    start = clock()
    out = fn()
    return clock() - start, GC.seconds - collected, out


def measure_once(shape: str, size: int, steps: int) -> tuple[int, dict, dict]:
    seconds, gc_seconds = {}, {}
    seconds["build"], gc_seconds["build"], (g, loss, outputs, feeds) = timed(
        lambda: SHAPES[shape](size))
    optimizer = ge.optimizer("sgd", lr=0.01)
    seconds["compile"], gc_seconds["compile"], model = timed(
        lambda: g.compile(loss, outputs=outputs, optimizer=optimizer))
    seconds["first run"], gc_seconds["first run"], _ = timed(lambda: model.run(feeds))
    model.train_step(feeds)  # untimed: the first step allocates the optimizer state
    times = sorted(timed(lambda: model.train_step(feeds))[:2] for _ in range(steps))
    seconds["step"], gc_seconds["step"] = times[len(times) // 2]  # the median step
    return len(g.nodes), seconds, gc_seconds


def summarize(runs: list[tuple[int, dict, dict]]) -> dict:
    """Each phase's median over ``runs`` (fresh graphs of one shape and size)."""
    n = runs[0][0]
    row: dict = {"nodes": n, "runs": len(runs)}
    for key, index in (("seconds", 1), ("gc_seconds", 2)):
        row[key] = {p: statistics.median(r[index][p] for r in runs) for p in PHASES}
    row["us_per_node"] = {p: 1e6 * s / n for p, s in row["seconds"].items()}
    row["us_per_node_without_gc"] = {
        p: 1e6 * max(s - row["gc_seconds"][p], 0.0) / n for p, s in row["seconds"].items()}
    return row


def table(results: dict, ratios_by_shape: dict) -> str:
    lines = []
    for shape, rows in results.items():
        head = f"{'nodes':>7}" + "".join(f"{p + ' s':>13}{'us/node':>9}{'gc%':>5}" for p in PHASES)
        lines += [f"{shape}: seconds, microseconds per node, and the garbage collector's share",
                  head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['nodes']:>7}" + "".join(
                f"{r['seconds'][p]:>13.4f}{r['us_per_node'][p]:>9.2f}"
                f"{100 * r['gc_seconds'][p] / r['seconds'][p]:>5.0f}" for p in PHASES))
        lines.append("")
    head = f"{'shape':<8}{'':<12}{'sizes':>13}" + "".join(f"{p:>11}" for p in PHASES)
    lines += ["per-node cost, largest size / smallest (1.0 = linear): the median over rounds of "
              "the ratio within a round", head, "-" * len(head)]
    for shape, ratios in ratios_by_shape.items():
        rows = results[shape]
        sizes = f"{rows[-1]['nodes']}/{rows[0]['nodes']}"
        for key, label in (("us_per_node", "all"), ("us_per_node_without_gc", "without gc")):
            lines.append(f"{shape:<8}{label:<12}{sizes:>13}" +
                         "".join(f"{ratios[key][p]:>11.2f}" for p in PHASES))
    return "\n".join(lines)


def growth(rounds: dict[str, list[list[list]]]) -> dict:
    """For each shape, phase and clock ("all", "without gc"): the per-node cost at the largest
    size over that at the smallest, taken within each round (both sizes ran minutes apart at
    most, under the same load), then the median over rounds. A ratio of the two sizes' medians
    over the whole run would mix rounds that ran under different loads."""
    out: dict = {}
    for shape, by_size in rounds.items():
        if len(by_size) < 2:
            continue
        pairs = [(summarize(small), summarize(large)) for small, large in zip(by_size[0], by_size[-1])]
        out[shape] = {key: {p: statistics.median(large[key][p] / max(small[key][p], 1e-9)
                                                  for small, large in pairs) for p in PHASES}
                      for key in ("us_per_node", "us_per_node_without_gc")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: chain,dense")
    parser.add_argument("--min-nodes", type=int, default=SIZES[0])
    parser.add_argument("--max-nodes", type=int, default=SIZES[-1])
    parser.add_argument("--rounds", type=int, default=5, help="runs of every size, interleaved")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per run")
    parser.add_argument("--repeat-nodes", type=int, default=8000,
                        help="smaller graphs are run several times per round, up to this many nodes")
    parser.add_argument("--cpu", action="store_true", help="time this process's CPU time, not "
                        "wall time: steadier where other processes share the cores")
    parser.add_argument("--json", action="store_true", help="also write benchmarks/results/scaling-*.json")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON")
    args = parser.parse_args(argv)
    global clock
    clock = time.process_time if args.cpu else time.perf_counter
    shapes = args.shapes.split(",")
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        print(f"unknown shape(s) {sorted(unknown)}; known: {list(SHAPES)}", file=sys.stderr)
        return 2
    sizes = [s for s in SIZES if args.min_nodes <= s <= args.max_nodes]
    if not sizes:
        print(f"no size between {args.min_nodes} and {args.max_nodes}: sizes are {SIZES}",
              file=sys.stderr)
        return 2
    for shape in shapes:  # untimed: imports, plugin loading, first-call caches
        measure_once(shape, 200, 1)
    # Rounds over all sizes, so that the machine's drift (other processes, clock speed) spreads
    # over every size alike; graphs under --repeat-nodes nodes are timed on several copies per
    # round, since one run of a small graph is mostly noise.
    # rounds[shape][size index][round]: the runs of that size in that round
    rounds: dict[str, list[list[list]]] = {shape: [[] for _ in sizes] for shape in shapes}
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds} ...", flush=True)
        for shape in shapes:
            for i, size in enumerate(sizes):
                rounds[shape][i].append([measure_once(shape, size, args.steps)
                                         for _ in range(max(1, round(args.repeat_nodes / size)))])
    results = {shape: [summarize([run for part in by_round for run in part])
                       for by_round in rounds[shape]] for shape in shapes}
    ratios = growth(rounds)
    print()
    print(table(results, ratios))
    if args.json:
        stamp = datetime.datetime.now().astimezone()
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"scaling-{stamp:%Y%m%d-%H%M%S}.json"
        report = {"date": stamp.isoformat(timespec="seconds"), "python": platform.python_version(),
                  "numpy": np.__version__, "batch": BATCH, "steps": args.steps,
                  "rounds": args.rounds, "clock": "cpu" if args.cpu else "wall",
                  "results": results, "growth": ratios}
        path.write_text(json.dumps(report, indent=1))
        print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
