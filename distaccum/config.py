"""The job's configuration: one frozen, validated dataclass, read from YAML plus `key=value` overrides.

Every bad value raises `ConfigError`, whose message is one line naming the key and the value; the
CLI prints it and exits 2.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BUNDLED_DATASETS = ("digits", "synthetic")
BUNDLED_MODELS = ("digits_mlp", "synthetic_mlp")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# The types gradient sums can travel in between workers (float32 is exact; see `Trainer`).
ALLREDUCE_DTYPES = ("float32", "bfloat16", "float16")
JIT_COMPILE_VALUES = ("auto", "true", "false")
# Files read as tables (rows by row group): Parquet, and Arrow IPC.
PARQUET_EXTENSIONS = (".parquet", ".pq")
ARROW_EXTENSIONS = (".arrow", ".feather", ".ipc")
TABLE_EXTENSIONS = PARQUET_EXTENSIONS + ARROW_EXTENSIONS  # the Trainer's "auto", True, False
# Keys of which a config gives one: a `--set` of either replaces the other's value from the file.
ALTERNATIVES = {"accumulation_steps": "global_batch_size", "global_batch_size": "accumulation_steps",
                "epochs": "update_steps", "update_steps": "epochs"}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `distaccum train` needs. Every `*_interval` counts update steps."""

    dataset: str | list = _help(
        f"training data: a bundled dataset ({', '.join(BUNDLED_DATASETS)}), an import path "
        "package.module:function returning a tf.data.Dataset of (x, y[, sample_weight]) samples, "
        "a random-access source (any other object with __len__ and __getitem__(i) giving one "
        "sample; read 1/N per worker) or a tuple (train, validation) of them, an .npz file "
        "(x, y[, sample_weight, x_val, y_val]), or a folder of images ending in / (one subfolder "
        "per class, as keras.utils.image_dataset_from_directory reads; read 1/N per worker); or "
        "a mixture: a list of {dataset: any of these but a function's tf.data.Dataset, weight: "
        "> 0}, each update taking weight / sum of weights of its samples from each",
        default="digits")
    dataset_args: dict = _help("keyword arguments for a dataset function (refused for any other "
                               "dataset)", default_factory=dict)
    parse: str | None = _help(
        "with it, dataset (and validation_dataset) is a glob of files (any path tf.io.gfile "
        "reads) and this an import path package.module:function returning (x, y[, "
        "sample_weight]) of one serialized record (TFRecord files), or of one row, a dict of "
        "column values (Parquet or Arrow IPC files: .parquet, .arrow, .feather, .ipc)",
        default=None)
    columns: dict | None = _help(
        "for Parquet or Arrow IPC files (instead of parse) and a dataset function's "
        "random-access source of rows (dicts of column values, as a Hugging Face "
        "datasets.Dataset gives): {x: column or [columns] (stacked "
        "into one float32 vector), y: column, sample_weight: column (optional)}", default=None)
    validation_dataset: str | None = _help(
        "validation data, as dataset takes it (default: what dataset comes with; a folder of "
        "images takes the training folder's class names)", default=None)
    image_options: dict = _help(
        "for folders of images: image_size [height, width], color_mode, interpolation, "
        "crop_to_aspect_ratio, pad_to_aspect_ratio, as image_dataset_from_directory takes them "
        "(default: its defaults; refused for other data)", default_factory=dict)
    shuffle_buffer: int = _help(
        "samples shuffled at once, over all partitions (a worker holds at most "
        "shuffle_buffer / num_workers)", default=8192)
    partitions: int = _help(
        "the data's fixed logical partitions: the sample order is the same for every "
        "num_workers dividing it (and only those run)", default=48)
    model: str = _help(
        f"a bundled model ({', '.join(BUNDLED_MODELS)}), an import path package.module:factory "
        "returning a keras.Model (compiled or not), or a .keras file", default="digits_mlp")
    model_args: dict = _help("keyword arguments for a model factory (refused for any other model)",
                             default_factory=dict)
    loss: str | None = _help(
        "a Keras loss name or package.module:name (default: the model's compiled loss; "
        "cross-entropy on logits for bundled models)", default=None)
    loss_args: dict = _help(
        "keyword arguments for the loss, e.g. {reduction: sum, from_logits: true} (with no "
        "loss: the model's compiled loss with these changed)", default_factory=dict)
    metrics: list | None = _help(
        "Keras metric names or package.module:name entries (default: the model's compiled "
        "metrics; accuracy for bundled models)", default=None)
    micro_batch_size: int = _help("samples per micro-batch on one worker", default=32)
    global_batch_size: int | None = _help(
        "samples per update over all workers: then accumulation_steps = global_batch_size / "
        "(num_workers x micro_batch_size), and a checkpoint resumes on any num_workers and "
        "micro_batch_size that divide it (give this or accumulation_steps)", default=None)
    accumulation_steps: int | None = _help(
        "micro-batches per worker per update, k (give this or global_batch_size; neither: 1)",
        default=None)
    optimizer: str | None = _help(
        "a Keras optimizer name (adam, sgd, adamw, rmsprop, ...), built with learning_rate, "
        "lr_schedule and optimizer_args (default: the model's compiled optimizer, as compiled; "
        "else adam)", default=None)
    optimizer_args: dict = _help(
        "keyword arguments for the optimizer (sgd gets momentum 0.9 unless given; not "
        "learning_rate, which is its own key)",
        default_factory=dict)
    learning_rate: float = _help("peak learning rate (>= 0)", default=1e-3)
    lr_schedule: str = _help(
        f"learning-rate schedule over update steps: {', '.join(LR_SCHEDULES)}", default="constant"
    )
    warmup_steps: int = _help("linear warm-up, in update steps (cosine only)", default=0)
    precision: str = _help(
        f"Keras dtype policy: {', '.join(PRECISIONS)} (mixed_float16 adds loss scaling)",
        default="float32",
    )
    allreduce_dtype: str = _help(
        f"type the gradient sums travel in between workers: {', '.join(ALLREDUCE_DTYPES)} "
        "(float32 is exact; the others halve the bytes, within their round-off)",
        default="float32",
    )
    jit_compile: str = _help(
        "compile the steps with XLA: auto (when a GPU is present and every layer supports it, "
        "as Keras does), true or false", default="auto")
    epochs: int | None = _help("passes over the training data (or give update_steps)", default=None)
    update_steps: int | None = _help("total update steps (or give epochs)", default=None)
    clip_global_norm: float | None = _help("clip the reduced gradient to this norm", default=None)
    shard_optimizer_state: bool = _help(
        "each worker keeps the optimizer state of its share of the variables (1/N of it); an "
        "update then sends the allreduce's bytes as a reduce-scatter and an allgather",
        default=False)
    log_interval: int = _help("update steps between TensorBoard/progress lines", default=10)
    checkpoint_interval: int = _help("update steps between checkpoints", default=100)
    keep_checkpoints: int = _help("how many recent checkpoints to keep", default=3)
    collective_timeout: float = _help(
        "seconds a collective (an update's allreduce, say) may take before every worker stops "
        "with an error: a vanished node ends the job instead of hanging it", default=300.0)
    max_consecutive_skips: int = _help(
        "updates in a row with NaN/Inf gradients (skipped) before training fails", default=5
    )
    logdir: str = _help(
        "TensorBoard logs, checkpoints (LOGDIR/checkpoints) and the saved model go here; "
        "running again with the same logdir resumes from the latest checkpoint",
        default="runs/digits",
    )
    seed: int = _help("seed for model initialisation and shuffling", default=0)

    def __post_init__(self) -> None:
        if isinstance(self.jit_compile, bool):  # YAML's true and false
            object.__setattr__(self, "jit_compile", str(self.jit_compile).lower())
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            _check_type(spec.name, value, hints[spec.name])
            if isinstance(value, int) and float in typing.get_args(hints[spec.name]) + (hints[spec.name],):
                object.__setattr__(self, spec.name, float(value))  # YAML reads "0" as an int
        self._check_data()
        self._check_named("model", BUNDLED_MODELS, ".keras")
        self._check_arguments()
        if self.metrics is not None and not all(isinstance(m, str) for m in self.metrics):
            _fail("metrics", self.metrics, "must be a list of names or import paths")
        for name, allowed in (
            ("lr_schedule", LR_SCHEDULES),
            ("precision", PRECISIONS),
            ("allreduce_dtype", ALLREDUCE_DTYPES),
            ("jit_compile", JIT_COMPILE_VALUES),
        ):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"must be one of {', '.join(allowed)}")
        for name in ("micro_batch_size", "log_interval", "checkpoint_interval",
                     "keep_checkpoints", "max_consecutive_skips", "shuffle_buffer", "partitions"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        for name in ("epochs", "update_steps", "global_batch_size", "accumulation_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        if (self.epochs is None) == (self.update_steps is None):
            _fail("epochs", self.epochs, f"give exactly one of epochs and update_steps "
                  f"(update_steps={self.update_steps})")
        if self.global_batch_size is not None and self.accumulation_steps is not None:
            _fail("accumulation_steps", self.accumulation_steps, "give global_batch_size or "
                  f"accumulation_steps, not both (global_batch_size={self.global_batch_size})")
        if self.learning_rate < 0:
            _fail("learning_rate", self.learning_rate, "must be >= 0")
        if self.warmup_steps < 0:
            _fail("warmup_steps", self.warmup_steps, "must be >= 0")
        if self.collective_timeout <= 0:
            _fail("collective_timeout", self.collective_timeout, "must be > 0 seconds")
        if self.clip_global_norm is not None and self.clip_global_norm <= 0:
            _fail("clip_global_norm", self.clip_global_norm, "must be > 0")
        if not self.logdir:
            _fail("logdir", self.logdir, "must not be empty")

    def changed(self, keys: typing.Iterable[str]) -> list[str]:
        """Which of `keys` the configuration sets to other than their defaults."""
        fields = {spec.name: spec for spec in dataclasses.fields(self)}
        return [key for key in keys if getattr(self, key) != (
            fields[key].default_factory() if fields[key].default is dataclasses.MISSING
            else fields[key].default)]

    def training_sources(self) -> list[tuple[str, str]]:
        """(config key, value) of each training source: `dataset`, or each entry of a mixture
        (`dataset[i]`)."""
        if isinstance(self.dataset, str):
            return [("dataset", self.dataset)]
        return [(f"dataset[{i}]", entry["dataset"]) for i, entry in enumerate(self.dataset)]

    def _check_data(self) -> None:
        """What `dataset` names and what reads it agree: `parse` for files (TFRecord, or
        tables), `columns` for tables and sources of rows, neither for the other kinds; a
        mixture's entries each name a source and a weight."""
        if self.parse is not None and not is_import_path(self.parse):
            _fail("parse", self.parse, "must be an import path package.module:function")
        if isinstance(self.dataset, list):
            self._check_mixture()
        kinds = {key: source_kind(value, self.parse) for key, value in self.training_sources()}
        for key, value in self.training_sources():
            if kinds[key] == "tables" and (self.parse is None) == (self.columns is None):
                _fail(key, value, "Parquet or Arrow IPC files need parse (a function of one row) "
                      "or columns (which columns are x, y and sample_weight), one of them")
            if kinds[key] is None:
                _fail(key, value, f"must be one of {', '.join(BUNDLED_DATASETS)}, an import path "
                      "package.module:name, an .npz file, a folder of images ending in /, "
                      "Parquet or Arrow IPC files (with columns or parse), or (with parse) a "
                      "glob of TFRecord files")
        if self.columns is not None and not {"tables", "function"} & set(kinds.values()):
            _fail("columns", self.columns, "is for Parquet or Arrow IPC files (a dataset glob "
                  f"ending in {', '.join(TABLE_EXTENSIONS)}) and a dataset function's rows; "
                  f"dataset={self.dataset!r} would ignore it")
        if self.parse is not None and not {"records", "tables"} & set(kinds.values()):
            _fail("dataset", self.dataset, f"must be a glob of TFRecord files when parse is set "
                  f"(parse={self.parse!r})")
        if self.validation_dataset is not None \
                and source_kind(self.validation_dataset, self.parse) is None:
            self._check_named("validation_dataset", (), ".npz")

    def _check_mixture(self) -> None:
        """A mixture: a list of {dataset, weight} entries, each weight a number > 0."""
        if not self.dataset:
            _fail("dataset", self.dataset, "a mixture needs at least one entry {dataset: ..., "
                  "weight: ...}")
        for i, entry in enumerate(self.dataset):
            if not isinstance(entry, dict) or set(entry) != {"dataset", "weight"} \
                    or not isinstance(entry["dataset"], str):
                _fail(f"dataset[{i}]", entry, "a mixture's entry is {dataset: <a dataset as "
                      "dataset takes it>, weight: <a number > 0>}")
            weight = entry["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not weight > 0 or weight == float("inf"):
                _fail(f"dataset[{i}].weight", weight, "must be a number > 0 (the share of "
                      "every update this source gives is weight / the weights' sum)")

    def _check_arguments(self) -> None:
        """A `*_args` entry is applied exactly or refused: only a factory or function named by
        import path takes `model_args`/`dataset_args` (a bundled name, a file or record files
        would ignore them), and `optimizer_args` must not carry what has its own key."""
        for args, key, takes in (("model_args", "model", is_import_path(self.model)),
                                 ("dataset_args", "dataset",
                                  any(source_kind(v, self.parse) == "function"
                                      for _, v in self.training_sources()))):
            value = getattr(self, key)
            if getattr(self, args) and not takes:
                _fail(args, getattr(self, args), f"only a {key} given as an import path "
                      f"(package.module:function) takes arguments; {key}={value!r} would ignore "
                      "them")
        if self.image_options and not any(
                is_folder(value) for value in [v for _, v in self.training_sources()]
                + [self.validation_dataset or ""]):
            _fail("image_options", self.image_options, "is for folders of images (a dataset "
                  f"ending in /); dataset={self.dataset!r} would ignore it")
        if self.warmup_steps and self.lr_schedule != "cosine":
            _fail("warmup_steps", self.warmup_steps, f"needs lr_schedule: cosine (the "
                  f"{self.lr_schedule} schedule has no warm-up)")
        if "learning_rate" in self.optimizer_args:
            _fail("optimizer_args", self.optimizer_args, "holds learning_rate, which has a key of "
                  "its own (with lr_schedule and warmup_steps): set learning_rate instead")

    def _check_named(self, name: str, bundled: tuple, suffix: str) -> None:
        value = getattr(self, name)
        if value not in bundled and not value.endswith(suffix) and not is_import_path(value) \
                and not (suffix == ".npz" and is_folder(value)):
            names = f"one of {', '.join(bundled)}, " if bundled else ""
            _fail(name, value, f"must be {names}an import path package.module:name or a "
                  f"{suffix} file" + (", a folder of images ending in / (or, with parse, a glob "
                                       "of TFRecord files)" if suffix == ".npz" else ""))

    def accumulation_steps_on(self, num_workers: int) -> int:
        """k on `num_workers` workers: as given, or what makes `global_batch_size`.

        Raises:
            ConfigError: `global_batch_size` is not a whole number of micro-batches per worker.
        """
        if self.global_batch_size is None:
            return self.accumulation_steps or 1
        return accumulation_steps_for(self.global_batch_size, num_workers, self.micro_batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def accumulation_steps_for(global_batch_size: int, num_workers: int,
                           micro_batch_size: int) -> int:
    """The k with `global_batch_size = num_workers × k × micro_batch_size`.

    Raises:
        ConfigError: there is none (one line naming all three).
    """
    per_update = num_workers * micro_batch_size
    if global_batch_size % per_update:
        raise ConfigError(
            f"global_batch_size: {global_batch_size} is not a whole number of micro-batches per "
            f"worker (num_workers x micro_batch_size = {num_workers} x {micro_batch_size} = "
            f"{per_update}). Received: global_batch_size={global_batch_size}, "
            f"num_workers={num_workers}, micro_batch_size={micro_batch_size}")
    return global_batch_size // per_update


def is_import_path(value: str) -> bool:
    """`package.module:name`, the form a config gives an import path in."""
    module, separator, name = value.partition(":")
    return bool(separator and module and name.isidentifier())


def source_kind(value: str, parse: str | None) -> str | None:
    """What a dataset value names: "bundled", "npz", "function", "folder", "tables",
    "records" (a glob, with parse), or None."""
    if is_table_pattern(value):
        return "tables"
    if is_folder(value):
        return "folder"
    if value in BUNDLED_DATASETS:
        return "bundled"
    if value.endswith(".npz"):
        return "npz"
    if is_import_path(value):
        return "function"
    return "records" if parse is not None else None


def is_table_pattern(value: str) -> bool:
    """A glob of Parquet or Arrow IPC files, by its extension (any other glob is TFRecord)."""
    return value.lower().endswith(TABLE_EXTENSIONS)


def is_folder(value: str) -> bool:
    """A path ending in `/`: the form a config gives a folder of images in."""
    return value.endswith("/")


def _fail(key: str, value, reason: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {reason}. Received: {key}={value!r}")


def _check_type(key: str, value, hint) -> None:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return
    expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    if isinstance(value, bool) and bool not in allowed:  # an int subclass, never a number here
        _fail(key, value, f"must be {expected}")
    if float in allowed and isinstance(value, int):
        return
    if not isinstance(value, tuple(t for t in allowed if t is not type(None))):
        _fail(key, value, f"must be {expected}")


def _parse_override(text: str) -> tuple[str, object]:
    key, separator, raw = text.partition("=")
    if not separator or not key:
        raise ConfigError(f"--set takes key=value. Received: {text!r}")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{key}: not a valid value. Received: {text!r}") from None


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Read a YAML file (or start from defaults when `path` is None) and apply `key=value` overrides.

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key, or an invalid value.
    """
    values: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"config: cannot read file ({error.strerror}). Received: {str(path)!r}")
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config: YAML syntax error{where}. Received: {str(path)!r}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config: must be a mapping of key: value. Received: {str(path)!r}")
    overridden = dict(_parse_override(text) for text in overrides)
    for key, alternative in ALTERNATIVES.items():
        if key in overridden and alternative not in overridden:
            values.pop(alternative, None)  # the command line's choice replaces the file's
    values.update(overridden)
    known = {spec.name for spec in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{key}: unknown key (see --help). Received: {key}={values[key]!r}")
    return TrainConfig(**values)


def describe_keys() -> str:
    """One line per key, for `--help`."""
    return "\n".join(
        f"  {spec.name:<20} {spec.metadata['help']} (default: "
        f"{spec.default if spec.default_factory is dataclasses.MISSING else spec.default_factory()})"
        for spec in dataclasses.fields(TrainConfig)
    )
