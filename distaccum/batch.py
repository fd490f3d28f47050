"""The Trainer's batch arithmetic: `global_batch_size = num_workers × k × micro_batch_size`.

A `Trainer` is given k, or the global batch (and perhaps the micro-batch size); with the global
batch, k is known only once the micro-batch size is, which may be when `fit` sees the data.
"""

from __future__ import annotations

from distaccum.config import accumulation_steps_for


def check_count(name: str, value) -> int | None:
    """`value` if it is None or an int >= 1; else a one-line error naming it. Every count a
    user gives (k, the batch sizes, epochs, intervals) is checked here."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int. Received: {name}={value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1. Received: {name}={value}")
    return value


class BatchSizes:
    """Which of global batch, micro-batch size and k a Trainer was given, and k once it follows.

    Owns the checks of the three arguments and their agreement with the data's micro-batch size;
    not the workers' agreement on a plan (`data`), nor what a resume on another shape says
    (`job`).
    """

    def __init__(self, num_workers: int, *, global_batch_size: int | None,
                 micro_batch_size: int | None, accumulation_steps: int | None) -> None:
        self.num_workers = num_workers
        self.global_batch_size = check_count("global_batch_size", global_batch_size)
        self.micro_batch_size = check_count("micro_batch_size", micro_batch_size)
        self._accumulation_steps = check_count("accumulation_steps", accumulation_steps)
        if global_batch_size is None:
            if micro_batch_size is not None:
                raise ValueError("micro_batch_size is what sets k from global_batch_size: give "
                                 f"both, or accumulation_steps. Received: micro_batch_size="
                                 f"{micro_batch_size}, global_batch_size=None")
            self._accumulation_steps = self._accumulation_steps or 1
        elif accumulation_steps is not None:
            raise ValueError(f"give global_batch_size or accumulation_steps, not both. Received: "
                             f"global_batch_size={global_batch_size}, "
                             f"accumulation_steps={accumulation_steps}")
        elif micro_batch_size is not None:
            self.settle(micro_batch_size)

    def on(self, num_workers: int) -> "BatchSizes":
        """The same global batch on `num_workers` workers (an elastic job's new group, which
        needs one), k following."""
        return BatchSizes(num_workers, global_batch_size=self.global_batch_size,
                          micro_batch_size=self.micro_batch_size, accumulation_steps=None)

    @property
    def accumulation_steps(self) -> int:
        """k: micro-batches per worker per update (known once the micro-batch size is, with
        `global_batch_size`)."""
        if self._accumulation_steps is None:
            self.settle(None)
        return self._accumulation_steps

    def settle(self, micro_batch_size: int | None) -> None:
        """With `global_batch_size`, k follows from the micro-batch size: the data's (when
        `micro_batches` made it) or the one given to the constructor; they must agree."""
        if self.global_batch_size is None or (micro_batch_size is None
                                              and self._accumulation_steps is not None):
            return
        if micro_batch_size is None and self.micro_batch_size is None:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} sets k from the micro-batch size: "
                "train on distaccum.micro_batches(...), which knows it, or give Trainer "
                "micro_batch_size=. Received: micro_batch_size=None")
        if None not in (micro_batch_size, self.micro_batch_size) \
                and micro_batch_size != self.micro_batch_size:
            raise ValueError(
                f"the data's micro-batches hold {micro_batch_size} samples, but the Trainer was "
                f"given micro_batch_size={self.micro_batch_size}. Received: "
                f"micro_batch_size={micro_batch_size}")
        self.micro_batch_size = micro_batch_size or self.micro_batch_size
        self._accumulation_steps = accumulation_steps_for(
            self.global_batch_size, self.num_workers, self.micro_batch_size)
