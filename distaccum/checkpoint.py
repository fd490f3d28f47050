"""Checkpoints at update boundaries: written atomically by the chief, verified when read.

A checkpoint is a directory `update-<step>/` holding `state.npz` (every model variable, including
the layers' random-generator states, then the optimizer's, including its iteration counter, in
`state`'s order, which no worker count or sharding changes) and `meta.json` (the `Position` in the data, the config, the worker count, and the
SHA-256 of `state.npz`). It is written under a temporary name, flushed to disk and renamed, so a
crash never leaves a half-written checkpoint under a real name; a damaged one (truncated, edited)
fails its checksum and the previous checkpoint is used instead, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from distaccum import comm
from distaccum.comm.pieces import pieces_of
from distaccum.config import ConfigError
from distaccum.history import Position
from distaccum.state import Elsewhere

# 2: the optimizer's variables in `state.TrainingState`'s order. 1: in `optimizer.variables`'
# order, which an optimizer built on one worker's share cannot know (read by unsharded runs).
FORMAT_VERSION = 2
_PREFIX = "update-"
# Changing these between a run and its resume would silently change what an update is. Not the
# worker count, micro-batch size or k: with the same global batch, update u of an epoch takes the
# same samples on any of them (`order`), so a run may resume on more or fewer workers.
RESUME_MUST_MATCH = ("dataset", "dataset_args", "parse", "columns", "image_options", "model",
                     "model_args", "loss", "loss_args", "optimizer", "optimizer_args",
                     "learning_rate", "lr_schedule", "warmup_steps", "global_batch_size", "seed",
                     "partitions", "shuffle_buffer", "precision")
# Settings later formats added, as a checkpoint without them was written.
_ADDED_SETTINGS = {"loss_args": {}, "image_options": {}, "columns": None}
# What an update minimises (`objective`): recorded so that a resume never silently changes it.
OBJECTIVE = "each loss under its Keras reduction"
# Checkpoints without the record were written when every weighted loss was divided by the sum of
# its weights, whatever its reduction.


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not belong to this run."""


@dataclass(frozen=True)
class Restored:
    """What `restore_latest` loaded."""

    path: Path
    position: Position
    settings: dict


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class CheckpointManager:
    """Owns one run's checkpoint directory: writing, keeping the last `keep`, and reading back.

    Does not decide when to checkpoint (the Controller does) nor who writes (the chief only).
    """

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def check_writable(self) -> None:
        """Fail before training, not at the first checkpoint an hour later. Also clears what a
        writer killed mid-save left (its staging directory): at start-up nobody is writing."""
        for debris in self.directory.glob(".staging-*"):
            shutil.rmtree(debris, ignore_errors=True)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise CheckpointError(
                f"checkpoint directory not writable ({error.strerror}). Received: {self.directory}"
            ) from None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return sorted(p for p in self.directory.glob(f"{_PREFIX}*") if p.is_dir())

    def save(self, position: Position, variables: list, settings: dict,
             elsewhere: Iterator[tuple[int, np.ndarray]] = iter(())) -> Path:
        """Write `variables` (`state.TrainingState.entries()`) and where training stands; keep
        the last few. Entries other workers hold (`state.Elsewhere`) are taken from `elsewhere`,
        which yields each one's bytes in ranges of its rows, in order, with its index
        (`state.SlotTransfer.gather`).

        Raises:
            CheckpointError: the write failed (a full disk, say): nothing of it is left behind
                and the earlier checkpoints are untouched.
        """
        final = self.directory / f"{_PREFIX}{position.update_step:09d}"
        staging = self.directory / f".staging-{final.name}-{os.getpid()}"
        try:
            self._write(staging, position, variables, settings, elsewhere)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint at update step {position.update_step} not saved "
                f"({error.strerror or error}); the previous ones are intact. Received: "
                f"{self.directory}") from None
        shutil.rmtree(final, ignore_errors=True)  # a re-run reaching the same step replaces it
        os.replace(staging, final)
        _fsync(self.directory)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def save_from_every_worker(self, position: Position, state, settings: dict, *,
                               chief: bool, transfer=None) -> None:
        """`save`, called on every worker: the chief writes `state` (`state.TrainingState`);
        with sharded optimizer state (`transfer`, a `state.SlotTransfer`) every worker sends it
        its share meanwhile. A failed write (a full disk) warns, and training goes on to try
        again at the next checkpoint; every worker still runs every group's collective."""
        groups = transfer.gather() if transfer is not None else iter(())
        with (comm.collective(f"the checkpoint at update step {position.update_step}")
              if transfer is not None else contextlib.nullcontext()):
            if chief:
                try:
                    self.save(position, state.entries(), settings, groups)
                except CheckpointError as error:
                    print(f"distaccum: warning: {error}", file=sys.stderr, flush=True)
            for _ in groups:  # what a failed write left, and every group on the other workers
                pass

    @staticmethod
    def _write(staging: Path, position: Position, variables: list, settings: dict,
               elsewhere: Iterator[tuple[int, np.ndarray]]) -> None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        state = staging / "state.npz"
        with state.open("wb") as handle:
            _save_arrays(handle, variables, elsewhere)
        meta = {"format": FORMAT_VERSION, "position": asdict(position), "settings": settings,
                "variables": len(variables), "sha256": _sha256(state)}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        for path in (state, staging / "meta.json", staging):
            _fsync(path)

    def restore_latest(self, variables: list, settings: dict,
                       legacy: list | None = None) -> Restored | None:
        """Load the newest readable checkpoint into `variables` (`state.TrainingState.entries()`;
        `legacy`, model then optimizer variables, for a checkpoint of format 1, which a run
        with sharded optimizer state cannot read); None when there is none.

        Raises:
            CheckpointError: checkpoints exist but none is readable.
            ConfigError: the newest readable one was written with settings this run does not
                share (one line naming the key, both values and how to match).
        """
        candidates = self.checkpoints()
        problems = []
        for path in reversed(candidates):
            try:
                restored = self._load(path, variables, legacy)
            except (OSError, ValueError, KeyError) as error:
                problems.append(f"{path.name}: {error}")
                print(f"distaccum: warning: checkpoint {path} is unreadable ({error}); "
                      "trying the previous one", file=sys.stderr)
                continue
            _check_settings(restored, settings)
            return restored
        if candidates:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: {'; '.join(problems)}")
        return None

    @staticmethod
    def _load(path: Path, variables: list, legacy: list | None) -> Restored:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") == 1 and legacy is not None:
            variables = legacy
        elif meta.get("format") == 1:
            raise ValueError("format 1, whose optimizer state a run with shard_optimizer_state "
                             "cannot place: resume it once without, then switch it on")
        elif meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        if _sha256(path / "state.npz") != meta["sha256"]:
            raise ValueError("state.npz does not match its checksum (truncated or modified)")
        shapes = _saved_shapes(path / "state.npz", meta["variables"])
        if len(shapes) != len(variables):
            raise ValueError(f"{len(shapes)} variables saved, this model has {len(variables)}")
        for variable, shape in zip(variables, shapes):
            if tuple(variable.shape) != shape:
                raise ValueError(f"shape {shape} saved for {variable.path}, "
                                 f"expected {tuple(variable.shape)}")
        _load_arrays(path / "state.npz", variables)
        return Restored(path, Position(**meta["position"]), meta["settings"])


def _member(index: int) -> str:
    return f"arr_{index}"  # the names `np.savez` gives positional arrays


def _save_arrays(handle, variables: list,
                 elsewhere: Iterator[tuple[int, np.ndarray]] = iter(())) -> None:
    """`np.savez(handle, *values)`, one piece of one variable in memory at a time
    (`pieces.pieces_of`: a large variable read in ranges of its rows): the state, or one large
    variable, is not copied whole before it is written (np.savez takes every array at once).
    An `Elsewhere` entry is written from the ranges of its rows `elsewhere` yields next."""
    with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for i, variable in enumerate(variables):
            with archive.open(f"{_member(i)}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(variable.dtype)),
                    "fortran_order": False, "shape": tuple(variable.shape)})
                if isinstance(variable, Elsewhere):
                    written = 0
                    while written < variable.slot.nbytes:
                        index, part = next(elsewhere)
                        if index != i:
                            raise RuntimeError(
                                f"checkpoint entry {index} arrived where {i} was due")
                        member.write(np.ascontiguousarray(part).data)
                        written += part.nbytes
                    continue
                for piece in pieces_of(variable):
                    member.write(np.ascontiguousarray(piece.read().numpy()).data)


def read_array(path: Path, index: int) -> np.ndarray:
    """Array `index` of a checkpoint (`Restored.path`)."""
    with zipfile.ZipFile(path / "state.npz") as archive:
        with archive.open(f"{_member(index)}.npy") as member:
            shape, _, dtype = _read_header(member)
            return np.frombuffer(member.read(), dtype).reshape(shape)


def _load_arrays(path: Path, variables: list) -> None:
    """Assign each array of a state file to its variable, one array in memory at a time, read
    from the member's bytes (whole: assigning ranges of rows made TensorFlow hold more)."""
    with zipfile.ZipFile(path) as archive:
        for i, variable in enumerate(variables):
            with archive.open(f"{_member(i)}.npy") as member:
                shape, fortran_order, dtype = _read_header(member)
                if fortran_order:
                    raise ValueError(f"{_member(i)} is stored in Fortran order")
                variable.assign(np.frombuffer(member.read(), dtype).reshape(shape))


def _read_header(member) -> tuple:
    """(shape, fortran_order, dtype) of an `.npy` member, its bytes read up to the data."""
    version = np.lib.format.read_magic(member)
    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    return header(member)


def _saved_shapes(path: Path, count: int) -> list[tuple]:
    """The shapes of a state file's first `count` arrays, read from their headers alone (a
    missing one raises `KeyError`, as `np.load` does)."""
    with zipfile.ZipFile(path) as archive:
        shapes = []
        for i in range(count):
            with archive.open(f"{_member(i)}.npy") as member:
                shapes.append(tuple(_read_header(member)[0]))
    return shapes


def global_batch_size(settings: dict) -> int | None:
    """The samples per update a run's settings give (checkpoints of the first format kept only
    num_workers, accumulation_steps and micro_batch_size)."""
    if settings.get("global_batch_size") is not None:
        return settings["global_batch_size"]
    parts = [settings.get(key) for key in ("num_workers", "accumulation_steps", "micro_batch_size")]
    return None if None in parts else parts[0] * parts[1] * parts[2]


def _check_settings(restored: Restored, settings: dict) -> None:
    saved = {**_ADDED_SETTINGS, **restored.settings,
             "global_batch_size": global_batch_size(restored.settings)}
    if "objective" in settings and saved.get("objective") != settings["objective"]:
        # Only the first objective lacks its record; a later change would add a line here.
        print(f"distaccum: warning: the checkpoint in {restored.path.parent} was trained with "
              "weighted losses divided by the sum of their weights; from here each loss follows "
              "its Keras reduction (the default divides by the number of loss elements), so "
              "weighted runs take other steps than before (loss_args {reduction: "
              "mean_with_sample_weight} divides by the weights' sum)", file=sys.stderr)
    # The data a run was trained on, recorded since 2026-12 (an older checkpoint resumes
    # unchecked): the order and the updates per epoch follow from its size, and a folder's from
    # its listing, so other data is another run.
    for key, said in (("training_samples", "{} samples"),
                      ("training_files", "files listed as {} (a digest)")):
        if key in saved and key in settings and saved[key] != settings[key]:
            raise ConfigError(
                f"dataset: the checkpoint in {restored.path.parent} was trained on "
                f"{said.format(saved[key])}, this dataset holds {said.format(settings[key])}; "
                "resuming needs the same data (the order follows from it). Received: "
                f"dataset={settings.get('dataset')!r} (use another logdir to start afresh)")
    for key in RESUME_MUST_MATCH:
        if key in settings and saved.get(key) != settings[key]:
            raise ConfigError(
                f"{key}: the checkpoint in {restored.path.parent} was written with "
                f"{key}={saved.get(key)!r}; resuming needs the same{_how_to_match(key, saved)}. "
                f"Received: {key}={settings[key]!r} (use another logdir to start afresh)"
            )


def _how_to_match(key: str, saved: dict) -> str:
    if key != "global_batch_size" or saved.get(key) is None:
        return ""
    return (f" (set global_batch_size={saved[key]} to resume on any num_workers and "
            "micro_batch_size that divide it)")
