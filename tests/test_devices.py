"""GPU choice per worker, tested with fake device lists (no GPU needed)."""

from __future__ import annotations

import pytest

from types import SimpleNamespace

from distaccum.devices import CPU, NO_GPU_FOUND, choose_gpu, describe, device_code

FOUR_GPUS = [f"/physical_device:GPU:{i}" for i in range(4)]


@pytest.mark.parametrize("local_rank", [0, 1, 3])
def test_choose_gpu_picks_local_rank_when_machine_has_one_gpu_per_worker(local_rank):
    assert choose_gpu(FOUR_GPUS, local_rank) == FOUR_GPUS[local_rank]


def test_choose_gpu_returns_none_when_machine_has_no_gpu():
    assert choose_gpu([], 1) is None


def test_choose_gpu_keeps_single_visible_gpu_when_launcher_narrowed_view():
    # e.g. Kubernetes gives each worker pod one GPU, or CUDA_VISIBLE_DEVICES per process.
    assert choose_gpu(["/physical_device:GPU:0"], 3) == "/physical_device:GPU:0"


def test_choose_gpu_refuses_sharing_when_more_workers_than_gpus():
    with pytest.raises(ValueError, match="local_rank 2 has no GPU of its own: only 2 visible"):
        choose_gpu(FOUR_GPUS[:2], 2)


def test_choose_gpu_refuses_negative_local_rank():
    with pytest.raises(ValueError, match="local_rank=-1"):
        choose_gpu(FOUR_GPUS, -1)


def test_device_code_is_gpu_index_or_cpu():
    assert device_code(SimpleNamespace(name="/physical_device:GPU:3"), True) == 3
    assert device_code(None, built_with_cuda=False) == CPU
    assert device_code(None, built_with_cuda=True) == NO_GPU_FOUND


def test_describe_names_each_rank_device_when_any_trains_on_a_gpu():
    assert describe([0, 1]) == "rank 0 GPU 0, rank 1 GPU 1"
    assert describe([0, CPU]) == "rank 0 GPU 0, rank 1 CPU"
    assert describe([CPU, CPU]) == "CPU (2 ranks)"


def test_describe_says_why_a_cuda_build_trains_on_the_cpu():
    assert describe([NO_GPU_FOUND, NO_GPU_FOUND]) == (
        "CPU (2 ranks; TensorFlow is built with CUDA but found no GPU)")
    assert describe([0, NO_GPU_FOUND]) == (
        "rank 0 GPU 0, rank 1 CPU; TensorFlow is built with CUDA but found no GPU")
