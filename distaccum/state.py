"""Training state in the order checkpoints hold it, the same whatever the worker count and
whether the optimizer state is sharded: the model's variables, the optimizer's variables that
belong to no one variable (`iterations`, a learning rate, a loss scale), then each trainable
variable's optimizer state in turn (Adam: its momentum, then its velocity).

A checkpoint written by 4 workers with sharded state therefore resumes on 1 worker without it,
and the other way round. With sharded state the chief holds only its own share: what the others
hold travels to it while it writes (`SlotTransfer.gather`) and back to their owners from the
file it reads (`SlotTransfer.scatter`), a bounded group at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from distaccum import precision
from distaccum.comm.pieces import Piece, as_bytes, groups_by_size, row_ranges

_MAX_DIMS = 8  # of an optimizer variable, in the layout the workers exchange


def slot_lists(optimizer, variables: Sequence) -> list[list]:
    """The optimizer's state per variable, as every Keras optimizer keeps it: lists on the
    optimizer (`_momentums`, Adafactor's `_r` and `_c`, the EMA's averages, ...) holding, for
    each of the `variables` it was built on, in order, that variable's state (or None: Keras
    makes none for a variable overwritten with its gradient). In the order the lists were made.
    """
    inner = precision.unscaled(optimizer)
    state = {id(v) for v in optimizer.variables}
    lists = []
    for name, value in vars(inner).items():
        if name in ("_variables", "_trainable_variables") or not isinstance(value, (list, tuple)):
            continue
        if (value and len(value) == len(variables) and any(v is not None for v in value)
                and all(v is None or id(v) in state for v in value)):
            lists.append(list(value))
    return lists


def global_state(optimizer, variables: Sequence) -> list:
    """The optimizer's variables that belong to no one of `variables` (those it was built on),
    in its order: the same on every worker, sharded or not."""
    per_variable = {id(v) for slots in slot_lists(optimizer, variables) for v in slots}
    return [v for v in optimizer.variables if id(v) not in per_variable]


@dataclass(frozen=True)
class Slot:
    """One optimizer variable that belongs to one trainable variable: the `position`-th of
    trainable variable `variable`'s state, held by worker `owner`."""

    variable: int
    position: int
    shape: tuple[int, ...]
    dtype: str
    owner: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Elsewhere:
    """A slot another worker holds: its place in a checkpoint, written from what travels
    (`SlotTransfer.gather`) and read back for its owner (`SlotTransfer.scatter`)."""

    slot: Slot

    @property
    def shape(self) -> tuple[int, ...]:
        return self.slot.shape

    @property
    def dtype(self) -> str:
        return self.slot.dtype

    @property
    def path(self) -> str:
        return f"optimizer state {self.slot.position} of trainable variable {self.slot.variable}"

    def assign(self, value) -> None:
        """Nothing here: the owner gets it from `SlotTransfer.scatter`."""


class TrainingState:
    """Owns the checkpoint order of one worker's training state, and which of it lives elsewhere.

    Args:
        model: the built model.
        optimizer: the optimizer, built on `owned` of the model's trainable variables.
        owned: the indices of those variables (all of them unless the state is sharded).
        backend: with sharded state, the backend through which the workers tell each other
            what they hold (`exchange_slots`, a collective); None when this worker holds all.
    """

    def __init__(self, model, optimizer, owned: Sequence[int], backend=None) -> None:
        trainable = model.trainable_variables
        mine = [trainable[i] for i in owned]
        self.model_variables = list(model.variables)
        self.global_variables = global_state(optimizer, mine)
        self.local = {(owned[i], position): variable
                      for i, per in enumerate(per_variable_state(optimizer, mine))
                      for position, variable in enumerate(per)}
        self.rank = 0 if backend is None else backend.rank()
        deep = [v for v in trainable if len(v.shape) > _MAX_DIMS]
        if backend is not None and deep:  # every worker sees the same model: all refuse alike
            raise ValueError(
                f"shard_optimizer_state describes each optimizer variable in at most "
                f"{_MAX_DIMS} dimensions: {deep[0].path} has {len(deep[0].shape)}. Received: "
                "shard_optimizer_state=True")
        slots = (local_slots(self.local, self.rank) if backend is None
                 else exchange_slots(backend, self.local))
        self.slots = sorted(slots, key=lambda s: (s.variable, s.position))

    def entries(self) -> list:
        """The checkpoint's arrays in order: variables this worker holds, `Elsewhere` for the
        rest."""
        return [*self.model_variables, *self.global_variables,
                *(self.local[s.variable, s.position] if s.owner == self.rank else Elsewhere(s)
                  for s in self.slots)]


def per_variable_state(optimizer, variables: Sequence) -> list[list]:
    """Per variable, its optimizer variables in the order the optimizer's lists were made."""
    lists = slot_lists(optimizer, variables)
    return [[per[i] for per in lists if per[i] is not None] for i in range(len(variables))]


def local_slots(local: dict, rank: int) -> list[Slot]:
    return [Slot(i, position, tuple(v.shape), tf.as_dtype(v.dtype).name, rank)
            for (i, position), v in local.items()]


def exchange_slots(backend, local: dict) -> list[Slot]:
    """Every worker's slots, on every worker: one gather of a row per slot (its variable,
    position, dtype and shape), so that each knows the shapes it never built."""
    rows = [[i, position, tf.as_dtype(v.dtype).as_datatype_enum, len(v.shape),
             *v.shape, *[0] * (_MAX_DIMS - len(v.shape))] for (i, position), v in local.items()]
    mine = tf.constant(np.array(rows, np.int32).reshape(-1, 4 + _MAX_DIMS))
    [pieces] = backend.gather_all([mine], "slots")
    return [Slot(int(r[0]), int(r[1]), tuple(int(d) for d in r[4:4 + r[3]]),
                 tf.as_dtype(int(r[2])).name, owner)
            for owner, piece in enumerate(pieces) for r in np.asarray(piece)]


def _piece_shape(piece: tuple) -> tuple[int, ...]:
    """The shape of a travelling piece: (index, `Slot`, its range of rows or None)."""
    _, slot, rows = piece
    return slot.shape if rows is None else (rows[1] - rows[0], *slot.shape[1:])


def _piece_bytes(piece: tuple) -> int:
    return int(np.prod(_piece_shape(piece), dtype=np.int64)) * np.dtype(piece[1].dtype).itemsize


def _joined(parts: list[tf.Tensor]) -> tf.Tensor:
    """`parts` as one uint8 vector: one part as it is (a concatenation would copy it, a whole
    variable's size for a slot alone in its group)."""
    return parts[0] if len(parts) == 1 else tf.concat([tf.zeros([0], tf.uint8)] + parts, axis=0)


# Slots travel to the chief in pieces of at most this many bytes: a piece is held twice on its
# way (what the collective received, and TensorFlow's copy of it), so the transfer stays small
# beside the state (whole 37.7 MB slots cost the chief 0.24 W over its update's peak).
TRANSFER_BYTES = 8 << 20


class SlotTransfer:
    """Moves the slots workers other than the chief hold, in bounded groups, one collective
    each: to the chief as it writes a checkpoint, and from the file it read to their owners.
    Every worker runs the same groups in the same order."""

    def __init__(self, backend, state: TrainingState) -> None:
        self.backend = backend
        self.state = state
        self._travelling = [(i, s) for i, s in enumerate(state.slots) if s.owner != 0]

    def gather(self) -> Iterator[tuple[int, np.ndarray]]:
        """On the chief, what the other workers hold: (index in `state.entries()`, the bytes of
        the slot's next range of rows), in the entries' order, each slot's rows in order (every
        worker runs the gathers; the others get them too and drop them)."""
        for group in groups_by_size(self._pieces(), _piece_bytes, TRANSFER_BYTES):
            # Made in a call of its own: locals of this generator would hold a group while the
            # next one travels.
            yield from self._gathered(group)

    def _pieces(self) -> list[tuple[int, Slot, tuple[int, int] | None]]:
        """(index in `state.entries()`, slot, range of rows) of every travelling slot, in
        ranges of at most `TRANSFER_BYTES`."""
        start = len(self.state.model_variables) + len(self.state.global_variables)
        return [(start + i, slot, rows) for i, slot in self._travelling
                for rows in row_ranges(slot.shape, np.dtype(slot.dtype).itemsize,
                                       TRANSFER_BYTES)]

    def _gathered(self, group: list) -> list[tuple[int, np.ndarray]]:
        mine = [as_bytes(Piece(self.state.local[(slot.variable, slot.position)], rows).read())
                for _, slot, rows in group if slot.owner == self.state.rank]
        [received] = self.backend.gather_all([_joined(mine)], "checkpoint")
        arrived = {}
        for owner, piece in enumerate(received):
            held = [item for item in group if item[1].owner == owner]
            offsets = np.cumsum([0] + [_piece_bytes(item) for item in held])
            raw = np.asarray(piece)
            for (index, _, rows), begin, end in zip(held, offsets, offsets[1:]):
                arrived[index, rows] = raw[begin:end]
        return [(index, arrived[index, rows]) for index, _, rows in group]

    def scatter(self, read) -> None:
        """Each slot to its owner, in the ranges of rows `gather` sends: `read(index)` gives the
        array at that index of the entries (on the chief, from the checkpoint it restored; None
        elsewhere), read once per slot."""
        held: dict[int, np.ndarray] = {}  # on the chief, the slot being sent

        def values(index: int, rows) -> np.ndarray:
            if index not in held:
                held.clear()
                held[index] = read(index)
            return held[index] if rows is None else held[index][slice(*rows)]

        for group in groups_by_size(self._pieces(), _piece_bytes, TRANSFER_BYTES):
            sent = [tf.constant(values(piece[0], piece[2])) if read is not None
                    else tf.zeros(_piece_shape(piece), piece[1].dtype) for piece in group]
            for (_, slot, rows), value in zip(group, self.backend.broadcast(sent)):
                if slot.owner == self.state.rank:
                    Piece(self.state.local[(slot.variable, slot.position)], rows).write(value)
