"""launch/setup.sh's two variants, cpu and gpu, as a dry run prints them: what each installs and
how each builds Horovod (the GPU build itself is measured in docs/design.md, not in the suite);
and the bytecode set-up compiles, which every process loads where it may not write its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
    # KerasHub for the tests, without tensorflow-text's `tensorflow` requirement likewise.
    assert "install without dependencies: keras-hub==0.32.0" in completed.stdout
    assert "NCCL" not in completed.stdout and "CUDA" not in completed.stdout


def test_setup_refuses_unknown_variant_with_one_line():
    completed = _dry_run("--dry-run", variant="tpu")
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "launch/setup.sh: error: DISTACCUM_VARIANT must be cpu or gpu. Received: "
        "DISTACCUM_VARIANT='tpu'")


def test_tensorflow_keras_and_distaccum_load_from_bytecode_when_python_may_not_write_it():
    # As in the pods (read-only root filesystem) and wherever PYTHONDONTWRITEBYTECODE=1: every
    # module the import loads from the venv or distaccum/ comes from a .pyc set-up compiled.
    completed = subprocess.run(
        [sys.executable, "-v", "-c", "import tensorflow, keras, horovod.tensorflow, distaccum"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = re.findall(r"^# code object from (.+)$", completed.stderr, re.MULTILINE)
    from_source = [path for path in loaded if not path.startswith("'")]
    assert len(loaded) > 1000  # TensorFlow's and Keras's modules, from wherever they came
    ours = (str(REPO_ROOT / ".venv"), str(REPO_ROOT / "distaccum"))
    assert [path for path in from_source if path.startswith(ours)] == []
