"""The CLI and config: every bad value is one line on stderr naming key and value, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, VENV_BIN
from distaccum import cli
from distaccum.config import TrainConfig, load_config

DIGITS = str(REPO_ROOT / "distaccum" / "configs" / "digits.yaml")


def test_bundled_configs_load_when_read_from_repo():
    config = load_config(DIGITS)
    assert (config.dataset, config.model, config.epochs) == ("digits", "digits_mlp", 30)
    synthetic = load_config(REPO_ROOT / "distaccum" / "configs" / "synthetic.yaml")
    assert synthetic.model == "synthetic_mlp"


def test_overrides_replace_file_values_when_given_with_set():
    config = load_config(DIGITS, ["accumulation_steps=8", "epochs=null", "update_steps=5",
                                  "clip_global_norm=1.5"])
    assert (config.accumulation_steps, config.epochs, config.update_steps) == (8, None, 5)
    assert config.clip_global_norm == 1.5


@pytest.mark.parametrize("override, replaced", [("accumulation_steps=8", "global_batch_size"),
                                               ("update_steps=5", "epochs")],
                         ids=["k_replaces_global_batch", "update_steps_replaces_epochs"])
def test_override_of_one_of_two_alternatives_replaces_the_files_other(override, replaced):
    assert getattr(load_config(DIGITS), replaced) is not None
    config = load_config(DIGITS, [override])
    key, value = override.split("=")
    assert getattr(config, key) == int(value) and getattr(config, replaced) is None


def test_integer_yaml_value_becomes_float_when_key_is_a_float():
    config = load_config(DIGITS, ["learning_rate=0", "clip_global_norm=2"])
    assert isinstance(config.learning_rate, float) and isinstance(config.clip_global_norm, float)


def test_config_is_frozen():
    config = TrainConfig(epochs=1)
    with pytest.raises(AttributeError):
        config.epochs = 2


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--set", "accumulation_steps=0"], "accumulation_steps=0"),
        (["--set", "learning_rate=-0.1"], "learning_rate=-0.1"),
        (["--set", "optimizr=adam"], "optimizr"),
        (["--set", "model=resnet50"], "model='resnet50'"),
        (["--set", "dataset=imagenet"], "dataset='imagenet'"),
        (["--set", "micro_batch_size=big"], "micro_batch_size='big'"),
        (["--set", "epochs=2", "--set", "update_steps=3"], "update_steps=3"),
        (["--set", "log_interval=true"], "log_interval=True"),
        (["--set", "noequals"], "'noequals'"),
        (["--set", "precision=float64"], "precision='float64'"),
        (["--set", "allreduce_dtype=int8"], "allreduce_dtype='int8'"),
        (["--set", "jit_compile=xla"], "jit_compile: must be one of auto, true, false. "
         "Received: jit_compile='xla'"),
        (["--set", "global_batch_size=64", "--set", "accumulation_steps=2"],
         "give global_batch_size or accumulation_steps, not both (global_batch_size=64). "
         "Received: accumulation_steps=2"),
        (["--set", "global_batch_size=100"], "global_batch_size: 100 is not a whole number of "
         "micro-batches per worker (num_workers x micro_batch_size = 1 x 32 = 32). Received: "
         "global_batch_size=100, num_workers=1, micro_batch_size=32"),
    ],
    ids=["k_zero", "negative_lr", "unknown_key", "unknown_model", "unknown_dataset",
         "wrong_type", "both_durations", "bool_for_int", "override_syntax", "precision",
         "allreduce_dtype", "jit_compile", "global_batch_and_k", "global_batch_not_whole"],
)
def test_train_exits_2_with_one_line_when_value_is_bad(capsys, arguments, expected):
    assert cli.main(["train", "--config", DIGITS, *arguments]) == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and expected in error and error.startswith("distaccum: error:")


def test_train_exits_2_when_config_file_is_missing(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert cli.main(["train", "--config", str(missing)]) == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(missing) in error


def test_train_exits_2_when_yaml_is_malformed(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: 3\nmodel: [unclosed\n")
    assert cli.main(["train", "--config", str(broken)]) == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "YAML syntax error at line" in error and "broken.yaml" in error


def test_train_exits_2_when_logdir_is_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = cli.main(["train", "--config", DIGITS, "--set", f"logdir={blocker}/run"])
    assert code == cli.EXIT_BAD_INPUT
    assert "logdir: not writable" in capsys.readouterr().err


def test_train_exits_2_with_one_line_when_backend_cannot_sum_the_allreduce_dtype(tmp_path):
    completed = subprocess.run(
        [str(VENV_BIN / "distaccum"), "train", "--config", DIGITS, "--set",
         "allreduce_dtype=bfloat16", "--set", f"logdir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "DISTACCUM_BACKEND": "horovod"},  # one process, Horovod's collectives
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines() == [
        "distaccum: error: allreduce_dtype=bfloat16 is not available on the horovod backend (it "
        "sums float32, float16). Received: allreduce_dtype='bfloat16'"
    ]


def test_command_line_error_is_one_line_without_traceback_when_run_as_program():
    completed = subprocess.run(
        [str(VENV_BIN / "distaccum"), "train", "--set", "accumulation_steps=0"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "distaccum: error: accumulation_steps: must be >= 1. Received: accumulation_steps=0"
    ]


def test_help_documents_every_config_key():
    completed = subprocess.run(
        [sys.executable, "-m", "distaccum.cli", "train", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0
    for key in TrainConfig.__dataclass_fields__:
        assert f"  {key} " in completed.stdout


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_precision_key_trains_the_model_under_that_policy(tmp_path, capsys, precision):
    import keras

    try:
        code = cli.main(["train", "--config", DIGITS, "--set", f"precision={precision}",
                         "--set", "epochs=null", "--set", "update_steps=3",
                         "--set", f"logdir={tmp_path}"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert code == 0, capsys.readouterr().err
    assert "distaccum: done: 3 update steps" in capsys.readouterr().out
    model = keras.saving.load_model(tmp_path / "model.keras")
    assert model.layers[0].dtype_policy.name == precision
    assert model.layers[-1].dtype_policy.name == "float32"  # the logits


@pytest.mark.parametrize("command, expected", [
    ([], "launch needs a command to run"),
    (["/nonexistent/mpirun", "-np", "2"], "launch: cannot start '/nonexistent/mpirun'"),
], ids=["nothing", "not_found"])
def test_launch_exits_2_with_one_line_when_the_command_cannot_run(capsys, command, expected):
    assert cli.main(["launch", *command]) == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and expected in error and "Received:" in error, error
