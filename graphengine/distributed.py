"""Data-parallel training over MPI, as ChainerMN and Horovod do it: one process per device or
node, parameters broadcast from rank 0 when the model is made, gradients averaged with one
allreduce after every backward, so that clipping, penalties and the optimizer then run
identically on every rank and the parameters never drift apart.

    comm = ge.distributed.init()                 # rank, size, local_rank
    model = g.compile(loss, optimizer=..., distributed=comm)
    model.fit(data, epochs=5, batch_size=256)    # 256 rows per step over all the ranks

Start the script with ``mpiexec -n 4 python train.py``; started plainly (``python train.py``)
it is a job of one rank, which needs neither MPI nor mpi4py (imported only under a launcher).

Each rank's gradient is the mean over its share of the global batch; the ranks' gradients are
weighted by their shares' rows, so the average is the gradient of the mean loss over the whole
global batch even when the shares are unequal (the last, short batch of an epoch). That holds
for losses that are means over the batch, as every built-in loss is.

A training ``forward``/``backward`` of a distributed model is a collective call: every rank
makes it (a script that runs the same code on every rank does). See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError, GraphEngineError
from .runtime.feeds import batch_rows
from .tools.monitor import FIELDS, find_monitor

#: How long a failing rank waits, after writing its traceback, before it aborts the job.
ABORT_GRACE_SECONDS = 0.5

if TYPE_CHECKING:
    from .model import Model
    from .runtime.backend import Backend
    from .train.metrics import Meter

#: Environment variables that MPI launchers (MPICH's and Intel's Hydra, Open MPI, PMIx, Slurm's
#: srun with PMI, MVAPICH) set in the processes they start: without one, ``init`` needs no MPI.
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")

_RMS, _NORM, _MAX = (FIELDS.index(f) for f in ("grad_rms", "grad_norm", "grad_max"))
_DEAD, _SATURATION = FIELDS.index("dead_fraction"), FIELDS.index("saturation")


class Communicator:
    """The processes of a job: ``rank`` (0 .. ``size`` - 1), ``size``, and ``local_rank``
    (the rank among the processes on this node: which GPU to take). Wraps an mpi4py
    communicator, or none for a job of one process."""

    def __init__(self, mpi_comm: Any = None) -> None:
        self.mpi = mpi_comm
        if mpi_comm is None:
            self.rank, self.size, self.local_rank = 0, 1, 0
            return
        from mpi4py import MPI

        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = node.Get_rank()
        node.Free()

    @property
    def is_root(self) -> bool:
        """Rank 0: the one that prints, saves and draws."""
        return self.rank == 0

    def share(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's contiguous part of rows ``start:stop`` (sizes differ by at most one)."""
        # The first ranks take one more row where they do not divide evenly: rank 0 is never
        # left without rows (it draws the gradient flow).
        base, extra = divmod(stop - start, self.size)
        first = start + self.rank * base + min(self.rank, extra)
        return first, first + base + (self.rank < extra)

    def allreduce(self, array: Any, backend: Backend, op: str = "sum") -> None:
        """Reduce ``array`` (of ``backend``) over the ranks, in place: ``"sum"`` or ``"max"``.
        Device arrays go through the host explicitly (see docs/distributed.md for CUDA-aware
        MPI and NCCL)."""
        if self.size == 1:
            return
        from mpi4py import MPI

        mpi_op = MPI.SUM if op == "sum" else MPI.MAX
        if isinstance(array, np.ndarray) and array.flags.c_contiguous:
            self.mpi.Allreduce(MPI.IN_PLACE, array, op=mpi_op)
            return
        host = np.ascontiguousarray(backend.to_numpy(array))
        self.mpi.Allreduce(MPI.IN_PLACE, host, op=mpi_op)
        array[...] = backend.asarray(host)

    def allgather(self, host: np.ndarray) -> np.ndarray:
        """Every rank's ``host`` array, stacked in rank order (shape ``(size, *host.shape)``)."""
        host = np.ascontiguousarray(host)
        if self.size == 1:
            return host[None]
        out = np.empty((self.size, *host.shape), dtype=host.dtype)
        self.mpi.Allgather(host, out)
        return out

    def broadcast(self, host: np.ndarray, root: int = 0) -> None:
        """Rank ``root``'s values of the host array ``host`` on every rank, in place."""
        if self.size > 1:
            self.mpi.Bcast(host, root=root)

    def broadcast_object(self, value: Any, root: int = 0) -> Any:
        """Rank ``root``'s ``value`` (any picklable object) on every rank."""
        return value if self.size == 1 else self.mpi.bcast(value, root=root)

    def barrier(self) -> None:
        """Wait until every rank arrives here."""
        if self.size > 1:
            self.mpi.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every process of the job now, with status ``code``."""
        if self.size > 1:
            self.mpi.Abort(code)
        raise SystemExit(code)

    def __repr__(self) -> str:
        return f"<Communicator rank {self.rank} of {self.size} (local rank {self.local_rank})>"


_world: Communicator | None = None


def launched() -> bool:
    """Whether an MPI launcher (``mpiexec``, ``srun``) started this process."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def init() -> Communicator:
    """The communicator of this job (the same one on every call).

    Under an MPI launcher it imports mpi4py and wraps ``COMM_WORLD``; when the job has more than
    one rank, an uncaught exception on any rank prints its traceback and aborts the whole job
    with status 1, so a failing rank never leaves the others waiting in a collective call.
    Started plainly, it is a job of one rank: nothing is imported.
    """
    global _world
    if _world is not None:
        return _world
    if not launched():
        _world = Communicator()
        return _world
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise GraphEngineError(f"this process was started by an MPI launcher, but mpi4py cannot be "
                               f"imported ({exc}): pip install graphengine[mpi]") from None
    _world = Communicator(MPI.COMM_WORLD)
    if _world.size > 1:
        sys.excepthook = _abort_on_exception(sys.excepthook, _world)
    return _world


def _abort_on_exception(previous: Any, comm: Communicator) -> Any:
    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        try:
            print(f"graphengine.distributed: rank {comm.rank} of {comm.size} failed; aborting the "
                  f"job", file=sys.stderr)
            previous(kind, error, trace)
        except Exception:  # the traceback printer itself failed: still abort
            traceback.print_exception(kind, error, trace)
        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards each rank's output through a pipe, and tears the job down on
        # Abort: on a busy machine the traceback was lost unless it got a moment to arrive.
        time.sleep(ABORT_GRACE_SECONDS)
        comm.abort(1)
    return hook


def _carriers(arrays: Mapping[str, Any], names: Iterable[str]) -> dict[np.dtype, list[str]]:
    """``names`` grouped by the dtype of the buffer that carries their arrays between ranks:
    their own, floats at least float32. In float16 a sum of rows-weighted gradients over the
    ranks overflows where the average would not, and the row counts that travel with them are
    not exact above 2048."""
    groups: dict[np.dtype, list[str]] = {}
    for name in names:
        dtype = np.dtype(arrays[name].dtype)
        carrier = np.promote_types(dtype, np.float32) if dtype.kind == "f" else dtype
        groups.setdefault(carrier, []).append(name)
    return groups


_ACTIVE: ContextVar[DataParallel | None] = ContextVar("graphengine_data_parallel", default=None)


def reducing_group() -> DataParallel | None:
    """The data-parallel model whose training forward or backward runs now in this thread,
    where it has more than one rank: what operators that reduce over the ranks
    (``batch_norm(sync=True)``) reduce over. None: their own batch is the batch."""
    group = _ACTIVE.get()
    return group if group is not None and group.comm.size > 1 else None


def writes(model: Model) -> bool:
    """Whether this process writes files and prints for ``model``: always, unless the model
    is distributed and this is not rank 0."""
    group = getattr(model, "distributed", None)
    return group is None or group.comm.is_root


def attach(model: Model, comm: Communicator) -> Model:
    """Make ``model`` data-parallel over ``comm`` (what ``compile(..., distributed=comm)``
    does; for a model from ``ge.load``, which every rank loads): rank 0's parameters and
    shuffling state on every rank. Returns the model.

    Only rank 0 writes a model file (``save`` returns at once on the others and does not wait,
    so that ``if comm.is_root: model.save(path)`` cannot deadlock): call ``comm.barrier()``
    after a save before every rank loads that file."""
    model.distributed = DataParallel(model, comm)
    return model


class DataParallel:
    """A model's data parallelism: its communicator, the fused gradient buffers, and the
    rows of this rank's share of the current step (``weight``)."""

    def __init__(self, model: Model, comm: Communicator) -> None:
        if not isinstance(comm, Communicator):
            raise GraphEngineError(f"distributed= takes the communicator of "
                                   f"graphengine.distributed.init(), got {type(comm).__name__}")
        self.comm, self.backend, self.xp = comm, model.backend, model.xp
        #: Rows of this rank's share in the current training step.
        self.weight = 0
        self._layout: tuple[str, ...] = ()
        self._buffers: list[tuple[Any, list[tuple[str, int, int]]]] = []
        self._reduced_record: Any = None
        #: Nodes whose training pass reduces over the ranks (``op.collective``, e.g. a
        #: synchronized batch norm): every rank must run them, so no rank may go without rows.
        self.collective_nodes = [name for name, node in model.graph.nodes.items()
                                 if getattr(node.op, "collective", False)]
        self._check_same_model(model)
        self._broadcast_parameters(model)
        rng = model.data_rng.bit_generator
        rng.state = comm.broadcast_object(rng.state)

    # -- making the model -------------------------------------------------------------------

    def _check_same_model(self, model: Model) -> None:
        """Every rank must hold the same parameters, else the fused buffers would not line up:
        refuse on every rank, not hang or mix unrelated numbers."""
        text = repr(sorted((n, tuple(a.shape), str(a.dtype)) for n, a in model.store.arrays.items()))
        digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint8)
        digests = self.comm.allgather(digest)
        different = [r for r in range(self.comm.size) if not np.array_equal(digests[r], digests[0])]
        if different:
            raise GraphEngineError(f"ranks {different} compiled a model with other parameters "
                                   f"(names, shapes or dtypes) than rank 0: every rank must build "
                                   f"the same graph")

    def _broadcast_parameters(self, model: Model) -> None:
        if self.comm.size == 1:
            return
        arrays = {name: self.backend.to_numpy(a) for name, a in sorted(model.store.arrays.items())}
        for dtype, names in _carriers(arrays, arrays).items():
            flat = np.concatenate([arrays[n].reshape(-1) for n in names], dtype=dtype)
            self.comm.broadcast(flat)
            start = 0
            for name in names:
                size = arrays[name].size
                arrays[name] = flat[start:start + size].reshape(arrays[name].shape)
                start += size
        model.set_parameters(arrays)

    # -- a training step -------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, feeds: Mapping[str, Any]) -> Iterator[None]:
        """A training forward on this rank's share ``feeds``; its rows weigh its gradients."""
        rows = batch_rows(feeds)
        self.weight = 1 if rows is None else rows
        with self.collective():
            yield

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        """Operators run inside reduce over this model's ranks (see :func:`reducing_group`)."""
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def check_batches(self, *rows: int) -> None:
        """Refuse global batches of ``rows`` that would leave a rank without rows while the
        model has collective nodes (a rank without rows skips the pass they reduce in)."""
        short = [r for r in rows if 0 < r < self.comm.size]
        if self.collective_nodes and short:
            raise DataError(f"a global batch of {short[0]} rows leaves some of the "
                            f"{self.comm.size} ranks without rows, and {self.collective_nodes} "
                            f"reduce over every rank in training: choose a batch_size of at least "
                            f"{self.comm.size} whose last batch (dataset rows % batch_size) is "
                            f"empty or has at least {self.comm.size} rows")

    def idle(self, model: Model) -> dict[str, Any]:
        """This rank's part of a step whose share of the global batch is empty: no rows, no
        gradient, the others' average."""
        self.weight = 0
        return self.average(model, {})

    def average(self, model: Model, grads: dict[str, Any]) -> dict[str, Any]:
        """The gradients averaged over the ranks, each weighted by its share's rows (zero for
        a rank that had no rows this step): one allreduce of one buffer per dtype, holding
        every trainable parameter's gradient. On a step the model's gradient monitor records,
        its record is made that of the global batch too (rank 0 draws it)."""
        if self.comm.size == 1:
            return grads
        names = tuple(n for n in model.train_plan.parameters if n in model.store.trainable())
        if names != self._layout:
            self._build_buffers(model, names)
        recorded = self._record_of(model) is not None
        first = self._buffers[0][0]
        for buffer, members in self._buffers:
            for name, start, stop in members:
                grad = grads.get(name)
                if grad is None:
                    buffer[start:stop] = 0
                else:
                    buffer[start:stop] = self.xp.reshape(grad, (-1,))
            buffer *= self.weight
        count = len(names)
        # After the gradients: which were present here, this rank's rows, whether it records.
        first[-count - 2:-2] = self.xp.asarray([1.0 if n in grads else 0.0 for n in names],
                                               dtype=first.dtype)
        first[-2], first[-1] = self.weight, float(recorded)
        extras = first[-count - 2:]
        for buffer, _ in self._buffers:
            self.comm.allreduce(buffer, self.backend)
        tail = np.array(self.backend.to_numpy(extras))  # a copy: the buffer is scaled next
        present, total, recorders = tail[:count], float(tail[-2]), float(tail[-1])
        averaged = {}
        params = model.store.arrays
        for buffer, members in self._buffers:
            buffer /= total
            for name, start, stop in members:
                if present[self._position[name]] > 0:
                    grad = self.xp.reshape(buffer[start:stop], params[name].shape)
                    averaged[name] = grad.astype(params[name].dtype, copy=False)
        if recorders:
            self._reduce_record(model, averaged, total)
        return averaged

    def _build_buffers(self, model: Model, names: tuple[str, ...]) -> None:
        params = model.store.arrays
        self._buffers = []
        for i, (dtype, members) in enumerate(_carriers(params, names).items()):
            layout, start = [], 0
            for name in members:
                layout.append((name, start, start + params[name].size))
                start += params[name].size
            extra = len(names) + 2 if i == 0 else 0
            self._buffers.append((self.xp.zeros(start + extra, dtype=dtype), layout))
        self._layout = names
        #: Each parameter's index in ``names``: where its "present" flag travels.
        self._position = {name: i for i, name in enumerate(names)}

    # -- operators that reduce over the ranks (batch_norm(sync=True)) -------------------------

    def moments(self, xp: Any, x: Any, axes: tuple[int, ...]) -> tuple[Any, Any, int]:
        """Mean and (biased) variance of ``x`` over ``axes`` and over every rank's share, and
        the number of values per feature they cover. The ranks' means and squared deviations
        are combined as Chan et al. do (no ``E[x^2] - E[x]^2`` cancellation), in rank order."""
        count = x.size // math.prod(s for i, s in enumerate(x.shape) if i not in axes)
        mean = x.mean(axis=axes)
        squares = ((x - mean.reshape([1 if i in axes else s for i, s in enumerate(x.shape)])) ** 2
                   ).sum(axis=axes)
        to_host = self.backend.to_numpy
        mine = np.concatenate([[count], to_host(mean).astype(np.float64),
                               to_host(squares).astype(np.float64)])
        counts, means, squares = np.split(self.comm.allgather(mine), [1, 1 + mean.size], axis=1)
        total = counts.sum()
        overall = (counts * means).sum(axis=0) / total
        spread = squares.sum(axis=0) + (counts * (means - overall) ** 2).sum(axis=0)
        as_x = self.backend.asarray
        return as_x(overall, dtype=x.dtype), as_x(spread / total, dtype=x.dtype), int(total)

    def batch_sums(self, *sums: Any) -> list[Any]:
        """Per-feature sums over this rank's share of gradients of its own loss (``sum(dy)``,
        say) -> the sums over the whole global batch of the gradients of the global mean
        loss, rescaled to this rank's loss (the local gradient is ``total / rows`` times the
        global one), as a synchronized batch norm's backward needs them."""
        host = np.concatenate([self.backend.to_numpy(s).astype(np.float64) * self.weight for s in sums])
        self.comm.allreduce(host, self.backend)
        host /= self.weight
        return [self.backend.asarray(part, dtype=s.dtype) for part, s in zip(np.split(host, len(sums)), sums)]

    # -- metrics -----------------------------------------------------------------------------

    def reduce_sums(self, totals: dict[str, float], meter: Meter) -> None:
        """The sums of a pass over this rank's shares (rows, loss, correct predictions, metric
        sums) become those over every rank's, in place: the epoch's or the evaluation's numbers
        are then those of the whole data, the same on every rank."""
        if self.comm.size == 1:
            return
        to_host = self.backend.to_numpy
        mine = (dict(totals), [None if sums is None else [float(v) if isinstance(v, (int, float))
                                                          else float(to_host(v)) for v in sums]
                               for sums in meter.totals])
        everyone = self.comm.mpi.allgather(mine)
        for key in totals:
            totals[key] = sum(part[key] for part, _ in everyone)
        for i in range(len(meter.totals)):
            parts = [sums[i] for _, sums in everyone if sums[i] is not None]
            meter.totals[i] = [sum(values) for values in zip(*parts)] if parts else None

    # -- the gradient monitor ---------------------------------------------------------------

    def _record_of(self, model: Model) -> Any:
        """The monitor's record of this step, when it records one and it is not reduced yet."""
        monitor = find_monitor(model)
        record = monitor.latest() if monitor is not None else None
        if record is None or record.step != model.step_count or record is self._reduced_record:
            return None
        return record

    def _reduce_record(self, model: Model, averaged: Mapping[str, Any], total: float) -> None:
        """Make this step's record what one process would have recorded on the global batch.

        A node with a batch axis holds a share of the rows on each rank, and its gradient for
        the global mean loss is the local one scaled by ``share = rows / total``: squared norms
        and maxima of the pieces combine exactly, and so do saturated fractions weighted by
        rows. A unit is dead when no row of the global batch activates it: the smallest of the
        ranks' dead fractions bounds that share from above, and stands for it. Parameters take
        their numbers from the averaged gradients. Other
        nodes (the loss, values computed from parameters alone) and fanned-out edges take the
        rows-weighted mean of the ranks' numbers: exact for the loss, an estimate elsewhere."""
        record = self._record_of(model)
        share = self.weight / total
        nodes = model.graph.nodes
        index = {name: row for row, name in enumerate(nodes)}
        table = record.table if record is not None else np.full((len(index), len(FIELDS)), np.nan)
        edges = self.comm.broadcast_object(sorted(record.edges) if record is not None else None)
        edge_values = np.array([record.edges[key] if record is not None else (0.0, 0.0)
                                for key in edges]).reshape(-1, 2)
        measured = ~np.isnan(table)
        values = np.where(measured, table, 0.0)
        batched = np.array([bool(nodes[n].shape) and nodes[n].shape[0] is None for n in index])
        # rms^2 = norm^2 / size, and a batched node's size is proportional to its rows
        square_weight = np.where(batched, share ** 2, share)
        rms_weight = np.where(batched, share ** 3, share)
        loss = record.loss if record is not None and record.loss is not None else 0.0
        sums = np.concatenate([square_weight * values[:, _NORM] ** 2, rms_weight * values[:, _RMS] ** 2,
                               share * values[:, _SATURATION],
                               measured[:, [_RMS, _DEAD, _SATURATION]].T.ravel().astype(np.float64),
                               (share * edge_values ** 2).ravel(), [share * loss]])
        # the largest of minus the dead fractions is the smallest; a rank without rows has none
        maxima = np.concatenate([np.where(batched, share, 1.0) * values[:, _MAX],
                                 np.where(measured[:, _DEAD], -values[:, _DEAD], -np.inf)])
        self.comm.allreduce(sums, self.backend)
        self.comm.allreduce(maxima, self.backend, op="max")
        if record is None:
            return
        n = len(index)
        norm2, rms2, saturation, seen_grad, seen_dead, seen_saturation, edge2 = np.split(
            sums[:-1], np.cumsum([n, n, n, n, n, n]))
        seen_grad, seen_dead, seen_saturation = seen_grad > 0, seen_dead > 0, seen_saturation > 0
        for column, value, where in ((_NORM, np.sqrt(norm2), seen_grad), (_RMS, np.sqrt(rms2), seen_grad),
                                     (_MAX, maxima[:n], seen_grad), (_DEAD, -maxima[n:], seen_dead),
                                     (_SATURATION, saturation, seen_saturation)):
            record.table[where, column] = value[where]
        if record.loss is not None:
            record.loss = float(sums[-1])
        for key, (rms, norm) in zip(edges, np.sqrt(edge2).reshape(-1, 2)):
            record.edges[key] = (float(rms), float(norm))
        for name, grad in averaged.items():
            row = index[name]
            if seen_grad[row]:
                host = self.backend.to_numpy(grad).astype(np.float64)
                square = float(np.vdot(host, host))
                record.table[row, [_RMS, _NORM, _MAX]] = (np.sqrt(square / max(host.size, 1)),
                                                          np.sqrt(square), np.abs(host).max())
        self._reduced_record = record
