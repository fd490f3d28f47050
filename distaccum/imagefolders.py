"""Folders of images, one subfolder per class (the layout `keras.utils.image_dataset_from_directory`
reads), as `MicroBatches` reads them.

The files are listed once, as Keras lists them (class subfolders in sorted order, files sorted
within each, the formats Keras decodes), and numbered in that order: sample i is the i-th file.
The listing is kept beside the checkpoints and read back while no folder changed; every worker
lists the folder (or reads the kept listing) and the workers check in one collective that they
found the same files, so the order, which follows from the listing, is the same on every worker. A
window of sample numbers is then a window of paths: each worker opens and decodes only the files
of its own updates, in parallel (`MicroBatches`' parse threads), with the functions Keras's own
reader uses, so the pixels are Keras's for the same options.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras.src.utils import dataset_utils  # Keras's own listing: the labels it infers

from distaccum import comm, recordfiles

# What Keras's image reader takes and decodes.
FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
COLOR_MODES = {"rgb": 3, "rgba": 4, "grayscale": 1}
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
                  "mitchellcubic")
# `image_dataset_from_directory`'s options that apply to reading one image, with its defaults.
OPTIONS = {"image_size": (256, 256), "color_mode": "rgb", "interpolation": "bilinear",
           "crop_to_aspect_ratio": False, "pad_to_aspect_ratio": False}


class ImageFolderError(ValueError):
    """A folder that is not one of class subfolders of images, or an option Keras would refuse:
    one line naming it. `in_options`: the fault is in the options, not the folder."""

    def __init__(self, message: str, in_options: bool = False) -> None:
        super().__init__(message)
        self.in_options = in_options


class ImageFolder:
    """A folder of class subfolders of images, labelled as Keras labels them: class i is the
    i-th subfolder in sorted order (or in `class_names`' order), labels are int32 class ids.

    Owns the listing (sample number → file, label) and decoding one file; not the order
    (`order`) nor the batching (`MicroBatches`). Build it on every worker (one collective checks
    that all found the same files).

    Args:
        directory: the folder (any path `tf.io.gfile` lists).
        image_size, color_mode, interpolation, crop_to_aspect_ratio, pad_to_aspect_ratio: as
            `keras.utils.image_dataset_from_directory` takes them.
        class_names: the classes and their order, say a training folder's for its validation
            folder (a class without a subfolder here then has no image, and keeps its label).
        listing_file: where to keep the listing (None: list every time), read back while no
            folder's modification time changed.
    """

    def __init__(self, directory: str, *, class_names=None, listing_file=None,
                 **options) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ImageFolderError(f"unknown image option {unknown[0]!r}; the options are "
                                   f"{', '.join(OPTIONS)}", in_options=True)
        self.directory = directory
        self.options = _checked({**OPTIONS, **options})
        (self.class_names, self.paths, self.labels, self.listing_seconds,
         self.listing_kept) = _listing(directory, class_names,
                                       None if listing_file is None else Path(listing_file))
        self.empty_classes = tuple(name for label, name in enumerate(self.class_names)
                                   if not np.any(self.labels == label))
        if len(self.paths) == 0:
            raise ImageFolderError(f"no image ({', '.join(FORMATS)}) in the class subfolders")
        self.fingerprint = _fingerprint(self.class_names, self.paths)
        _check_same_listing(self.fingerprint)
        self.sizes = (len(self.paths),)
        self.window_signature = (tf.TensorSpec([None], tf.string),
                                 tf.TensorSpec([None], tf.int32))
        self._path_array = np.array([p.encode() for p in self.paths], dtype=object)

    def reader(self, cached_chunks: int = 0):
        """A function of a window's sample numbers returning its paths and labels (the files
        are opened by `parse`, in parallel)."""
        return lambda samples: (self._path_array[samples], self.labels[samples])

    def parse(self, path, label):
        """One file read and decoded as Keras's `image_dataset_from_directory` reads it."""
        return decode(tf.io.read_file(path), **self.options), label

    def describe(self, samples: np.ndarray) -> str:
        """The micro-batch's files; the first that does not decode, when one does not (a bad
        micro-batch's report names it, beside TensorFlow's reason)."""
        for sample in samples.tolist():
            try:
                decode(tf.io.read_file(self.paths[sample]), **self.options)
            except (tf.errors.OpError, ValueError):
                return f"file {self.paths[sample]} (sample {sample}), which does not decode"
        names = ", ".join(self.paths[s] for s in samples[:3].tolist())
        return f"files {names}" + (f" and {len(samples) - 3} more" if len(samples) > 3 else "")


def decode(contents, image_size, color_mode, interpolation, crop_to_aspect_ratio,
           pad_to_aspect_ratio):
    """An image file's bytes as `image_dataset_from_directory` gives the image: decoded by
    `tf.image.decode_image` (first frame of a GIF), then resized to `image_size` (cropped or
    padded to its aspect ratio if asked), in Keras's image data format."""
    channels = COLOR_MODES[color_mode]
    image = tf.image.decode_image(contents, channels=channels, expand_animations=False)
    channels_first = keras.config.image_data_format() == "channels_first"
    if crop_to_aspect_ratio:
        if channels_first:
            image = tf.transpose(image, (2, 0, 1))
        image = keras.preprocessing.image.smart_resize(
            image, image_size, interpolation=interpolation,
            data_format=keras.config.image_data_format())
    else:
        if pad_to_aspect_ratio:
            image = tf.image.resize_with_pad(image, image_size[0], image_size[1],
                                             method=interpolation)
        else:
            image = tf.image.resize(image, image_size, method=interpolation)
        if channels_first:
            image = tf.transpose(image, (2, 0, 1))
    image.set_shape((channels, *image_size) if channels_first else (*image_size, channels))
    return image


def _checked(options: dict) -> dict:
    """The options as `decode` takes them, or an `ImageFolderError` naming the bad one."""
    size = options["image_size"]
    size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ImageFolderError(f"image_size must be [height, width] (or one int), each >= 1. "
                               f"Received: image_size={options['image_size']!r}",
                               in_options=True)
    if options["color_mode"] not in COLOR_MODES:
        raise ImageFolderError(f"color_mode must be one of {', '.join(COLOR_MODES)}. Received: "
                               f"color_mode={options['color_mode']!r}", in_options=True)
    interpolation = str(options["interpolation"]).lower()
    if interpolation not in INTERPOLATIONS:
        raise ImageFolderError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}. "
                               f"Received: interpolation={options['interpolation']!r}",
                               in_options=True)
    for name in ("crop_to_aspect_ratio", "pad_to_aspect_ratio"):
        if not isinstance(options[name], bool):
            raise ImageFolderError(f"{name} must be true or false. Received: "
                                   f"{name}={options[name]!r}", in_options=True)
    if options["crop_to_aspect_ratio"] and options["pad_to_aspect_ratio"]:
        raise ImageFolderError("give one of crop_to_aspect_ratio and pad_to_aspect_ratio, not "
                               "both", in_options=True)
    return {**options, "image_size": tuple(size), "interpolation": interpolation}


def _listing(directory: str, class_names, listing_file: Path | None
             ) -> tuple[tuple[str, ...], list[str], np.ndarray, float, bool]:
    """(class names, file paths, int32 labels, seconds, whether the kept listing was used),
    files in Keras's order: class by class, sorted within each (subfolders of a class
    included).

    A listing is kept in `listing_file` (the chief writes it) with the modification time of
    every folder it walked: adding, removing or renaming a file changes its folder's, so a kept
    listing whose folders all kept theirs is the listing, read back without walking the files.
    Local folders only: an object store's have no such time.
    """
    started = time.perf_counter()
    if not tf.io.gfile.isdir(directory):
        raise ImageFolderError("not a folder")
    if "://" in directory:  # an object store's "folders" have no modification time to check
        listing_file = None
    key = json.dumps([directory, None if class_names is None else list(class_names)])
    kept = recordfiles.read_kept(listing_file).get(key)
    if kept and all(_mtime(folder) == mtime for folder, mtime in kept["folders"].items()):
        return (tuple(kept["class_names"]), [os.path.join(directory, p) for p in kept["files"]],
                np.asarray(kept["labels"], np.int32), time.perf_counter() - started, True)
    names, paths, labels, folders = _walk(directory, class_names)
    if listing_file is not None and comm.is_chief():
        recordfiles.write_kept(listing_file, {key: {
            "class_names": list(names), "folders": folders, "labels": labels.tolist(),
            "files": [os.path.relpath(path, directory) for path in paths]}})
    return names, paths, labels, time.perf_counter() - started, False


def _walk(directory: str, class_names) -> tuple[tuple[str, ...], list[str], np.ndarray, dict]:
    """Keras's listing of the folder, and the modification time of every folder walked."""
    subfolders = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(directory)
                        if not name.startswith(".")
                        and tf.io.gfile.isdir(os.path.join(directory, name)))
    if class_names is None:
        class_names = subfolders
    else:
        unknown = sorted(set(subfolders) - set(class_names))
        if unknown:
            raise ImageFolderError(f"class folder {unknown[0]!r} is not one of the training "
                                   f"classes ({', '.join(class_names)})")
    if not class_names:
        raise ImageFolderError("no class subfolder (a folder of one subfolder per class, as "
                               "keras.utils.image_dataset_from_directory reads)")
    present = [(label, name) for label, name in enumerate(class_names) if name in subfolders]
    with ThreadPoolExecutor(min(32, len(present))) as threads:
        found = list(threads.map(
            lambda item: dataset_utils.index_subdirectory(
                os.path.join(directory, item[1]), {item[1]: item[0]}, False, FORMATS),
            present))
    paths = [os.path.join(directory, name) for names, _ in found for name in names]
    labels = np.array([label for _, labels in found for label in labels], np.int32)
    folders = [directory] + [root for _, name in present
                             for root, _, _ in os.walk(os.path.join(directory, name))] \
        if "://" not in directory else []
    return tuple(class_names), paths, labels, {folder: _mtime(folder) for folder in folders}


def _mtime(folder: str) -> int | None:
    """A local folder's modification time, in ns (TensorFlow's file stat rounds to seconds);
    None for a folder that is gone."""
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def _fingerprint(class_names: tuple, paths: list[str]) -> str:
    """A digest of the listing: what a checkpoint records, so that a resume on other files is
    refused."""
    digest = hashlib.sha256("\n".join(class_names).encode())
    for path in paths:
        digest.update(b"\0" + path.encode())
    return digest.hexdigest()[:16]


def _check_same_listing(fingerprint: str) -> None:
    """Every worker found the same files (one collective): the order follows from the listing,
    so a worker that listed a file being written, say, would train on another order."""
    value = int(fingerprint[:13], 16)  # 52 bits: exact in the collective's int64
    with comm.collective("listing the image folders"):
        high, low = comm.current().max_all(
            tf.constant([value, (1 << 52) - value], tf.int64)).numpy().tolist()
    if high != value or low != (1 << 52) - value:
        raise ImageFolderError("the workers listed different files (is a file being written, "
                               "or the folder not the same on every machine?)")
