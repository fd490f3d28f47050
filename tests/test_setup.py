"""launch/setup.sh's two variants, cpu and gpu, as a dry run prints them: what each installs and
how each builds Horovod (the GPU build itself is measured in docs/design.md, not in the suite)."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO_ROOT

SETUP = REPO_ROOT / "launch" / "setup.sh"


def _dry_run(*arguments: str, variant: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DISTACCUM_VARIANT"}
    if variant:
        env["DISTACCUM_VARIANT"] = variant
    return subprocess.run(["bash", str(SETUP), *arguments], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("how", [["--gpu"], "gpu"], ids=["option", "variable"])
def test_gpu_setup_installs_cuda_tensorflow_and_builds_horovod_with_nccl_when_asked(how):
    arguments = how if isinstance(how, list) else []
    completed = _dry_run(*arguments, "--horovod", "--dry-run",
                         variant=None if isinstance(how, list) else how)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert f"install: -e {REPO_ROOT}[gpu,test,benchmarks]" in lines
    [tensorflow] = [line for line in lines if line.startswith("tensorflow: ")]
    assert "tensorflow[and-cuda]==2.21.0" in tensorflow and "nvidia-nccl-cu12==" in tensorflow
    environment = " ".join(line for line in lines if line.startswith("environment: "))
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in environment
    assert "CUDAToolkit_ROOT=<build>/cuda" in environment  # the wheels' toolkit, not the system's
    assert any("cuda_kernels_host.cc" in line for line in lines if line.startswith("patch: "))


def test_cpu_setup_installs_cpu_tensorflow_and_builds_horovod_without_cuda_by_default():
    completed = _dry_run("--horovod", "--dry-run")
    assert completed.returncode == 0, completed.stderr
    assert f"install: -e {REPO_ROOT}[cpu,test,benchmarks]" in completed.stdout
    assert "tensorflow: tensorflow-cpu==2.21.0" in completed.stdout
    # Keras 2 for the peers benchmark, without its `tensorflow` requirement (a second TensorFlow).
    assert "install without dependencies: tf-keras==2.21.0" in completed.stdout
    assert "NCCL" not in completed.stdout and "CUDA" not in completed.stdout


def test_setup_refuses_unknown_variant_with_one_line():
    completed = _dry_run("--dry-run", variant="tpu")
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "launch/setup.sh: error: DISTACCUM_VARIANT must be cpu or gpu. Received: "
        "DISTACCUM_VARIANT='tpu'")
