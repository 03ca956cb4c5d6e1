"""graphengine against PyTorch CPU (and a hand-written NumPy step) on the guide's workloads.

    python benchmarks/run.py                      # everything: about 3 minutes
    python benchmarks/run.py --workloads deep_sigmoid --rounds 5

Time: the sides run interleaved in *rounds*. In each round every side first runs untimed for
``--warmup`` seconds (so the other side's BLAS/OpenMP workers have gone quiet and this side's
caches and pools are warm), then a timed block of steps. The table gives each side's median ms
per step and the median over rounds of the per-round ratio graphengine / other: the machine's
speed drifts, so only ratios taken in the same round mean much.

Memory: each side runs in a fresh subprocess with glibc's mmap threshold fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_``), so every array larger than that is its own mapping, returned to the
system when freed, and the resident set follows the live arrays instead of the allocator's cache.
After warm-up steps the peak resident set (VmHWM) is reset, one step runs, and the reported peak is
VmHWM, less the pages of mapped files (library code), minus the anonymous resident set
measured *before the model was built* (and after a throwaway model of batch 2 has paid the
library's one-time costs: imports, plugin loading, PyTorch's thread pools): parameters,
optimizer state, gradients, buffers kept between steps and the step's temporaries all count,
for both sides alike. "transient" is the part
above the resident set just before the step: activations and temporaries only. For the
NumPy-based sides, tracemalloc's peak over the same span is a cross-check.
"""

from __future__ import annotations

import os
import sys

# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE may be set on this machine to protect old OpenBLAS builds;
# they slow a current NumPy down, so the benchmark (and only the benchmark) runs without them.
_BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _BLAS_OVERRIDES) and "numpy" not in sys.modules:
    _env = {k: v for k, v in os.environ.items() if k not in _BLAS_OVERRIDES}
    os.execve(sys.executable, [sys.executable, *sys.argv], _env)

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
SIDES = ("graphengine", "torch", "numpy")
MEMORY_BATCH = {"mlp": 1024}  # the issue's memory target: the MLP at batch 1024


def load_workloads() -> list:
    sys.path.insert(0, str(HERE))
    return [*importlib.import_module("workloads").WORKLOADS,
            *importlib.import_module("workloads_cnn_lstm").WORKLOADS]


# ------------------------------------------------------------------------------ time

def time_block(step, warmup: float, block: int) -> float:
    """Seconds per step: untimed warm-up for ``warmup`` seconds, then ``block`` timed steps."""
    gc.collect()
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        step()
    start = time.perf_counter()
    for _ in range(block):
        step()
    return (time.perf_counter() - start) / block


def measure_time(workload, rounds: int, warmup: float, block_seconds: float) -> dict:
    steps = {}
    for side in SIDES:
        maker = getattr(workload, side)
        if maker is not None:
            steps[side] = maker(workload.batch)
    blocks = {}
    for side, step in steps.items():  # size each block to about block_seconds
        blocks[side] = max(3, round(block_seconds / max(time_block(step, warmup, 3), 1e-6)))
    per_round: list[dict[str, float]] = []
    order = list(steps)
    for r in range(rounds):
        times = {}
        for side in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            times[side] = time_block(steps[side], warmup, blocks[side])
        per_round.append(times)
    ms = {side: 1e3 * statistics.median(t[side] for t in per_round) for side in steps}
    ratios = {f"graphengine/{side}": statistics.median(t["graphengine"] / t[side] for t in per_round)
              for side in steps if side != "graphengine"}
    return {"ms": ms, "ratio": ratios, "steps_per_block": blocks,
            "rounds_ms": [{s: 1e3 * v for s, v in t.items()} for t in per_round]}


# ------------------------------------------------------------------------------ memory

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe_memory(workload_name: str, side: str, batch: int) -> dict:
    """Run in a fresh process: peak memory of one training step (see the module docstring)."""
    workload = next(w for w in load_workloads() if w.name == workload_name)
    return peak_memory(getattr(workload, side), batch, traced=side != "torch")


def peak_memory(maker, batch: int, traced: bool) -> dict:
    """Peak memory of one step of ``maker(batch)``, in this process (fresh, with the mmap
    threshold fixed: see the module docstring); ``traced`` adds tracemalloc's view."""
    # The library's one-time costs (imports, plugin loading, PyTorch's thread pools) are paid
    # before the baseline by a throwaway model of batch 2: they are not the step's memory.
    throwaway = maker(2)
    throwaway()
    del throwaway
    gc.collect()
    if traced:
        tracemalloc.start()
    baseline = _status_kib("RssAnon")
    step = maker(batch)
    for _ in range(3):
        step()
    gc.collect()
    if traced:
        tracemalloc.reset_peak()
    before_step = _status_kib("RssAnon")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    step()
    # VmHWM counts the pages of code and data files mapped in too; they are not the step's
    # memory, and after the warm-up steps they no longer change.
    anon_peak = _status_kib("VmHWM") - _status_kib("RssFile") - _status_kib("RssShmem")
    out = {"rss_peak_mib": (anon_peak - baseline) / 1024,
           "rss_transient_mib": (anon_peak - before_step) / 1024}
    if traced:
        out["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    return out


def measure_memory(workload_name: str, side: str, batch: int) -> dict:
    return in_fresh_process([sys.executable, __file__, "--probe-memory", workload_name, side, str(batch)])


def in_fresh_process(command: list[str]) -> dict:
    """Run a memory probe command; its last output line is the JSON result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for var in _BLAS_OVERRIDES:
        env.pop(var, None)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report

def machine() -> dict:
    import numpy
    from threadpoolctl import threadpool_info
    info = {"cores": os.cpu_count(), "processor": _cpu_name(), "python": platform.python_version(),
            "numpy": numpy.__version__,
            "blas": [f"{p['internal_api']} {p.get('version')} {p.get('architecture', '')}".strip()
                     for p in threadpool_info() if p["user_api"] == "blas"]}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cell(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def table(results: dict) -> str:
    head = (f"{'workload':<14}{'batch':>6}{'graphengine':>13}{'PyTorch':>10}{'NumPy':>9}"
            f"{'ge/torch':>10}{'ge/numpy':>10}")
    lines = ["ms per training step (median), ratios: median of per-round ratios", head, "-" * len(head)]
    for name, r in results.items():
        ms, ratio = r["ms"], r["ratio"]
        lines.append(f"{name:<14}{r['batch']:>6}{_cell(ms.get('graphengine'), '.3f'):>13}"
                     f"{_cell(ms.get('torch'), '.3f'):>10}{_cell(ms.get('numpy'), '.3f'):>9}"
                     f"{_cell(ratio.get('graphengine/torch'), '.2f'):>10}"
                     f"{_cell(ratio.get('graphengine/numpy'), '.2f'):>10}")
    memory = [(name, batch, sides) for name, r in results.items()
              for batch, sides in r.get("memory", {}).items()]
    if memory:
        head = f"{'workload':<14}{'batch':>6}{'graphengine':>16}{'PyTorch':>16}{'NumPy':>16}"
        lines += ["", "peak memory of a training step, MiB: all the model costs (transient part)",
                  head, "-" * len(head)]
        for name, batch, sides in memory:
            cells = [f"{_cell(m.get('rss_peak_mib'), '.1f')} ({_cell(m.get('rss_transient_mib'), '.1f')})"
                     if "error" not in m else "failed" for m in
                     (sides.get(side, {}) for side in SIDES)]
            cells = [c if c != "- (-)" else "-" for c in cells]
            lines.append(f"{name:<14}{batch:>6}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", help="comma-separated names (default: all)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=float, default=0.15, help="untimed seconds before each block")
    parser.add_argument("--block", type=float, default=0.3, help="seconds per timed block")
    parser.add_argument("--threads", type=int, help="threads for both sides' BLAS/OpenMP pools "
                        "(default: the libraries' own choice, one per core); 1 is far less "
                        "sensitive to other processes on a shared machine")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON")
    parser.add_argument("--probe-memory", nargs=3, metavar=("WORKLOAD", "SIDE", "BATCH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_memory:
        name, side, batch = args.probe_memory
        print(json.dumps(probe_memory(name, side, int(batch))))
        return 0
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch is needed for the comparison: pip install torch==2.13.0 "
              "(or pip install -e '.[bench]')", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    workloads = load_workloads()
    if args.workloads:
        wanted = args.workloads.split(",")
        unknown = set(wanted) - {w.name for w in workloads}
        if unknown:
            print(f"unknown workload(s) {sorted(unknown)}; known: {[w.name for w in workloads]}",
                  file=sys.stderr)
            return 2
        workloads = [w for w in workloads if w.name in wanted]
    info = machine()
    print(f"{info['processor']}, {info['cores']} cores; numpy {info['numpy']} ({', '.join(info['blas'])}), "
          f"torch {info['torch']} ({info['torch_threads']} threads)", flush=True)
    load = os.getloadavg()[0]
    info["load_before"] = round(load, 2)
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f}: other processes compete for the cores; the "
              f"thread pools of both sides suffer (PyTorch's most), so ratios are unreliable",
              flush=True)
    results = {}
    for workload in workloads:
        print(f"timing {workload.title} ...", flush=True)
        r = {"title": workload.title, "batch": workload.batch,
             **measure_time(workload, args.rounds, args.warmup, args.block)}
        if not args.no_memory:
            r["memory"] = {}
            for batch in dict.fromkeys((workload.batch, MEMORY_BATCH.get(workload.name, workload.batch))):
                r["memory"][batch] = {side: measure_memory(workload.name, side, batch)
                                      for side in SIDES if getattr(workload, side) is not None}
        results[workload.name] = r
    info["load_after"] = round(os.getloadavg()[0], 2)
    print()
    print(table(results))
    stamp = datetime.datetime.now().astimezone()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{stamp:%Y%m%d-%H%M%S}.json"
    report = {"date": stamp.isoformat(timespec="seconds"), "machine": info,
              "settings": {"rounds": args.rounds, "warmup_s": args.warmup, "block_s": args.block,
                           "threads": args.threads},
              "workloads": results}
    path.write_text(json.dumps(report, indent=1))
    (args.out / "latest.json").write_text(json.dumps(report, indent=1))
    print(f"\nwritten to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
