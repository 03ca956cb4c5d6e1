"""Data-parallel training over MPI (graphengine.distributed).

The jobs of several ranks run ``.venv/bin/mpiexec -n 2 python tests/mpi/<script>.py`` in a
subprocess, with a timeout as the guard against a hang; the one-process reference runs the same
script in this process. Without mpiexec or mpi4py they are skipped, saying why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import graphengine as ge
from graphengine.distributed import LAUNCHER_VARIABLES, Communicator
from graphengine.tools.monitor import FIELDS

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "mpi"
# tests/mpi/digits.py: the training both sides run, under a name no other module has
_spec = importlib.util.spec_from_file_location("mpi_digits", SCRIPTS / "digits.py")
digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits)

MPIEXEC = Path(sys.executable).parent / "mpiexec"
#: Longer than a healthy job takes by far, on two busy cores: reaching it means a hang.
TIMEOUT = 120


def _mpi_missing() -> str | None:
    if not MPIEXEC.exists() and shutil.which("mpiexec") is None:
        return "mpiexec is not installed: pip install graphengine[mpi]"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed: pip install graphengine[mpi]"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def _plain_env() -> dict[str, str]:
    """This environment without a launcher's variables, and one BLAS thread per process (two
    ranks share two cores; the one-process reference computes with one thread too)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def mpirun(script: str, *args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    mpiexec = str(MPIEXEC) if MPIEXEC.exists() else shutil.which("mpiexec")
    return subprocess.run([mpiexec, "-n", str(ranks), sys.executable, str(SCRIPTS / script), *args],
                          cwd=REPO, env=_plain_env(), capture_output=True, text=True, timeout=TIMEOUT)


def ran(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"the job failed:\n{result.stdout}\n{result.stderr}"
    return result


def parameters(result: np.lib.npyio.NpzFile) -> dict[str, np.ndarray]:
    return {k.removeprefix("param:"): result[k] for k in result.files if k.startswith("param:")}


def assert_same_parameters(mine: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    assert mine.keys() == theirs.keys()
    for name in mine:
        # float32 rounding: the sums over the global batch are taken in another order
        np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The digits in a file: the ranks need not import scikit-learn."""
    return digits.save_digits(tmp_path_factory.mktemp("data") / "digits.npz")


def train_here(out: Path, data: Path, *options: str) -> Path:
    """tests/mpi/digits.py run in this process: a job of one rank, no MPI."""
    out.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        for name in LAUNCHER_VARIABLES:
            patch.delenv(name, raising=False)
        digits.main([str(out), "--data", str(data), *options])
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory, data) -> Path:
    return train_here(tmp_path_factory.mktemp("single"), data)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data) -> tuple[Path, subprocess.CompletedProcess]:
    if _mpi_missing():
        pytest.skip(_mpi_missing())
    out = tmp_path_factory.mktemp("two_ranks")
    return out, ran(mpirun("digits.py", str(out), "--data", str(data)))


# -- without MPI --------------------------------------------------------------------------------

def test_init_without_a_launcher_is_one_rank_and_imports_no_mpi():
    code = ("import sys, graphengine as ge; c = ge.distributed.init(); "
            "print(c.rank, c.size, c.local_rank, c is ge.distributed.init(), 'mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_plain_env(), capture_output=True, text=True,
                         timeout=TIMEOUT, check=True).stdout.split()
    assert out == ["0", "1", "0", "True", "False"]


@given(rows=st.integers(0, 300), size=st.integers(1, 70), start=st.integers(0, 1000))
def test_shares_are_contiguous_balanced_and_cover_the_batch(rows, size, start):
    comms = [Communicator() for _ in range(size)]
    for rank, comm in enumerate(comms):
        comm.rank, comm.size = rank, size
    shares = [comm.share(start, start + rows) for comm in comms]
    assert shares[0][0] == start and shares[-1][1] == start + rows
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    lengths = [b - a for a, b in shares]
    assert max(lengths) - min(lengths) <= 1
    assert rows == 0 or lengths[0] > 0  # rank 0, which draws, always has rows


def test_a_one_rank_job_trains_as_without_distributed(data):
    data = digits.digits(200, data)[0]
    results = []
    for comm in (None, Communicator()):
        model = digits.build(True, comm)  # a synchronized batch norm on one rank: a batch norm
        model.fit(data, epochs=1, batch_size=32, verbose=0)
        results.append(model.parameters())
    for name, value in results[0].items():
        np.testing.assert_array_equal(value, results[1][name], err_msg=name)


def test_distributed_takes_a_communicator():
    g = ge.Graph("wrong")
    x, y = g.input("x", shape=(None, 2)), g.input("y", shape=(None, 1))
    loss = g.loss("mse", g.layer("dense", x, units=1), y)
    with pytest.raises(ge.GraphEngineError, match="distributed= takes the communicator"):
        g.compile(loss, optimizer="sgd", distributed="world")



class IdenticalRanks(Communicator):
    """``size`` ranks that all hold this rank's numbers: a sum over them is ``size`` times it,
    a broadcast changes nothing. What the averaging does with the sum, in one process."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def allreduce(self, array, backend, op="sum"):
        if op == "sum":
            array *= self.size

    def allgather(self, host):
        return np.stack([host] * self.size)

    def broadcast(self, host, root=0):
        pass

    def broadcast_object(self, value, root=0):
        return value


def test_float16_gradients_are_averaged_without_overflowing_and_keep_their_dtype():
    """The rows-weighted sum over 4 ranks of a float16 gradient of ~300 on 64 rows is ~76,800,
    past float16's largest number (65,504): it travels in float32, and the average of identical
    ranks comes back as the one process's gradient, in float16. The row count (256) travels
    with it, exact either way."""
    g = ge.Graph("half")
    x = g.input("x", shape=(None, 2), dtype="float16")
    w = g.parameter("w", (2,), init="ones", dtype="float16")
    loss = (x * w).sum()
    feeds = {"x": np.full((64, 2), 300 / 64, np.float16)}
    grads = []
    for comm in (None, IdenticalRanks(4)):
        model = g.compile(loss, outputs=[loss], optimizer="sgd", distributed=comm)
        model.forward(feeds)
        model.backward()
        grads.append(model.gradients()["w"])
    assert grads[1].dtype == np.float16 and np.isfinite(grads[1]).all()
    np.testing.assert_array_equal(grads[1], grads[0])
    np.testing.assert_allclose(grads[0], [300, 300], rtol=1e-2)

# -- jobs of two ranks --------------------------------------------------------------------------

@needs_mpi
@pytest.mark.slow
def test_two_ranks_train_the_weights_of_one_process_on_the_global_batch(single, two_ranks):
    out, job = two_ranks
    mine, theirs = np.load(out / "result.npz"), np.load(single / "result.npz")
    assert_same_parameters(parameters(mine), parameters(theirs))
    # Epoch and validation losses are reduced over the ranks: those of the whole data.
    np.testing.assert_allclose(mine["loss"], theirs["loss"], rtol=1e-5)
    np.testing.assert_allclose(mine["val_loss"], theirs["val_loss"], rtol=1e-5)
    # One allreduce of one fused buffer averages a step's gradients, not one per parameter.
    assert int(mine["allreduce_calls"]) == 1
    # Only rank 0 prints, saves and draws.
    assert job.stdout.count("epoch ") == digits.EPOCHS
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-1.ge", "checkpoint-2.ge", "flow-0.svg", "result.npz"]


@needs_mpi
@pytest.mark.slow
def test_the_gradient_flow_of_two_ranks_is_that_of_the_global_batch(single, two_ranks):
    mine, theirs = np.load(two_ranks[0] / "result.npz"), np.load(single / "result.npz")
    fields = list(FIELDS)
    dead = fields.index("dead_fraction")
    exact = [i for i in range(len(fields)) if i != dead]
    table, reference = mine["record"], theirs["record"]
    assert np.isnan(table).tolist() == np.isnan(reference).tolist()
    np.testing.assert_allclose(table[:, exact], reference[:, exact], rtol=1e-4, atol=1e-9)
    # The ranks' smallest dead fraction bounds the global batch's from above.
    measured = ~np.isnan(reference[:, dead])
    assert measured.any()
    assert (table[measured, dead] >= reference[measured, dead] - 1e-12).all()
    np.testing.assert_allclose(mine["record_loss"], theirs["record_loss"], rtol=1e-5)


@needs_mpi
@pytest.mark.slow
def test_two_ranks_resume_from_a_checkpoint(two_ranks, data, tmp_path):
    out, _ = two_ranks
    ran(mpirun("digits.py", str(tmp_path), "--data", str(data), "--resume", str(out / "checkpoint-1.ge")))
    resumed, uninterrupted = np.load(tmp_path / "result.npz"), np.load(out / "result.npz")
    assert_same_parameters(parameters(resumed), parameters(uninterrupted))
    np.testing.assert_allclose(resumed["loss"], uninterrupted["loss"][1:], rtol=1e-6)


@needs_mpi
@pytest.mark.slow
def test_synchronized_batch_norm_on_two_ranks_is_batch_norm_on_the_global_batch(data, tmp_path):
    single = train_here(tmp_path / "single", data, "--sync-bn")
    ran(mpirun("digits.py", str(tmp_path), "--data", str(data), "--sync-bn"))
    mine, theirs = np.load(tmp_path / "result.npz"), np.load(single / "result.npz")
    assert "bn/running_var" in parameters(mine)
    assert_same_parameters(parameters(mine), parameters(theirs))
    np.testing.assert_allclose(mine["loss"], theirs["loss"], rtol=1e-5)


@needs_mpi
def test_a_failing_rank_ends_the_job():
    # The timeout of mpirun is the guard: a hang raises TimeoutExpired.
    job = mpirun("fail.py")
    assert job.returncode != 0
    assert "rank 1 of 2 failed" in job.stderr, f"stdout:\n{job.stdout}\nstderr:\n{job.stderr}"
    assert "rank 1 fails on purpose" in job.stderr


@pytest.mark.slow
def test_the_example_trains_on_one_process_without_mpi(tmp_path, monkeypatch):
    from examples_loader import load_example

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    accuracy = load_example("distributed_digits").main(epochs=2, out=tmp_path)
    assert accuracy > 0.7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-2.ge", "gradient_flow.svg"]


@pytest.mark.slow
@needs_mpi
def test_the_readme_command_runs_the_example_on_two_processes(tmp_path):
    """The README's "more than one machine" command, with 5 epochs: rank 0 alone prints and
    writes the checkpoint and the diagram."""
    mpiexec = str(MPIEXEC) if MPIEXEC.exists() else shutil.which("mpiexec")
    script = REPO / "examples" / "distributed_digits.py"
    job = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script), "5"], cwd=tmp_path,
                         env=_plain_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    lines = job.stdout.splitlines()
    assert sum(line.startswith("epoch 1/5") for line in lines) == 1  # rank 0 alone prints
    assert lines[-1].startswith("2 rank(s): test accuracy")
    accuracy = float(job.stdout.split("test accuracy ")[1].split(";")[0])
    assert accuracy > 0.85
    written = sorted(p.name for p in (tmp_path / "distributed_output").iterdir())
    assert written == ["digits-5.ge", "gradient_flow.svg"]
