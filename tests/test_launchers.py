"""Every launcher the README names really starts 2 workers and trains; the main job reaches 0.95."""

from __future__ import annotations

import os
import re
import subprocess

import keras
import numpy as np
import pytest

from conftest import REPO_ROOT
from distaccum import catalog

pytestmark = pytest.mark.multiworker

RUN = REPO_ROOT / "launch" / "run.sh"
DIGITS = str(REPO_ROOT / "distaccum" / "configs" / "digits.yaml")
SHORT_RUN = ["--set", "epochs=null", "--set", "update_steps=4", "--set", "log_interval=2"]


def _launch(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "HOROVOD_"))}
    completed = subprocess.run(
        ["bash", str(RUN), *arguments], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


@pytest.mark.parametrize(
    "mode, chief_tag, other_tag",
    [
        (["gloo", "2"], "[0]<stdout>", "[1]<stdout>"),
        (["horovodrun-mpi", "2"], "[1,0]<stdout>", "[1,1]<stdout>"),
        (["hostfile", "{hostfile}", "2"], None, None),
    ],
    ids=["horovodrun_gloo", "horovodrun_mpi", "mpirun_hostfile"],
)
def test_launcher_trains_with_two_workers_when_run_from_readme(tmp_path, mode, chief_tag, other_tag):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    mode = [part.format(hostfile=hostfile) for part in mode]
    completed = _launch(*mode, "--config", DIGITS, *SHORT_RUN, "--set", f"logdir={tmp_path}/run")
    assert "num_workers 2," in completed.stdout
    backend = "mpi" if mode[0] == "hostfile" else "horovod"
    assert (f"distaccum: training on CPU (2 ranks) ({backend} collectives, precision float32, "
            "gradient sums in float32)") in completed.stdout
    # The chief alone reports: one start line, one summary.
    assert completed.stdout.count("distaccum: done: 4 update steps") == 1
    if chief_tag:
        assert chief_tag in completed.stdout and other_tag not in completed.stdout
    keras.saving.load_model(tmp_path / "run" / "model.keras")


def test_local_launcher_trains_one_process_when_no_launcher(tmp_path):
    completed = _launch("local", "--config", DIGITS, *SHORT_RUN, "--set", f"logdir={tmp_path}")
    assert "num_workers 1," in completed.stdout
    assert "distaccum: done: 4 update steps" in completed.stdout


def test_launcher_refuses_bad_worker_count_with_one_line():
    completed = subprocess.run(["bash", str(RUN), "gloo", "0"], capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.strip() == "launch/run.sh: error: N must be a positive integer. Received: N='0'"


def test_main_command_reaches_95_percent_validation_accuracy_when_two_workers(tmp_path):
    # Also the `mpi` launcher's test (the README's main command: mpirun, mpi4py's collectives).
    completed = _launch("mpi", "2", "--config", DIGITS, "--set", f"logdir={tmp_path}")
    assert "num_workers 2," in completed.stdout
    assert completed.stdout.count("distaccum: done:") == 1
    # A quiet console: the chief's lines only, no TensorFlow banners from any rank, no set-up
    # noise.
    assert all(line.startswith(("distaccum: ", "update ", "epoch "))
               for line in completed.stdout.splitlines()), completed.stdout
    assert [line for line in completed.stderr.splitlines() if not line.startswith("[setup]")] == []
    summary = re.search(r"distaccum: done: (\d+) update steps, ([\d,]+) samples/s, "
                        r"validation loss [\d.]+, validation accuracy ([\d.]+)", completed.stdout)
    assert summary, completed.stdout[-2000:]
    assert int(summary.group(1)) == 30 * 12  # ceil(ceil(719 / 32) / 2) updates per epoch
    assert float(summary.group(3)) >= 0.95
    assert f"tensorboard --logdir {tmp_path}" in completed.stdout
    # The saved model, evaluated independently of distaccum, agrees.
    split = catalog.load_dataset("digits")
    model = keras.saving.load_model(tmp_path / "model.keras")
    predictions = np.argmax(model.predict(split.x_validation, verbose=0), axis=1)
    accuracy = float(np.mean(predictions == split.y_validation))
    assert accuracy == pytest.approx(float(summary.group(3)), abs=1e-4)



EXAMPLE = REPO_ROOT / "examples" / "my_project"


@pytest.mark.parametrize("dataset", ["load", "load_rows"],
                         ids=["tf_data_datasets", "random_access_sources"])
def test_example_project_trains_by_import_path_with_two_workers(tmp_path, dataset):
    # A user's own package (model factory, dataset function), named in its config by import path.
    completed = _launch("mpi", "2", "--workdir", str(EXAMPLE), "--config",
                        str(EXAMPLE / "config.yaml"), "--set", f"logdir={tmp_path}",
                        "--set", f"dataset=my_project.data:{dataset}")
    assert "num_workers 2," in completed.stdout
    # A tf.data.Dataset is read whole by every worker; a random-access source 1/N per worker.
    assert ("every worker reads all of its data" in completed.stdout) == (dataset == "load")
    summary = re.search(r"distaccum: done: (\d+) update steps, .*validation accuracy ([\d.]+)",
                        completed.stdout)
    assert summary, completed.stdout[-2000:]
    # 426 training samples: 213 per worker, ceil(ceil(213 / 16) / 2) = 7 updates per epoch; by
    # the order's arithmetic for a source, ceil(426 / 64) = 7.
    assert int(summary.group(1)) == 10 * 7
    assert float(summary.group(2)) >= 0.93
    # Trained with the optimizer the factory compiled (Adam at 0.01), not distaccum's default.
    model = keras.saving.load_model(tmp_path / "model.keras")
    assert type(model.optimizer).__name__ == "Adam"
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)
