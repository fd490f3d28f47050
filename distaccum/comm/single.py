"""The single-process backend: `python script.py` with neither Horovod nor mpi4py installed.

It needs nothing but TensorFlow, so the package imports it eagerly (tests and benchmarks build
one directly) while the other two backends are imported only when `init()` chooses them.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf


class SingleProcessBackend:
    """One worker: every collective is the identity, and nothing imports Horovod."""

    name = "single"
    summable_dtypes = ("float32", "bfloat16", "float16")
    elastic = False  # mpirun and one process: the workers are fixed for the job

    def num_workers(self) -> int:
        return 1

    def rank(self) -> int:
        return 0

    def local_rank(self) -> int:
        return 0

    def sum_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[tf.Tensor]:
        return list(tensors)

    def max_all(self, value: tf.Tensor) -> tf.Tensor:
        return value

    def gather_all(self, tensors: Sequence[tf.Tensor], name: str) -> list[list[tf.Tensor]]:
        return [[t] for t in tensors]

    def reduce_scatter(self, segments: Sequence[tf.Tensor], name: str) -> tf.Tensor:
        return segments[0]

    def broadcast(self, tensors: Sequence[tf.Tensor], root: int = 0) -> list[tf.Tensor]:
        return list(tensors)

    def shutdown(self) -> None:
        pass
