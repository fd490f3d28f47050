"""Which GPU a worker uses: each process sees only its `local_rank`'s GPU, with memory growth on.

The choice is a pure function (`choose_gpu`) so it can be tested without a GPU; `configure_gpus`
applies it to TensorFlow and must run before TensorFlow touches a GPU. `device_code` and
`describe` say, in the job's start-up block, which device every rank trains on.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import tensorflow as tf

from distaccum import console

Device = TypeVar("Device")


def choose_gpu(gpus: Sequence[Device], local_rank: int) -> Device | None:
    """The GPU this worker should see, or None on a machine without GPUs.

    Args:
        gpus: the physical GPUs this process can see, in TensorFlow's order.
        local_rank: this worker's index among the workers on its machine.

    Raises:
        ValueError: more workers on this machine than GPUs, which would silently put two workers
            on one GPU; or a launcher that already narrowed the view to one GPU per process
            (`CUDA_VISIBLE_DEVICES`), in which case the single visible GPU is the right one.
    """
    if local_rank < 0:
        raise ValueError(f"local_rank must be >= 0. Received: local_rank={local_rank}")
    if not gpus:
        return None
    if len(gpus) == 1:
        return gpus[0]
    if local_rank >= len(gpus):
        raise ValueError(
            f"local_rank {local_rank} has no GPU of its own: only {len(gpus)} visible "
            f"({', '.join(map(str, gpus))}); start at most {len(gpus)} workers per machine"
        )
    return gpus[local_rank]


def configure_gpus(local_rank: int) -> object | None:
    """Make only this worker's GPU visible to TensorFlow, with memory growth, and return it."""
    with console.dropping(console.NO_GPU):  # said instead by `describe`, see `NO_GPU_FOUND`
        gpus = tf.config.list_physical_devices("GPU")
    gpu = choose_gpu(gpus, local_rank)
    if gpu is not None:
        tf.config.set_visible_devices([gpu], "GPU")
        # Without growth, the first worker's TensorFlow reserves nearly all of the GPU's memory.
        tf.config.experimental.set_memory_growth(gpu, True)
    return gpu


# Device codes of a worker that trains on its CPU: TensorFlow without CUDA, or with CUDA but no
# usable GPU (the GPU build on a machine without one, or a GPU node whose driver failed).
CPU = -1
NO_GPU_FOUND = -2


def device_code(gpu, built_with_cuda: bool) -> int:
    """A worker's device as one integer, to gather over workers: its GPU's index on its machine
    (from TensorFlow's `/physical_device:GPU:<index>`), `NO_GPU_FOUND` or `CPU`."""
    if gpu is None:
        return NO_GPU_FOUND if built_with_cuda else CPU
    return int(gpu.name.rsplit(":", 1)[1])


def describe(codes: Sequence[int]) -> str:
    """Every rank's device in one phrase: "rank 0 GPU 0, rank 1 GPU 1", or "CPU (2 ranks)"."""
    on_cpu = {CPU, NO_GPU_FOUND}
    why = ("; TensorFlow is built with CUDA but found no GPU" if NO_GPU_FOUND in codes else "")
    if all(code in on_cpu for code in codes):
        return f"CPU ({len(codes)} rank{'s' if len(codes) != 1 else ''}{why})"
    return ", ".join(f"rank {rank} " + ("CPU" if code in on_cpu else f"GPU {code}")
                     for rank, code in enumerate(codes)) + why
