"""Parameters packed into one contiguous buffer per dtype, so that an elementwise optimizer
updates all of them with one call.

An optimizer whose ``update`` treats every element alike (``Optimizer.elementwise``: SGD,
momentum, Adam, ...) computes the same numbers on one flat array as on each parameter in turn.
The deep narrow MLP has 42 parameters: one update over the flat buffer replaces ~170 small NumPy
calls per step with a handful of large ones. Each parameter is a view into the buffer, so
``model.parameters()`` still hands out the model's own arrays, and each parameter's optimizer
state is a view into the group's flat state, so checkpoints see per-parameter state as before.

Whatever breaks the layout is detected before an update, which then goes parameter by
parameter: a parameter array replaced, a frozen member, a missing gradient. Per-parameter state
that changed behind the group's back (loaded from a checkpoint, or updated one parameter at a
time while observers watched) is gathered back into the flat state first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from operator import is_
from typing import Any

from ..compiler.fusion import FusedDense

#: Elements per optimizer call. An update over a large flat array makes temporaries of the
#: same size, each fresh memory to fault in; in chunks of 256 KiB (float32) they come from the
#: allocator's cache and stay in the processor's.
CHUNK = 65536


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


class FlatGroup:
    """Trainable parameters of one dtype laid end to end in ``self.param``.

    A group of small parameters also owns a flat gradient buffer that fused steps write into. A
    large parameter is a group of its own without one: its gradient is allocated late in
    backward and freed after the update, as it would be without the group, which keeps the
    step's peak memory down; it is still updated in chunks.
    """

    def __init__(self, xp: Any, names: list[str], params: dict[str, Any], own_grad: bool) -> None:
        self.names = names
        self.shapes = {n: tuple(params[n].shape) for n in names}
        self.bounds: dict[str, tuple[int, int]] = {}
        start = 0
        for name in names:
            self.bounds[name] = (start, start + params[name].size)
            start += params[name].size
        self.param = xp.empty(start, dtype=params[names[0]].dtype)
        self.grad = xp.empty_like(self.param) if own_grad else None
        self.param_views = self._views(self.param)
        self.grad_views = self._views(self.grad) if own_grad else {}
        for name in names:
            self.param_views[name][...] = params[name]
            params[name] = self.param_views[name]
        # The checks before each update compare identities member by member; in name order as
        # lists, they run as map(is_, ...) without a Python frame per member.
        self.name_set = frozenset(names)
        self.param_view_list = [self.param_views[n] for n in names]
        self.grad_view_list = [self.grad_views[n] for n in names] if own_grad else []
        #: What this group put in ``model.optimizer_state`` for each member, in name order:
        #: views of the flat state, and its scalars.
        self.installed_list: list[dict[str, Any]] = []
        #: The optimizer state of the whole group (flat arrays and scalars), once there is one.
        self.state: dict[str, Any] | None = None
        #: Set when members were updated one by one: their state may have moved.
        self.dirty = False
        # A group up to twice the chunk goes in one call: one more call costs more there than
        # its temporaries do.
        self.chunk = CHUNK if start > 2 * CHUNK else max(start, 1)

    def _views(self, flat: Any) -> dict[str, Any]:
        return {n: flat[a:b].reshape(self.shapes[n]) for n, (a, b) in self.bounds.items()}

    def ready(self, params: Mapping[str, Any], grads: Mapping[str, Any]) -> bool:
        """Every member still the buffer's view, and every member with a gradient."""
        return grads.keys() >= self.name_set and all(
            map(is_, map(params.__getitem__, self.names), self.param_view_list))

    def flat_grad(self, xp: Any, grads: Mapping[str, Any]) -> Any:
        """The members' gradients as one flat array (copied in where a step did not write them
        into the buffer already)."""
        if self.grad is None:
            return xp.reshape(grads[self.names[0]], (-1,))
        members = list(map(grads.__getitem__, self.names))
        if not all(map(is_, members, self.grad_view_list)):
            for grad, view in zip(members, self.grad_view_list):
                if grad is not view:
                    view[...] = grad
        return self.grad

    def sync_state(self, xp: Any, optimizer: Any, states: dict[str, dict[str, Any]]) -> bool:
        """Make ``self.state`` the members' current optimizer state. False where it cannot be
        one flat state: members updated a different number of times, say."""
        if self.state is not None and not self.dirty and all(
                map(is_, map(states.get, self.names), self.installed_list)):
            return True
        if not any(n in states for n in self.names):
            self.state = optimizer.init_state(xp, self.param)
            self._install(states)
            return True
        members = [states.get(n) or optimizer.init_state(xp, self.param_views[n]) for n in self.names]
        keys = set(members[0])
        if any(set(m) != keys for m in members):
            return False
        state: dict[str, Any] = {}
        for key in keys:
            values = [m[key] for m in members]
            if _is_array(values[0]):
                state[key] = xp.concatenate([xp.reshape(v, (-1,)) for v in values])
            elif all(v == values[0] for v in values):
                state[key] = values[0]
            else:
                return False
        self.state = state
        self._install(states)
        return True

    def _install(self, states: dict[str, dict[str, Any]]) -> None:
        """Per-parameter state whose arrays are views of the flat state, and the chunks."""
        self.dirty = False
        arrays = {key: value for key, value in self.state.items()
                  if _is_array(value) and value.shape == self.param.shape}
        views = {key: self._views(value) for key, value in arrays.items()}
        self.installed_list = []
        for name in self.names:
            states[name] = {key: views[key][name] if key in views else value
                            for key, value in self.state.items()}
            self.installed_list.append(states[name])
        chunk = self.chunk
        self.chunks = [(a, self.param[a:a + chunk],
                        {key: value[a:a + chunk] for key, value in arrays.items()})
                       for a in range(0, self.param.size, chunk)]
        self.chunk_arrays = [dict(state) for _, _, state in self.chunks]

    def update(self, xp: Any, optimizer: Any, states: dict[str, dict[str, Any]], grad: Any,
               step: int) -> None:
        scalars = {k: v for k, v in self.state.items() if not _is_array(v)}
        for start, param, state in self.chunks:
            state.update(scalars)
            optimizer.update(xp, param, grad[start:start + self.chunk], state, step)
        first = self.chunks[0][2]
        fresh = {k for (_, _, state), arrays in zip(self.chunks, self.chunk_arrays)
                 for k, v in state.items() if _is_array(v) and arrays.get(k) is not v}
        for key, value in first.items():
            if key in fresh:  # the optimizer replaced or added a state array
                self.state[key] = xp.concatenate([state[key] for _, _, state in self.chunks])
            elif not _is_array(value):
                self.state[key] = value
        if fresh:
            self._install(states)
            return
        for key in scalars:  # Adam's step count, say
            value = self.state[key]
            if value is not scalars[key]:
                for name in self.names:
                    states[name][key] = value


class FlatParameters:
    """The flat groups of a model: one per dtype over the trainable parameters its training
    plan uses."""

    def __init__(self, xp: Any, params: dict[str, Any], names: Iterable[str]) -> None:
        by_dtype: dict[Any, list[str]] = {}
        large = []
        for name in names:
            if params[name].size >= CHUNK:
                large.append(name)
            else:
                by_dtype.setdefault(params[name].dtype, []).append(name)
        self.groups = [FlatGroup(xp, members, params, own_grad=True) for members in by_dtype.values()]
        self.groups += [FlatGroup(xp, [name], params, own_grad=False) for name in large]

    def bind(self, plan: Any) -> None:
        """Let ``plan``'s fused steps write parameter gradients straight into the flat gradient
        buffers (no copy before the update), where a parameter has no other reader whose
        gradient would have to be added to it."""
        fast = plan.fast
        if fast is None or not self.groups:
            return
        views = {n: g.grad_views[n] for g in self.groups if g.grad is not None for n in g.names}
        readers: dict[int, int] = {}
        for step in fast.steps:
            for slot in step.args:
                readers[slot] = readers.get(slot, 0) + 1
        names = fast.names
        for bstep in fast.backward:
            if isinstance(bstep.step.op, FusedDense):
                w, b = bstep.step.args[1], bstep.step.args[2]
                bstep.step.op.grad_out = tuple(views.get(names[s]) if readers[s] == 1 else None
                                               for s in (w, b))

    def update(self, model: Any, names: Iterable[str], grads: Mapping[str, Any],
               observed: bool = False) -> set[str]:
        """Update every group whose members are all in ``names``; returns those updated.
        ``observed``: observers watch each parameter's update, so the caller updates them one
        by one (and the groups resynchronize their state next time)."""
        done: set[str] = set()
        if observed:
            for group in self.groups:
                group.dirty = True
            return done
        if not self.groups or not getattr(model.optimizer, "elementwise", False):
            return done
        wanted = set(names)
        xp, states, optimizer = model.xp, model.optimizer_state, model.optimizer
        for group in self.groups:
            if (wanted.issuperset(group.names) and group.ready(model.store.arrays, grads)
                    and group.sync_state(xp, optimizer, states)):
                group.update(xp, optimizer, states, group.flat_grad(xp, grads), model.step_count)
                done.update(group.names)
            else:
                group.dirty = True  # its members go one by one this time
        return done
