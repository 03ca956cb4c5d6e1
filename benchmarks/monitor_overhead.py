"""What recording gradient statistics costs at the monitor's default interval, on the guide's
workloads.

    .venv/bin/python benchmarks/monitor_overhead.py              # about half a minute
    .venv/bin/python benchmarks/monitor_overhead.py --every 20 --workloads deep_sigmoid

A monitored model trains step by step and every step is timed. All the monitor's work falls on
two steps per interval: the recorded one (statistics computed on the device) and the next (the
record brought to the host); on the others it only compares the step count with the interval.
Each of the three is the median over ``--cycles`` intervals, so that a burst of other work on the
machine (this 2-core machine drifts up to 2x over minutes) moves no number, and the overhead is
what the two steps cost beyond two plain steps, spread over the interval. The ``at 20`` column
gives the overhead were the interval 20 steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import DEEP, MLP, graphengine_mlp  # noqa: E402
from workloads_cnn_lstm import graphengine_cnn  # noqa: E402

from graphengine.tools.monitor import GradientMonitor  # noqa: E402

BUILDERS: dict[str, tuple[str, Callable]] = {
    "deep_sigmoid": ("deep sigmoid MLP, 20 hidden x 64, momentum, batch 64",
                     lambda: graphengine_mlp(DEEP, 64)),
    "mlp": ("MLP 784-512-512-10, ReLU, Adam, batch 128", lambda: graphengine_mlp(MLP, 128)),
    "cnn": ("CNN conv16-pool-conv32-pool-dense_10, Adam, batch 64", lambda: graphengine_cnn(64)),
}


def measure(build: Callable, every: int, cycles: int, warmup: int) -> dict[str, float]:
    """Per-step times of one monitored model: the recorded step, the step after it (which brings
    the record to the host), and the others, where the monitor only checks the step count."""
    model, feeds = build()
    GradientMonitor(every=every).attach(model)
    for _ in range(warmup):
        model.train_step(feeds)
    while model.step_count % every:
        model.train_step(feeds)
    times: dict[int, list[float]] = {}
    for _ in range(cycles * every):
        phase = model.step_count % every
        start = time.perf_counter()
        model.train_step(feeds)
        times.setdefault(phase, []).append(time.perf_counter() - start)
    plain = statistics.median(t for phase in range(2, every) for t in times[phase])
    recorded, after = statistics.median(times[0]) / plain, statistics.median(times[1]) / plain
    extra = recorded + after - 2
    return {"plain_ms": 1e3 * plain, "recorded": recorded, "after": after,
            "overhead": extra / every, "overhead_20": extra / 20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="*", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--every", type=int, default=GradientMonitor().every,
                        help="recording interval (default: the monitor's default)")
    parser.add_argument("--cycles", type=int, default=20, help="recording intervals timed")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    args = parser.parse_args(argv)
    print(f"recording every {args.every} steps, {args.cycles} intervals timed step by step")
    print(f"{'workload':<56} {'step ms':>8} {'recorded':>9} {'next':>6} {'overhead':>9} {'at 20':>6}")
    worst = 0.0
    for name in args.workloads:
        title, build = BUILDERS[name]
        r = measure(build, args.every, args.cycles, args.warmup)
        worst = max(worst, r["overhead"])
        print(f"{title:<56} {r['plain_ms']:>8.2f} {r['recorded']:>8.2f}x {r['after']:>5.2f}x "
              f"{100 * r['overhead']:>8.1f}% {100 * r['overhead_20']:>5.1f}%")
    print(f"largest overhead {100 * worst:.1f}% of training time (budget: 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
