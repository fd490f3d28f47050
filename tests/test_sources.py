"""A job's model, data, loss, metrics and optimizer from what a user has: import paths (the
example project in examples/my_project), .keras and .npz files; every bad value one line, exit 2."""

from __future__ import annotations

import sys

import keras
import numpy as np
import pytest

from conftest import REPO_ROOT
from distaccum import cli

EXAMPLE = REPO_ROOT / "examples" / "my_project"
SHORT_RUN = ["--set", "epochs=null", "--set", "update_steps=3", "--set", "log_interval=1"]


@pytest.fixture
def train(monkeypatch, tmp_path, capsys):
    """`distaccum train` in this process; cwd and sys.path restored afterwards (--workdir)."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))

    def run(*arguments: str) -> tuple[int, str, str]:
        code = cli.main(["train", "--set", f"logdir={tmp_path / 'run'}", *arguments])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_example_project_trains_by_import_path_with_its_compiled_settings(train):
    code, out, err = train("--workdir", str(EXAMPLE), "--config", str(EXAMPLE / "config.yaml"),
                           *SHORT_RUN)
    assert code == 0, err
    assert "distaccum: done: 3 update steps" in out and "validation accuracy" in out


def test_npz_dataset_with_sample_weights_and_validation_trains(train, tmp_path):
    rng = np.random.default_rng(0)
    data = _npz(tmp_path / "data.npz", x=rng.normal(size=(40, 64)).astype("float32"),
                y=rng.integers(0, 10, 40).astype("int32"), sample_weight=rng.random(40),
                x_val=rng.normal(size=(8, 64)).astype("float32"),
                y_val=rng.integers(0, 10, 8).astype("int32"))
    code, out, err = train("--set", f"dataset={data}", *SHORT_RUN)
    assert code == 0, err
    assert "validation accuracy" in out


def test_keras_file_model_trains_with_the_loss_it_was_compiled_with(train, tmp_path):
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=["mae"])
    model.save(tmp_path / "model.keras")
    rng = np.random.default_rng(0)
    data = _npz(tmp_path / "data.npz", x=rng.normal(size=(32, 64)).astype("float32"),
                y=rng.normal(size=(32, 1)).astype("float32"),
                x_val=rng.normal(size=(8, 64)).astype("float32"),
                y_val=rng.normal(size=(8, 1)).astype("float32"))
    code, out, err = train("--set", f"model={tmp_path / 'model.keras'}",
                           "--set", f"dataset={data}", *SHORT_RUN)
    assert code == 0, err
    assert "validation mae" in out  # the compiled metric, not the bundled models' accuracy


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=nosuchpackage.models:build"],
         "model: module 'nosuchpackage.models' does not import"),
        (["model=my_project.models:missing"], "model: module 'my_project.models' has no 'missing'"),
        (["model=my_project.data:load", "model_args={}"],
         "model: the factory must return a keras.Model"),
        (["model_args={depth: 3}"], "model: calling it failed (TypeError"),
        (["dataset=my_project.models:build_model", "dataset_args={}"],
         "dataset: the training data must be a tf.data.Dataset of (x, y)"),
        (["model=absent.keras"], "model: no such file"),
        (["model=resnet"], "model: must be one of digits_mlp, synthetic_mlp, an import path"),
        (["optimizer=adamm"], "optimizer: cannot build it"),
        (["loss=msee"], "msee"),
    ],
    ids=["module_missing", "name_missing", "not_a_model", "factory_fails", "not_a_dataset",
         "no_keras_file", "no_such_form", "unknown_optimizer", "unknown_loss"],
)
def test_bad_model_or_data_exits_2_with_one_line_naming_key_and_value(train, overrides, expected):
    arguments = [part for override in overrides for part in ("--set", override)]
    code, _, err = train("--workdir", str(EXAMPLE), "--config", str(EXAMPLE / "config.yaml"),
                         *arguments, *SHORT_RUN)
    assert code == cli.EXIT_BAD_INPUT
    assert err.count("\n") == 1 and err.startswith("distaccum: error: "), err
    assert expected in err, err
    value = overrides[0].split("=", 1)[1]
    assert "Received:" in err and (value in err or "model_args" in overrides[0]), err


def test_npz_without_labels_exits_2_naming_what_is_missing(train, tmp_path):
    data = _npz(tmp_path / "data.npz", x=np.zeros((4, 64), "float32"))
    code, _, err = train("--set", f"dataset={data}", *SHORT_RUN)
    assert code == cli.EXIT_BAD_INPUT
    assert "missing ['y']" in err and f"dataset={data!r}" in err


def test_workdir_that_is_not_a_directory_exits_2(train, tmp_path):
    code, _, err = train("--workdir", str(tmp_path / "absent"))
    assert code == cli.EXIT_BAD_INPUT
    assert err.strip() == f"distaccum: error: --workdir: not a directory. Received: --workdir={str(tmp_path / 'absent')!r}"
