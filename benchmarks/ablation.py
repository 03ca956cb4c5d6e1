"""Each execution optimization switched off in turn, on the two MLP workloads, in one run.

    python benchmarks/ablation.py [--rounds 9] [--threads 1] [--memory 1024]

Variants of the same graphengine model run interleaved in rounds (untimed warm-up before each
timed block, as in run.py); the table gives ms per step and the median per-round ratio to the
fully optimized model. "none" is the engine before this work: one step per graph node,
one optimizer call per parameter, feeds checked on every call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import in_fresh_process, peak_memory, time_block  # noqa: E402
from workloads import DEEP, MLP, graphengine_mlp  # noqa: E402

from graphengine.compiler.fusion import FusedDense  # noqa: E402


def no_fusion(model):
    for plan in model._plans.values():
        plan.fast = None


def no_flat_update(model):
    model.flat.groups = []
    no_gradient_buffers(model)


def unchunked(model):
    for group in model.flat.groups:
        group.chunk = 1 << 62


def no_gradient_buffers(model):
    for plan in model._plans.values():
        for bstep in plan.fast.backward if plan.fast else ():
            if isinstance(bstep.step.op, FusedDense):
                bstep.step.op.grad_out = (None, None)


def no_early_release(model):
    """Every intermediate lives until the step ends, as without the plan's liveness analysis."""
    for plan in model._plans.values():
        for variant in (plan, plan.fast):
            for step in variant.steps if variant else ():
                step.release = ()
            for bstep in variant.backward if variant else ():
                bstep.release = ()
            if variant:
                variant.__dict__.pop("_programs", None)


def no_feed_cache(model):
    """Feeds checked on every call: the plan forgets the last feeds that passed the checks."""
    forward = model.executor.forward

    def uncached(plan, feeds, **options):
        plan.feed_signature = None
        return forward(plan, feeds, **options)
    model.executor.forward = uncached


VARIANTS = {
    "all on": [],
    "no fusion": [no_fusion],
    "no flat update": [no_flat_update],
    "flat, unchunked": [unchunked],
    "no grad buffers": [no_gradient_buffers],
    "no feed cache": [no_feed_cache],
    "no early release": [no_early_release],
    "none": [no_fusion, no_flat_update, no_feed_cache],
}


def variant_step(spec, name: str):
    def make(batch: int):
        model, feeds = graphengine_mlp(spec, batch)
        for switch in VARIANTS[name]:
            switch(model)
        return lambda: model.train_step(feeds)
    return make


def memory_table(batch: int) -> None:
    print(f"\nmlp (batch {batch}): peak memory of a step, MiB (transient part), as in run.py")
    for name in VARIANTS:
        m = in_fresh_process([sys.executable, __file__, "--probe", name, str(batch)])
        print(f"  {name:<18}{m.get('rss_peak_mib', float('nan')):>9.1f} "
              f"({m.get('rss_transient_mib', float('nan')):.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--memory", type=int, metavar="BATCH", help="also the MLP's peak memory")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--block", type=float, default=0.25)
    parser.add_argument("--threads", type=int, help="BLAS threads (default: one per core)")
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(peak_memory(variant_step(MLP, args.probe[0]), int(args.probe[1]), traced=True)))
        return
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    for spec, batch, label in ((DEEP, 64, "deep_sigmoid"), (MLP, 128, "mlp")):
        steps = {name: variant_step(spec, name)(batch) for name in VARIANTS}
        block = max(3, round(args.block / time_block(steps["none"], 0.1, 3)))
        rounds = []
        for r in range(args.rounds):
            names = list(steps)[r % len(steps):] + list(steps)[:r % len(steps)]
            rounds.append({n: time_block(steps[n], 0.1, block) for n in names})
        print(f"\n{label} (batch {batch}): ms per step, ratio to 'all on'")
        for name in steps:
            ms = 1e3 * statistics.median(t[name] for t in rounds)
            ratio = statistics.median(t[name] / t["all on"] for t in rounds)
            print(f"  {name:<18}{ms:>9.3f}{ratio:>8.2f}")
    if args.memory:
        memory_table(args.memory)


if __name__ == "__main__":
    main()
