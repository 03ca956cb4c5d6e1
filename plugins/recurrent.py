"""Recurrent layers: rnn (Elman, tanh or relu), lstm, gru, and a bidirectional wrapper.

Input is (batch, time, features). One operator runs a whole layer over the sequence, and its
backward runs back through time over all of it. The work is arranged for few, large array
operations on contiguous memory:

- inside the operator everything is *feature-major*: a step's hidden state is (units, batch) and
  its gate pre-activations (gates*units, batch), so each gate is a contiguous block of rows and
  every elementwise operation runs over contiguous memory (a column slice of a (batch,
  gates*units) array would be strided, and costs 2-3x per operation);
- the input projection of every step, ``x_t W + b``, is one matrix product before the loop, the
  bias folded in as a row of ones (so its gradient comes out of the weight gradient's product);
- each step is one matrix product ``U^T h`` for all gates at once;
- sigmoid gates are computed as ``(1 + tanh(z / 2)) / 2``: the halving is folded into the
  kernels once per call (``scales``), so an LSTM step runs one tanh over all four gate blocks;
  NumPy's float32 tanh is vectorized, and one such pass costs less than the exp, the add and the
  reciprocal of ``1 / (1 + exp(-z))``;
- large arrays are few, and reused within a call: an LSTM's activations overwrite its
  projection, and its backward turns them, in place, into the factors each step multiplies its
  gradients by; what the step loop no longer needs is dropped before the weight gradients' buffers
  are made. Fresh memory is faulted in page by page, which costs as much as the arithmetic on it,
  and a small peak keeps the allocator from handing pages back to the system after each step;
- the weight gradients are matrix products over all steps after the loop, a chunk of steps at a
  time (``CHUNK``), so that the transposed copy of the per-step gradients they need is a small
  buffer, reused, which stays in the cache;
- without an initial state, h_0 = 0 drops out of ``U``'s gradient (and of an LSTM's first
  step), and backward carries no gradient past the first step unless an initial state wants it.

``reverse=True`` runs from the last step to the first (the backward half of a bidirectional
layer); its output is still in the input's time order.

Variable-length sequences: an optional bool mask (batch, time), True on the steps that hold
data, makes a padded step *hold* the state (``h_t = h_{t-1}``, and ``c_t = c_{t-1}``) and output
zeros, as PyTorch's packed sequences do. So the state after the last step is the state after
each sequence's last valid step, and a reversed pass starts at each sequence's last valid step
(what a bidirectional layer needs). The same step loops run it: after each step the forward
puts the held states back where the mask is False, and the backward sees a padded step as one
whose gates pass the state through unchanged, its gradient with them (the cells' precomputed
derivatives are zeroed on those steps, so the step's input and weights get no gradient).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

import graphengine as ge
from graphengine.errors import GraphBuildError, ShapeError, require_int
from graphengine.ir.operators import TensorSpec, require_float, same_dtype

#: Elements of the per-step values that the steps' bulk work (the weight gradients, an LSTM's
#: backward factors) takes a chunk at a time: its buffers are small, and stay in a core's cache.
CHUNK = 131072


def _sigmoid_of_tanh(tanh_half: Any) -> None:
    """In place: ``tanh_half`` holds ``tanh(z / 2)`` and becomes ``sigmoid(z)``."""
    tanh_half *= 0.5
    tanh_half += 0.5


class Recurrent(ge.Operator):
    """Runs a recurrent cell over the time axis.

    Inputs: ``x`` (batch, time, features), ``W`` (features, gates*units), ``U`` (units,
    gates*units), ``b`` (gates*units,), the cell's ``extra_params`` (each (units,)), then
    optionally the initial states (each (batch, units)), then, when ``masked``, the bool mask
    (batch, time) of the valid steps. Output: (batch, time, units) with ``return_sequences``
    (zeros on padded steps), else the state after the last step (batch, units).

    Keeps on its context what backward reads, feature-major: the inputs with their ones row, the
    hidden states, the cell's activations; not the input arrays themselves.
    """

    #: Blocks of ``units`` columns in ``W``, ``U`` and ``b``.
    gates: ClassVar[int]
    #: For each block: the factor folded into its kernels, so that ``run`` receives the block's
    #: pre-activations multiplied by it (1/2 for a sigmoid gate: see the module docstring).
    scales: ClassVar[tuple[float, ...]]
    #: State names; ``h`` is the output, an LSTM also carries ``c``.
    states: ClassVar[tuple[str, ...]] = ("h",)
    extra_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, return_sequences: bool = False, reverse: bool = False, masked: bool = False) -> None:
        self.return_sequences = bool(return_sequences)
        self.reverse = bool(reverse)
        self.masked = bool(masked)

    def config(self) -> dict[str, Any]:
        return {"return_sequences": self.return_sequences, "reverse": self.reverse, "masked": self.masked}

    def split_inputs(self, rest: tuple) -> tuple[tuple, tuple, Any]:
        """The inputs after ``x, W, U, b`` as (extra parameters, initial states, mask or None)."""
        extras, rest = rest[:len(self.extra_params)], rest[len(self.extra_params):]
        if self.masked and rest:
            return extras, rest[:-1], rest[-1]
        return extras, rest, None

    def infer(self, x: TensorSpec, w: TensorSpec, u: TensorSpec, b: TensorSpec,
              *rest: TensorSpec) -> TensorSpec:
        require_float(x)
        extras, initial, mask = self.split_inputs(rest)
        dtype = same_dtype(x, w, u, b, *extras, *initial)
        if x.ndim != 3 or x.shape[2] is None:
            raise ShapeError(f"{self.kind} takes (batch, time, features) with known features, "
                             f"got {x.shape}")
        if x.shape[1] == 0:
            raise ShapeError(f"{self.kind} needs at least one time step, got {x.shape}")
        if u.ndim != 2:
            raise ShapeError(f"the recurrent kernel must be (units, {self.gates}*units), got {u.shape}")
        units = u.shape[0]
        width = self.gates * units
        expected = {"W": (w, (x.shape[2], width)), "U": (u, (units, width)), "b": (b, (width,))}
        if (len(extras) != len(self.extra_params) or len(initial) not in (0, len(self.states))
                or self.masked and mask is None):
            raise ShapeError(f"{self.kind} takes x, W, U, b{''.join(', ' + p for p in self.extra_params)}, "
                             f"optionally the initial {', '.join(self.states)}"
                             f"{', then the mask' if self.masked else ''}; got {4 + len(rest)} inputs")
        if mask is not None:
            check_sequence_mask(mask, x.shape, self.kind)
        expected.update({p: (s, (units,)) for p, s in zip(self.extra_params, extras)})
        for name, (spec, shape) in expected.items():
            if spec.shape != shape:
                raise ShapeError(f"{name} must be {shape} for {x.shape[2]} features and {units} "
                                 f"units, got {spec.shape}")
        for name, spec in zip(self.states, initial):
            if spec.ndim != 2 or spec.shape[1] != units:
                raise ShapeError(f"the initial {name} must be (batch, {units}), got {spec.shape}")
        if self.return_sequences:
            return TensorSpec((x.shape[0], x.shape[1], units), dtype)
        return TensorSpec((x.shape[0], units), dtype)

    # -- shared: layout, projection, outputs, weight gradients -------------------------------

    def _time_major(self, sequence: Any) -> Any:
        """(batch, time, n) -> a (time, n, batch) view, in the order the cell visits the steps."""
        view = sequence.transpose(1, 2, 0)
        return view[::-1] if self.reverse else view

    def forward(self, ctx, xp, x, w, u, b, *rest):
        extras, initial, mask = self.split_inputs(rest)
        # (time, 1, batch) in visiting order: broadcasts against a step's (units, batch) state
        ctx.valid = None if mask is None else self._time_major(mask[:, :, None])
        batch, steps, features = x.shape
        units = u.shape[0]
        # (features + 1, time, batch): backward contracts it over (time, batch).
        inputs = xp.empty((features + 1, steps, batch), dtype=x.dtype)
        inputs[:features] = self._time_major(x).transpose(1, 0, 2)
        inputs[features] = 1
        scale = xp.repeat(xp.asarray(self.scales, dtype=x.dtype), units)[:, None]
        kernel = xp.concatenate([w, b[None]]).T * scale
        projection = xp.matmul(kernel, inputs.transpose(1, 0, 2))  # (time, gates*units, batch)
        hidden = xp.empty((steps + 1, units, batch), dtype=x.dtype)
        hidden[0] = initial[0].T if initial else 0
        u_t = (u * scale.T).T  # BLAS reads the transposed view as it is, without a copy
        ctx.inputs, ctx.hidden, ctx.w, ctx.u, ctx.initial_states = (
            inputs, hidden, w, u, len(initial))
        self.run(ctx, xp, projection, hidden, u_t, extras, tuple(s.T for s in initial[1:]))
        if not self.return_sequences:
            return xp.ascontiguousarray(hidden[steps].T)
        outputs = hidden[:0:-1] if self.reverse else hidden[1:]
        outputs = xp.ascontiguousarray(outputs.transpose(2, 0, 1))
        if mask is not None:
            outputs *= mask[:, :, None]
        return outputs

    def backward(self, ctx, xp, inputs, output, grad):
        units, batch = ctx.hidden.shape[1:]
        if self.return_sequences:
            grad_outputs = xp.ascontiguousarray(self._time_major(grad))
            if ctx.valid is not None:  # padded steps output zeros: no gradient comes back
                grad_outputs *= ctx.valid
            grad_last = xp.zeros((units, batch), dtype=grad.dtype)
        else:
            grad_outputs, grad_last = None, grad.T.copy()  # the cells may add into it
        grad_projection, grad_recurrent, grad_extras, grad_states = self.run_backward(
            ctx, xp, ctx.u, grad_last, grad_outputs)
        grad_wb, grad_u, grad_x = self.sums_over_steps(ctx, xp, grad_projection, grad_recurrent)
        if grad_x is not None:
            grad_x = xp.ascontiguousarray(  # (features, time, batch) -> (batch, time, features)
                (grad_x[:, ::-1] if self.reverse else grad_x).transpose(2, 1, 0))
        to_initial = self.carries_to_initial(ctx)
        grads = (grad_x, grad_wb[:-1], grad_u, grad_wb[-1], *grad_extras)
        grads += tuple(xp.ascontiguousarray(s.T) if to_initial else None
                       for s in grad_states[:ctx.initial_states])
        return grads + (None,) * self.masked

    def sums_over_steps(self, ctx, xp, grad_projection, grad_recurrent) -> tuple:
        """The gradients of ``[W; b]`` and ``U``, and of the input (features, time, batch) in
        visiting order where wanted (else None), from those of the projection and of ``U^T h``.

        Each is a matrix product over (n, steps * batch) matrices, which takes a transposed copy
        of the per-step gradients; a chunk of steps at a time, that copy is a small buffer,
        reused, which stays in the processor's cache. The (gates*units, n) products, transposed
        after, are the faster ones for BLAS."""
        steps, width, batch = grad_projection.shape
        inputs, hidden = ctx.inputs, ctx.hidden
        chunk = _chunk_steps(steps, width, batch)
        columns = xp.empty((width, chunk, batch), dtype=grad_projection.dtype)
        recurrent_columns = columns if grad_recurrent is grad_projection else xp.empty_like(columns)
        hidden_columns = xp.empty((hidden.shape[1], chunk, batch), dtype=hidden.dtype)
        grad_x = (xp.empty((ctx.w.shape[0], steps, batch), dtype=grad_projection.dtype)
                  if ctx.grad_wanted(0) else None)
        grad_wb = grad_u = None
        for start in range(0, steps, chunk):
            stop = min(start + chunk, steps)
            n = stop - start
            projection = _as_columns(grad_projection[start:stop], columns[:, :n])
            recurrent = (projection if recurrent_columns is columns
                         else _as_columns(grad_recurrent[start:stop], recurrent_columns[:, :n]))
            wb = projection @ inputs[:, start:stop].reshape(inputs.shape[0], -1).T
            # Without an initial state, h_0 = 0 adds nothing: the product skips its columns.
            skip = batch if start == 0 and not ctx.initial_states else 0
            u = recurrent[:, skip:] @ _as_columns(hidden[start:stop], hidden_columns[:, :n])[:, skip:].T
            if grad_wb is None:
                grad_wb, grad_u = wb, u
            else:
                grad_wb += wb
                grad_u += u
            if grad_x is not None:
                grad_x[:, start:stop] = (ctx.w @ projection).reshape(-1, n, batch)
        return grad_wb.T, grad_u.T, grad_x

    def carries_to_initial(self, ctx: Any) -> bool:
        """Whether backward carries the gradient back past the first step: only the initial
        states given as inputs, where their gradients are wanted, receive it."""
        first = 4 + len(self.extra_params)
        return any(ctx.grad_wanted(first + n) for n in range(ctx.initial_states))

    @staticmethod
    def step_grad(carry: Any, grad_outputs: Any, k: int) -> Any:
        """Gradient reaching the hidden state of step ``k``: from the next step, and from the
        output at ``k`` when the whole sequence is returned."""
        return carry if grad_outputs is None else carry + grad_outputs[k]

    @staticmethod
    def hold_padded(ctx: Any, xp: Any, k: int, *states: Any) -> None:
        """After step ``k``: where the step is padded, each state (time + 1, units, batch)
        keeps its value from before the step."""
        if ctx.valid is not None:
            for state in states:
                state[k + 1] = xp.where(ctx.valid[k], state[k + 1], state[k])

    @staticmethod
    def padded_steps(ctx: Any, *per_step: Any) -> Any | None:
        """Zero the per-step derivatives ``per_step`` (time, n, batch) on padded steps, in place,
        so that nothing flows through the cell there; returns where the steps are padded, (time,
        1, batch) bool, or None without a mask."""
        if ctx.valid is None:
            return None
        for values in per_step:
            values *= ctx.valid
        return ~ctx.valid

    # -- the cell: subclasses ----------------------------------------------------------------

    def run(self, ctx: Any, xp: Any, projection: Any, hidden: Any, u_t: Any, extras: tuple,
            initial: tuple) -> None:
        """Fill ``hidden[1:]`` from ``hidden[0]``, each (units, batch), and the per-step input
        ``projection`` (time, gates*units, batch), which is the run's to overwrite. ``u_t`` is
        ``U`` transposed; both are multiplied by ``scales``, block by block."""
        raise NotImplementedError

    def run_backward(self, ctx: Any, xp: Any, u: Any, grad_last: Any, grad_outputs: Any | None) -> tuple:
        """Back through time. Returns the gradients of the projection and of ``U^T h`` (each
        (time, gates*units, batch)), of the extra parameters, and of the initial states (each
        (units, batch)). May overwrite what the forward kept on ``ctx``: a tape is
        back-propagated once."""
        raise NotImplementedError


def _chunk_steps(steps: int, width: int, batch: int) -> int:
    """Steps in a chunk of (time, width, batch) per-step values: CHUNK elements' worth."""
    return min(steps, max(1, CHUNK // (width * batch)))


def _as_columns(per_step: Any, buffer: Any) -> Any:
    """(time, n, batch) copied into ``buffer`` (n, time, batch): an (n, time * batch) matrix."""
    buffer[...] = per_step.transpose(1, 0, 2)
    return buffer.reshape(buffer.shape[0], -1)


class SimpleRNN(Recurrent):
    """Elman: ``h_t = f(x_t W + h_{t-1} U + b)``, ``f`` tanh or relu (``activation``)."""

    kind = "rnn"
    gates = 1
    scales = (1.0,)
    ACTIVATIONS: ClassVar[tuple[str, ...]] = ("tanh", "relu")

    def __init__(self, return_sequences: bool = False, reverse: bool = False, masked: bool = False,
                 activation: str = "tanh") -> None:
        super().__init__(return_sequences, reverse, masked)
        self.activation = self.checked_activation(activation)

    @classmethod
    def checked_activation(cls, activation: str) -> str:
        if activation not in cls.ACTIVATIONS:
            raise GraphBuildError(f"rnn activation must be one of {', '.join(cls.ACTIVATIONS)}, "
                                  f"got {activation!r}")
        return activation

    def config(self) -> dict[str, Any]:
        return {**super().config(), "activation": self.activation}

    def run(self, ctx, xp, projection, hidden, u_t, extras, initial):
        for k in range(projection.shape[0]):
            z = xp.matmul(u_t, hidden[k], out=hidden[k + 1])
            z += projection[k]
            if self.activation == "tanh":
                xp.tanh(z, out=z)
            else:
                xp.maximum(z, 0, out=z)
            self.hold_padded(ctx, xp, k, hidden)

    def run_backward(self, ctx, xp, u, grad_last, grad_outputs):
        outputs = ctx.hidden[1:]  # both derivatives are functions of the output
        derivative = 1 - outputs ** 2 if self.activation == "tanh" else (outputs > 0).astype(outputs.dtype)
        padded = self.padded_steps(ctx, derivative)
        grad_z = xp.empty_like(derivative)
        carry, to_initial = grad_last, self.carries_to_initial(ctx)
        for k in range(derivative.shape[0] - 1, -1, -1):
            dh = self.step_grad(carry, grad_outputs, k)
            xp.multiply(dh, derivative[k], out=grad_z[k])
            if k == 0 and not to_initial:
                break
            carry = u @ grad_z[k]
            if padded is not None:  # a held state passes its gradient on unchanged
                carry += dh * padded[k]
        return grad_z, grad_z, (), (carry,)


class LSTM(Recurrent):
    """Long short-term memory. Gate blocks in order input, forget, output (sigmoids) and
    candidate (tanh):

    ``c_t = f * c_{t-1} + i * g``, ``h_t = o * tanh(c_t)``.
    """

    kind = "lstm"
    gates = 4
    scales = (0.5, 0.5, 0.5, 1.0)  # three sigmoid gates, then the tanh candidate
    states = ("h", "c")

    def run(self, ctx, xp, projection, hidden, u_t, extras, initial):
        steps, width, batch = projection.shape
        units = width // 4
        sig = 3 * units
        ctx.acts = acts = projection  # each step's activations replace its projection
        ctx.cells = cells = xp.empty((steps + 1, units, batch), dtype=projection.dtype)
        ctx.tanh_cells = tanh_cells = xp.empty((steps, units, batch), dtype=projection.dtype)
        recurrent = xp.empty((width, batch), dtype=projection.dtype)
        kept = xp.empty((units, batch), dtype=projection.dtype)
        cells[0] = initial[0] if initial else 0
        sigmoids = acts[:, :sig]
        i, f, o, g = (acts[:, n * units:(n + 1) * units] for n in range(4))
        for k in range(steps):
            a = acts[k]
            if k or ctx.initial_states:  # else h_0 = 0, and so is its product
                a += xp.matmul(u_t, hidden[k], out=recurrent)
            xp.tanh(a, out=a)
            _sigmoid_of_tanh(sigmoids[k])
            c = xp.multiply(f[k], cells[k], out=cells[k + 1])
            c += xp.multiply(i[k], g[k], out=kept)
            xp.tanh(c, out=tanh_cells[k])
            xp.multiply(o[k], tanh_cells[k], out=hidden[k + 1])
            self.hold_padded(ctx, xp, k, hidden, cells)

    def run_backward(self, ctx, xp, u, grad_last, grad_outputs):
        acts, cells, tanh_cells = ctx.acts, ctx.cells, ctx.tanh_cells
        del ctx.cells, ctx.tanh_cells  # gone with the loop, before the weight gradients' buffers
        steps, width, batch = acts.shape
        units = width // 4
        # Each step's gradient is dh and dc times factors known from the forward:
        # dz_i = dc g i(1-i), dz_f = dc c_{t-1} f(1-f), dz_o = dh tanh(c) o(1-o),
        # dz_g = dc i (1-g^2), and dh adds dh o (1-tanh(c)^2) to dc. They are computed before
        # the loop, into the forward's buffers (the activations become the factors, tanh(c) the
        # last one, c_{t-1} the forget gate), so the loop multiplies in place and allocates
        # nothing; a chunk of steps at a time, so that the products' buffer is small.
        i, f, o, g = (acts[:, n * units:(n + 1) * units] for n in range(4))
        through, forget = tanh_cells, cells[:steps]
        chunk = _chunk_steps(steps, width, batch)
        product = xp.empty((chunk, units, batch), dtype=acts.dtype)
        for start in range(0, steps, chunk):
            part = slice(start, min(start + chunk, steps))
            _lstm_factors(xp, i[part], f[part], o[part], g[part], through[part], forget[part],
                          product[:part.stop - start])
        padded = self.padded_steps(ctx, acts, through)
        if padded is not None:  # c_{t-1} reaches c_t whole on a padded step
            forget *= ctx.valid
            forget += padded
        carry, grad_c = grad_last, xp.zeros((units, batch), dtype=acts.dtype)
        through_h = xp.empty_like(grad_c)
        to_initial = self.carries_to_initial(ctx)
        for k in range(steps - 1, -1, -1):  # i, f, o, g: the gates' factors, then gradients
            dh = self.step_grad(carry, grad_outputs, k)
            o[k] *= dh
            grad_c += xp.multiply(dh, through[k], out=through_h)
            i[k] *= grad_c
            f[k] *= grad_c
            g[k] *= grad_c
            if k == 0 and not to_initial:
                break
            grad_c *= forget[k]
            carry = u @ acts[k]
            if padded is not None:  # a held state passes its gradient on unchanged
                carry += dh * padded[k]
        return acts, acts, (), (carry, grad_c)


def _lstm_factors(xp: Any, i: Any, f: Any, o: Any, g: Any, tanh_cells: Any, cells: Any,
                  product: Any) -> None:
    """In place, over (steps, units, batch) arrays, each value read before it is overwritten:
    the gates become the factors of LSTM.run_backward, ``tanh_cells`` the factor of dh in dc,
    ``cells`` (c_{t-1}) the forget gate. ``product`` is scratch."""
    xp.multiply(o, tanh_cells, out=product)
    xp.multiply(product, tanh_cells, out=tanh_cells)
    xp.subtract(o, tanh_cells, out=tanh_cells)  # o - o tanh(c)^2
    xp.multiply(product, o, out=o)
    xp.subtract(product, o, out=o)  # o tanh(c) - o^2 tanh(c)
    xp.multiply(cells, f, out=product)  # c_{t-1} f
    cells[...] = f
    xp.multiply(product, f, out=f)
    xp.subtract(product, f, out=f)  # c_{t-1} f - c_{t-1} f^2
    xp.multiply(g, i, out=product)
    xp.multiply(product, g, out=g)
    xp.subtract(i, g, out=g)  # i - i g^2
    xp.multiply(product, i, out=i)
    xp.subtract(product, i, out=i)  # g i - g i^2


class GRU(Recurrent):
    """Gated recurrent unit with the reset gate applied after the recurrent product (as cuDNN
    and PyTorch do), so one product ``h @ U`` per step serves all three blocks:

    ``r, z = sigmoid(...)``, ``n = tanh(x W_n + b_n + r * (h U_n + bh))``,
    ``h_t = (1 - z) * n + z * h_{t-1}``. Extra parameter ``bh`` (units,).
    """

    kind = "gru"
    gates = 3
    scales = (0.5, 0.5, 1.0)  # two sigmoids; the candidate's tanh takes r * (h U_n + bh)
    extra_params = ("bh",)

    def run(self, ctx, xp, projection, hidden, u_t, extras, initial):
        steps, width, batch = projection.shape
        units = width // 3
        bh = extras[0][:, None]
        ctx.gate_values = gates = xp.empty((steps, 2 * units, batch), dtype=projection.dtype)
        ctx.candidates = candidates = xp.empty((steps, units, batch), dtype=projection.dtype)
        ctx.hidden_n = hidden_n = xp.empty((steps, units, batch), dtype=projection.dtype)
        hu = xp.empty((width, batch), dtype=projection.dtype)
        for k in range(steps):
            xp.matmul(u_t, hidden[k], out=hu)
            rz = xp.add(projection[k][:2 * units], hu[:2 * units], out=gates[k])
            _sigmoid_of_tanh(xp.tanh(rz, out=rz))
            xp.add(hu[2 * units:], bh, out=hidden_n[k])
            n = xp.multiply(rz[:units], hidden_n[k], out=candidates[k])
            n += projection[k][2 * units:]
            xp.tanh(n, out=n)
            h = xp.subtract(hidden[k], n, out=hidden[k + 1])
            h *= rz[units:]
            h += n
            self.hold_padded(ctx, xp, k, hidden)

    def run_backward(self, ctx, xp, u, grad_last, grad_outputs):
        gates, candidates, hidden_n, hidden = ctx.gate_values, ctx.candidates, ctx.hidden_n, ctx.hidden
        steps, units, batch = candidates.shape
        r, z, n = (slice(m * units, (m + 1) * units) for m in range(3))
        # What the steps need of the forward values, for all steps at once.
        derivative = gates * (1 - gates)
        through_z = hidden[:steps] - candidates
        through_n = 1 - candidates ** 2
        through_n *= 1 - gates[:, z]
        padded = self.padded_steps(ctx, through_z, through_n)
        # What of h_{t-1} reaches h_t directly: the update gate, all of it on a padded step.
        kept = gates[:, z] if padded is None else xp.where(padded, 1, gates[:, z])
        grad_projection = xp.empty((steps, 3 * units, batch), dtype=gates.dtype)
        grad_recurrent = xp.empty_like(grad_projection)
        carry, to_initial = grad_last, self.carries_to_initial(ctx)
        for k in range(steps - 1, -1, -1):
            dh = self.step_grad(carry, grad_outputs, k)
            rz, dp, dr = gates[k], grad_projection[k], grad_recurrent[k]
            xp.multiply(dh, through_z[k], out=dp[z])
            xp.multiply(dh, through_n[k], out=dp[n])
            xp.multiply(dp[n], hidden_n[k], out=dp[r])
            dp[:2 * units] *= derivative[k]
            dr[:2 * units] = dp[:2 * units]
            xp.multiply(dp[n], rz[r], out=dr[n])
            if k == 0 and not to_initial:
                break
            carry = dh * kept[k]
            carry += u @ dr
        grad_bh = grad_recurrent[:, n].sum(axis=(0, 2))
        return grad_projection, grad_recurrent, (grad_bh,), (carry,)


# --------------------------------------------------------------------------- layers

def _stack(g, x, num_layers: int, return_sequences: bool,
           build_one: Callable[[Any, bool], Any]) -> Any:
    """``num_layers`` layers, each feeding its whole sequence to the next (a deep RNN); only the
    last returns what was asked for. Layer ``i`` of a stack builds inside name scope ``layer{i}``."""
    h = x
    for i in range(num_layers):
        last = i == num_layers - 1
        scope = g.name_scope(f"layer{i}") if num_layers > 1 else contextlib.nullcontext()
        with scope:
            h = build_one(h, return_sequences or not last)
    return h


def _check_sequence(x, kind: str) -> None:
    if x.ndim != 3 or x.shape[2] is None:
        raise ShapeError(f"{kind} takes (batch, time, features) with known features, got {x.shape} "
                         f"from {x.name!r}")


def check_sequence_mask(mask: TensorSpec, sequence: tuple, kind: str) -> None:
    """Raise ShapeError unless ``mask`` is a bool (batch, time) mask for a (batch, time,
    features) ``sequence``."""
    if mask.dtype != "bool" or mask.shape != tuple(sequence[:2]):
        raise ShapeError(f"{kind}: the mask must be bool (batch, time) = {tuple(sequence[:2])}, True "
                         f"on the valid steps, for the sequence {tuple(sequence)}; got {mask}")


def _split_mask(kind: str, x, inputs: tuple) -> tuple[tuple, Any]:
    """The inputs after ``x`` as (initial states, mask or None): a bool input, last, is the mask."""
    if inputs and inputs[-1].dtype == "bool":
        check_sequence_mask(inputs[-1].node.spec, x.shape, f"{kind} on {x.name!r}")
        return inputs[:-1], inputs[-1]
    return inputs, None


class RecurrentLayer(ge.Layer):
    """``rnn`` / ``lstm`` / ``gru(units, return_sequences=False, num_layers=1, reverse=False)``.

    Input (batch, time, features); output (batch, time, units) with ``return_sequences``, else
    the last step's (batch, units). ``num_layers`` stacks layers (scopes ``layer0``, ...).
    Optional inputs after ``x``: the initial state(s), (batch, units) each (LSTM: h then c),
    then a bool mask (batch, time), True on valid steps, for sequences of different lengths
    (``g.layer("lstm", x, mask, units=8)``): padded steps hold the state and output zeros, so
    the last step's state is each sequence's last valid one (PyTorch's packed sequences).
    Parameters ``W`` (features, gates*units), ``U`` (units, gates*units), ``b``.
    """

    operator: ClassVar[type[Recurrent]]
    bias_init: ClassVar[str] = "zeros"

    def __init__(self, units: int, return_sequences: bool = False, num_layers: int = 1,
                 reverse: bool = False, init: str | dict = "xavier",
                 recurrent_init: str | dict = "orthogonal", bias_init: str | dict | None = None) -> None:
        super().__init__(units=units, return_sequences=return_sequences, num_layers=num_layers,
                         reverse=reverse, init=init, recurrent_init=recurrent_init, bias_init=bias_init)
        self.units = require_int(units, "units")
        self.num_layers = require_int(num_layers, "num_layers")
        self.return_sequences, self.reverse = return_sequences, reverse
        self.init, self.recurrent_init = init, recurrent_init
        self.bias = bias_init or self.bias_init

    def operator_options(self) -> dict[str, Any]:
        """Options of the operator beyond those every recurrent operator takes."""
        return {}

    def build(self, g, x, *inputs):
        kind = self.operator.kind
        _check_sequence(x, kind)
        initial, mask = _split_mask(kind, x, inputs)
        if initial and self.num_layers > 1:
            raise GraphBuildError(f"{kind}: an initial state goes with num_layers=1; stack "
                                  f"single layers to give each its own")
        if initial and len(initial) != len(self.operator.states):
            raise GraphBuildError(f"{kind} takes the initial {' and '.join(self.operator.states)} "
                                  f"after x, got {len(initial)} extra input(s)")

        def build_one(h, return_sequences):
            width = self.operator.gates * self.units
            params = [g.parameter("W", (h.shape[-1], width), init=self.init, dtype=h.dtype),
                      g.parameter("U", (self.units, width), init=self.recurrent_init, dtype=h.dtype),
                      g.parameter("b", (width,), init=self.bias, dtype=h.dtype)]
            params += [g.parameter(p, (self.units,), init="zeros", dtype=h.dtype)
                       for p in self.operator.extra_params]
            op = self.operator(return_sequences, self.reverse, mask is not None, **self.operator_options())
            return g.apply(op, h, *params, *initial, *([mask] if mask is not None else []))

        return _stack(g, x, self.num_layers, self.return_sequences, build_one)


class RNNLayer(RecurrentLayer):
    """``rnn(units, activation="tanh", ...)``: the Elman layer, ``activation`` "tanh" or "relu"."""

    operator = SimpleRNN

    def __init__(self, units: int, activation: str = "tanh", **options: Any) -> None:
        super().__init__(units, **options)
        self._config["activation"] = self.activation = SimpleRNN.checked_activation(activation)

    def operator_options(self) -> dict[str, Any]:
        return {"activation": self.activation}


class LSTMLayer(RecurrentLayer):
    operator = LSTM
    bias_init = "forget_bias"


class GRULayer(RecurrentLayer):
    operator = GRU


class Bidirectional(ge.Layer):
    """``bidirectional(layer="lstm", units=..., merge="concat", num_layers=1, ...)``: the layer
    run forwards and backwards over time, outputs joined along features ("concat", 2*units) or
    added ("sum"). With ``return_sequences`` every step sees the whole sequence, before and after
    it; without, the result joins the forward pass's last state with the backward pass's state
    after reading back to the first step. Stacked layers each read both directions of the
    previous one. Other arguments go to each direction's layer (scopes ``forward``/``backward``).
    An optional bool mask (batch, time) after ``x`` goes to both directions: the backward one
    then starts at each sequence's last valid step.
    """

    def __init__(self, layer: str = "lstm", merge: str = "concat", num_layers: int = 1,
                 return_sequences: bool = False, **config: Any) -> None:
        super().__init__(layer=layer, merge=merge, num_layers=num_layers,
                         return_sequences=return_sequences, **config)
        if merge not in ("concat", "sum"):
            raise GraphBuildError(f"merge must be 'concat' or 'sum', got {merge!r}")
        if "reverse" in config:
            raise GraphBuildError("bidirectional sets reverse itself, once per direction")
        self.layer, self.merge, self.config_ = layer, merge, config
        self.num_layers = require_int(num_layers, "num_layers")
        self.return_sequences = return_sequences

    def build(self, g, x, *inputs):
        _check_sequence(x, "bidirectional")
        initial, mask = _split_mask("bidirectional", x, inputs)
        if initial:
            raise GraphBuildError("bidirectional takes no initial state; build the two "
                                  "directions by hand with reverse=True to give them one")
        masks = [mask] if mask is not None else []

        def build_one(h, return_sequences):
            forward, backward = (
                g.layer(self.layer, h, *masks, name=direction, return_sequences=return_sequences,
                        reverse=direction == "backward", **self.config_)
                for direction in ("forward", "backward"))
            return ge.concat([forward, backward], axis=-1) if self.merge == "concat" else forward + backward

        return _stack(g, x, self.num_layers, self.return_sequences, build_one)


# --------------------------------------------------------------------------- initializers

class Orthogonal(ge.Initializer):
    """A (semi-)orthogonal matrix times ``gain`` (Saxe et al. 2014): repeated products with it
    neither grow nor shrink a vector, which keeps recurrent gradients alive over long sequences.
    A (units, gates*units) recurrent kernel gets orthonormal rows."""

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = gain

    def __call__(self, rng, shape, fan_in, fan_out):
        rows = shape[0]
        cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
        q *= np.sign(np.diag(r))  # a uniform draw over orthogonal matrices, not QR's bias
        matrix = q if rows >= cols else q.T
        return self.gain * matrix.reshape(shape)


class ForgetBias(ge.Initializer):
    """An LSTM bias (4*units,): zeros, but ``value`` on the forget gate (the second block), so the
    cell remembers by default when training starts: 1 (Jozefowicz et al. 2015) keeps
    sigmoid(1) = 73% of the cell per step; tasks that must remember across many steps start
    better with more (3: 95% per step)."""

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def __call__(self, rng, shape, fan_in, fan_out):
        if len(shape) != 1 or shape[0] % 4:
            raise GraphBuildError(f"forget_bias is for an LSTM bias (4*units,), got {shape}")
        bias = np.zeros(shape)
        units = shape[0] // 4
        bias[units:2 * units] = self.value
        return bias


@ge.hookimpl
def graphengine_register_layers(register):
    register("rnn", RNNLayer, aliases=("simple_rnn", "elman"))
    register("lstm", LSTMLayer)
    register("gru", GRULayer)
    register("bidirectional", Bidirectional)


@ge.hookimpl
def graphengine_register_initializers(register):
    register("orthogonal", Orthogonal)
    register("forget_bias", ForgetBias, aliases=("unit_forget_bias",))
