"""A job's model, data, loss, metrics and optimizer from what a user has: import paths (the
example project in examples/my_project), .keras and .npz files; every bad value one line, exit 2."""

from __future__ import annotations

import json
import re
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from distaccum import cli, sources
from distaccum.config import ConfigError, TrainConfig
from test_recordfiles import RECORD_FEATURES, write_records

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
        (["model=absent.keras", "model_args={}"], "model: no such file"),
        (["model=resnet", "model_args={}"],
         "model: must be one of digits_mlp, synthetic_mlp, an import path"),
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


# --- TFRecord files: `dataset:` a glob, `parse:` an import path ----------------------------------

# 101 training samples: 7 updates of 16 per epoch at micro_batch_size 8, accumulation_steps 2.
RECORD_RUN = ["--set", "parse=test_recordfiles:parse", "--set", "micro_batch_size=8",
              "--set", "accumulation_steps=2", "--set", "log_interval=3"]


@pytest.fixture
def record_files(tmp_path) -> dict[str, str]:
    """Globs of TFRecord training and validation files (test_recordfiles.write_records)."""
    return {"train": write_records(tmp_path / "train", sizes=(70, 0, 30, 1)).pattern,
            "validation": write_records(tmp_path / "validation", sizes=(20, 5), seed=1).pattern}


def parse_raising(record):
    raise ValueError("this parse always fails")


def parse_missing_feature(record):
    """Fails on the record, not when traced: the files hold no feature `z`."""
    features = tf.io.parse_single_example(record, {"z": tf.io.FixedLenFeature([], tf.float32)})
    return features["z"], features["z"]


def parse_single_tensor(record):
    return tf.io.parse_single_example(record, RECORD_FEATURES)["x"]


def test_record_files_train_then_resume_with_the_kept_index_when_run_again(train, record_files):
    arguments = ["--set", f"dataset={record_files['train']}",
                 "--set", f"validation_dataset={record_files['validation']}", *RECORD_RUN]
    code, out, err = train(*arguments, "--set", "epochs=1")
    assert code == 0, err
    assert re.search(r"^distaccum: dataset: 4 record files, 101 records, indexed in [\d.]+ s$",
                     out, re.M), out
    assert "distaccum: validation_dataset: 2 record files, 25 records, indexed in" in out, out
    assert "distaccum: done: 7 update steps" in out and "validation accuracy" in out, out
    code, out, err = train(*arguments, "--set", "epochs=2")
    assert code == 0, err
    assert "distaccum: dataset: 4 record files, 101 records, index kept from an earlier run" in out
    assert ("distaccum: validation_dataset: 2 record files, 25 records, index kept from an "
            "earlier run") in out, out
    assert "resuming after update step 7 (epoch 2)" in out and "done: 14 update steps" in out, out


def _write(path, content: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    "key, value, fragments",
    [
        ("dataset", "{tmp}/absent/*.tfrecord", ["dataset: the pattern matches no file."]),
        ("validation_dataset", "{tmp}/absent/*",
         ["validation_dataset: the pattern matches no file."]),
        ("dataset", "{text}", ["dataset: not a TFRecord file (a record at byte 0 runs past the "
                               "end): {text}."]),
        ("dataset", "{zeros}", ["dataset: not a TFRecord file (", "): {zeros}."]),
        ("dataset", "{empty}", ["dataset: the files hold no records."]),
        ("parse", "nosuchpackage.records:parse",
         ["parse: module 'nosuchpackage.records' does not import"]),
        ("parse", "test_recordfiles:missing",
         ["parse: module 'test_recordfiles' has no 'missing'"]),
        ("parse", "test_recordfiles:FEATURES",
         ["parse: not a function of one serialized record: a int."]),
        ("parse", "test_sources:parse_raising",
         ["parse: fails on the first record of {first} (ValueError: this parse always fails)."]),
        ("parse", "test_sources:parse_missing_feature",
         ["parse: fails on the first record of {first} (InvalidArgumentError: ", "Feature: z"]),
        ("parse", "test_sources:parse_single_tensor",
         ["parse: fails on the first record of {first} (ValueError: it returned TensorSpec(shape=(5,)",
          "not (x, y) or (x, y, sample_weight))."]),
    ],
    ids=["no_match", "validation_no_match", "text_file", "zero_bytes", "only_empty_files",
         "parse_does_not_import", "parse_name_missing", "parse_not_callable", "parse_raises",
         "parse_fails_on_the_record", "parse_single_tensor"],
)
def test_bad_record_files_or_parse_exit_2_with_one_line_before_training(
        train, record_files, tmp_path, key, value, fragments):
    first = tmp_path / "train" / "part-0.tfrecord"
    places = {"tmp": tmp_path, "first": first,
              "text": _write(tmp_path / "text" / "notes.txt", b"not a record file\n"),
              "zeros": _write(tmp_path / "zeros" / "part-0.tfrecord", bytes(32)),
              "empty": _write(tmp_path / "empty" / "part-0.tfrecord", b"")}
    value = value.format(**places)
    code, out, err = train("--set", f"dataset={record_files['train']}", *RECORD_RUN,
                           "--set", "epochs=1", "--set", f"{key}={value}")
    assert code == cli.EXIT_BAD_INPUT, err
    assert err.count("\n") == 1 and err.startswith("distaccum: error: "), err
    assert all(fragment.format(**places) in err for fragment in fragments), err
    assert err.count("Received:") == 1 and err.endswith(f". Received: {key}={value!r}\n"), err
    assert out == ""  # not started: the start-up block comes after the data is checked


def _uncompiled() -> keras.Model:
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])


@pytest.mark.parametrize("loss, loss_args, expected", [
    # A name, a function, the bundled models' default (no loss:), a Loss class by import path.
    ("sparse_categorical_crossentropy", {"from_logits": True, "reduction": "sum"},
     ("sum", {"from_logits": True})),
    ("keras.losses:sparse_categorical_crossentropy", {"reduction": "mean_with_sample_weight"},
     ("mean_with_sample_weight", {})),
    (None, {"reduction": "sum"}, ("sum", {"from_logits": True})),
    ("keras.losses:SparseCategoricalCrossentropy", {"ignore_class": 0},
     ("sum_over_batch_size", {"ignore_class": 0})),
], ids=["name", "function", "compiled_default", "class"])
def test_loss_args_make_the_loss_keras_would_build(loss, loss_args, expected):
    config = TrainConfig(epochs=1, loss=loss, loss_args=loss_args)
    built = sources.compile_arguments(config, _uncompiled())["loss"]
    assert isinstance(built, keras.losses.Loss)
    reduction, options = expected
    assert built.reduction == reduction
    config_of = built.get_config()
    given = {**config_of, **config_of.get("fn_kwargs", {})}  # a wrapped function's own keywords
    for key, value in options.items():
        assert (getattr(built, "_fn_kwargs", {}).get(key, given.get(key))) == value, key


@pytest.mark.parametrize("loss_args, named", [
    ({"from_logit": True}, "from_logit"),
    ({"reduction": "average"}, "average"),
])
def test_loss_args_that_do_not_fit_are_one_line_naming_them(loss_args, named):
    config = TrainConfig(epochs=1, loss="sparse_categorical_crossentropy", loss_args=loss_args)
    with pytest.raises(ConfigError) as raised:
        sources.compile_arguments(config, _uncompiled())
    message = str(raised.value)
    assert message.startswith("loss_args: ") and named in message and "\n" not in message


@pytest.mark.parametrize("settings, named", [
    # Each was ignored before (issue 35, rows 0 and 4): now refused in one line.
    ({"model_args": {"units": 7}}, "model_args: only a model given as an import path"),
    ({"model": "saved.keras", "model_args": {"units": 7}}, "model_args: only a model given as an "
     "import path (package.module:function) takes arguments; model='saved.keras' would ignore"),
    ({"dataset_args": {"n_samples": 100}}, "dataset_args: only a dataset given as an import path"),
    ({"dataset": "/data/train-*.tfrecord", "parse": "my.data:parse", "dataset_args": {"a": 1}},
     "dataset_args: only a dataset given as an import path"),
    ({"optimizer": "adam", "optimizer_args": {"learning_rate": 0.01}},
     "optimizer_args: holds learning_rate, which has a key of its own"),
], ids=["bundled_model", "model_file", "bundled_dataset", "record_files", "learning_rate"])
def test_args_a_setting_would_ignore_or_override_are_refused_in_one_line(settings, named):
    with pytest.raises(ConfigError) as raised:
        TrainConfig(epochs=1, **settings)
    message = str(raised.value)
    assert message.startswith(named.split(" ")[0]) and named in message, message
    assert "Received: " in message and "\n" not in message


def test_args_are_taken_where_an_import_path_takes_them():
    config = TrainConfig(epochs=1, model="my.models:build", model_args={"units": 7},
                         dataset="my.data:load", dataset_args={"n": 3},
                         optimizer_args={"momentum": 0.5})
    assert (config.model_args, config.dataset_args) == ({"units": 7}, {"n": 3})


@pytest.mark.parametrize("compiled_first", [True, False], ids=["compiled_file", "bundled"])
def test_saved_model_continues_the_optimizer_that_trained(train, tmp_path, compiled_first):
    # Issue 35, row 2: a compiled file's own SGD was saved instead of the configured Adam; a
    # bundled model was saved without any optimizer.
    arguments = ["--set", "optimizer=adam", "--set", "learning_rate=0.002", *SHORT_RUN]
    if compiled_first:
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
        model.compile(keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), weighted_metrics=["accuracy"])
        model.save(tmp_path / "m_sgd.keras")
        arguments += ["--set", f"model={tmp_path / 'm_sgd.keras'}"]
    code, out, err = train(*arguments)
    assert code == 0, err
    # What trains, as built, in the start-up block and beside the config the checkpoint records.
    assert "distaccum: optimizer Adam (learning rate 0.002); loss " in out
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("*/meta.json")).read_text())
    assert meta["settings"]["applied"]["optimizer"] == "Adam (learning rate 0.002)"
    saved = keras.saving.load_model(tmp_path / "run" / "model.keras", compile=True)
    assert type(saved.optimizer).__name__ == "Adam"
    assert int(saved.optimizer.iterations) == 3
    assert float(saved.optimizer.learning_rate) == pytest.approx(0.002)
    assert any(np.any(v.numpy() != 0) for v in saved.optimizer.variables if "momentum" in v.path)


def test_config_loss_and_metrics_replace_only_what_they_name_on_a_compiled_model():
    # Issue 35, row 7: `metrics:` dropped the compiled weighted metrics, `loss:` its loss weights.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, {"a": keras.layers.Dense(1, name="a")(inputs),
                                 "b": keras.layers.Dense(2, name="b")(inputs)})
    model.compile("sgd", loss={"a": "mse", "b": "mse"}, loss_weights={"a": 0.5, "b": 2.0},
                  metrics=["mae"], weighted_metrics=["mse"])
    config = TrainConfig(epochs=1, model="my.models:build", loss="mae", metrics=["mse"])
    arguments = sources.compile_arguments(config, model)
    assert arguments["loss"] == "mae" and arguments["metrics"] == ["mse"]
    assert arguments["loss_weights"] == {"a": 0.5, "b": 2.0}
    assert arguments["weighted_metrics"] == ["mse"]


def test_precision_a_saved_model_would_not_apply_is_refused_in_one_line(train, tmp_path):
    # Issue 35, row 3: a float32 .keras file trained in float32 under precision: mixed_float16.
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(tmp_path / "m.keras")
    code, _, err = train("--set", f"model={tmp_path / 'm.keras'}", "--set",
                         "precision=mixed_float16", *SHORT_RUN)
    assert code == cli.EXIT_BAD_INPUT
    # (Keras's loader may warn first about the optimizer it cannot fill.)
    assert err.strip().splitlines()[-1].startswith(
        "distaccum: error: precision: the model computes in float32 (a .keras file keeps"), err
    code, out, err = train("--set", f"model={tmp_path / 'm.keras'}", *SHORT_RUN)
    assert code == 0, err
    assert "precision float32)" in out  # one worker: no gradient sums travel, none named


def test_model_saved_in_mixed_precision_is_refused_under_float32(train, tmp_path):
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(tmp_path / "m.keras")
    code, _, err = train("--set", f"model={tmp_path / 'm.keras'}", *SHORT_RUN)
    assert code == cli.EXIT_BAD_INPUT
    assert err.strip().splitlines()[-1].startswith(
        "distaccum: error: precision: the model computes in mixed_bfloat16 (a .keras file"), err


def test_warmup_without_a_schedule_that_warms_up_is_refused():
    with pytest.raises(ConfigError, match=r"^warmup_steps: needs lr_schedule: cosine .*"
                                          r"Received: warmup_steps=5$"):
        TrainConfig(epochs=1, warmup_steps=5)
    assert TrainConfig(epochs=1, warmup_steps=5, lr_schedule="cosine").warmup_steps == 5


@pytest.mark.parametrize("setting", ["learning_rate=0.01", "optimizer_args={momentum: 0.9}",
                                     "lr_schedule=cosine"])
def test_optimizer_settings_a_compiled_optimizer_would_ignore_are_refused(train, tmp_path,
                                                                           setting):
    # Issue 35, row 1: the file's SGD trained at its own rate while the config asked another.
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile(keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    model.save(tmp_path / "m_sgd.keras")
    code, _, err = train("--set", f"model={tmp_path / 'm_sgd.keras'}", "--set", setting,
                         *SHORT_RUN)
    assert code == cli.EXIT_BAD_INPUT, err
    key = setting.split("=")[0]
    assert err.strip().splitlines()[-1].startswith(
        f"distaccum: error: {key}: the model's compiled optimizer (SGD) trains as compiled"), err
    code, _, err = train("--set", f"model={tmp_path / 'm_sgd.keras'}", "--set", setting,
                         "--set", "optimizer=sgd", *SHORT_RUN)
    assert code == 0, err


def test_loss_args_on_a_name_keras_resolves_by_the_labels_is_one_line():
    config = TrainConfig(epochs=1, loss="ce", loss_args={"reduction": "sum"})
    with pytest.raises(ConfigError, match=r"^loss_args: .*Received: loss_args="):
        sources.compile_arguments(config, _uncompiled())
