"""A folder of class subfolders of images as data: Keras's labels and pixels, each worker opening
its own files only, Keras's large-batch steps, and one line for a file that will not decode."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import distaccum
from distaccum import comm, sources
from distaccum import config as config_module
from distaccum.imagefolders import ImageFolder, ImageFolderError

import scenarios

# Images per class; "emu" has a folder and no image (it keeps its label, as in Keras).
CLASSES = {"cat": 9, "dog": 6, "emu": 0, "fox": 5}
MICRO_BATCH_SIZE, K = 4, 2


def write_folder(root, classes=CLASSES, seed: int = 0):
    """Class subfolders of PNG and JPEG files of random sizes (one in a nested folder), and a
    file Keras does not read; returns the folder as a config gives it (ending in /)."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name / "nested").mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (rng.integers(9, 20), rng.integers(9, 20), 3), "uint8")
            encoded = (tf.io.encode_png(pixels) if i % 2 else tf.io.encode_jpeg(pixels)).numpy()
            where = root / name / ("nested" if i == 1 else "")
            (where / f"{i:02d}.{'png' if i % 2 else 'jpg'}").write_bytes(encoded)
        (root / name / "notes.txt").write_text("not an image")
    return f"{root}/"


def _keras_images(folder: str, **options):
    """Keras's own `image_dataset_from_directory` over the folder, in its listing order."""
    dataset = keras.utils.image_dataset_from_directory(folder, shuffle=False, batch_size=None,
                                                       verbose=False, **options)
    pairs = list(dataset.as_numpy_iterator())
    return np.stack([x for x, _ in pairs]), np.array([y for _, y in pairs]), dataset.class_names


@pytest.mark.parametrize("options", [
    {"image_size": (12, 16)},
    {"image_size": (10, 10), "crop_to_aspect_ratio": True, "interpolation": "bicubic"},
    {"image_size": (8, 14), "pad_to_aspect_ratio": True, "color_mode": "grayscale"},
    {"image_size": 7, "interpolation": "nearest"},
], ids=["resize", "crop_bicubic", "pad_grayscale", "nearest"])
def test_pixels_and_labels_are_kerases_for_the_same_options(tmp_path, options):
    folder = write_folder(tmp_path)
    images = ImageFolder(folder, **options)
    batches = distaccum.micro_batches(images, MICRO_BATCH_SIZE)
    got = list(batches.evaluation().as_numpy_iterator())  # one worker: every file, in order
    x, y = np.concatenate([b[0] for b in got]), np.concatenate([b[1] for b in got])
    expected_x, expected_y, class_names = _keras_images(folder, **options)
    assert images.class_names == tuple(class_names) == tuple(CLASSES)
    assert images.empty_classes == ("emu",)
    assert x.dtype == expected_x.dtype and x.shape == expected_x.shape
    np.testing.assert_array_equal(x, expected_x)
    np.testing.assert_array_equal(y, expected_y)
    assert sorted(set(y.tolist())) == [0, 1, 3]  # fox keeps label 3 past the empty emu


def test_each_of_two_workers_opens_its_own_files_only(tmp_path, monkeypatch):
    images = ImageFolder(write_folder(tmp_path), image_size=(8, 8))
    read, opened = images.reader(), []
    # The windows' paths are what `parse` opens: count their samples.
    monkeypatch.setattr(images, "reader", lambda cached_chunks=0: lambda s: (
        opened[-1].extend(s.tolist()), read(s))[1])
    for rank in (0, 1):  # each worker's view, in this process: the order is arithmetic
        monkeypatch.setattr(comm, "num_workers", lambda: 2)
        monkeypatch.setattr(comm, "rank", lambda rank=rank: rank)
        batches = distaccum.micro_batches(images, MICRO_BATCH_SIZE, partitions=4)
        opened.append([])
        for epoch in (1, 2):
            list(batches.epoch(epoch, K))
    total = sum(CLASSES.values())
    assert sorted(opened[0] + opened[1]) == sorted(list(range(total)) * 2)  # 2 epochs
    assert all(len(mine) <= 1.1 * total for mine in opened)  # 2 epochs of half each


def _classifier() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Rescaling(1 / 255),
                             keras.layers.Flatten(), keras.layers.Dense(len(CLASSES))])


@pytest.mark.rounding
def test_training_on_a_folder_takes_the_steps_of_kerases_pixels_as_arrays(tmp_path):
    """The arrays' run takes Keras's large-batch steps (test_randomaccess, test_trainer): the
    same pixels in the same order must give it bit for bit."""
    folder = write_folder(tmp_path)
    options = {"image_size": (6, 6), "color_mode": "grayscale"}

    def trained(data):
        model = _classifier()
        trainer = distaccum.Trainer(
            model, keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            accumulation_steps=K)
        trainer.fit(distaccum.micro_batches(data, MICRO_BATCH_SIZE, seed=5), epochs=2)
        return scenarios.weights_of(model)

    x, y, _ = _keras_images(folder, **options)
    for got, expected in zip(trained(ImageFolder(folder, **options)), trained((x, y))):
        np.testing.assert_array_equal(got, expected)


def test_a_file_that_will_not_decode_stops_fit_in_one_line_naming_it(tmp_path):
    folder = write_folder(tmp_path)
    (tmp_path / "dog" / "03.png").write_bytes(b"\x89PNG but cut short")
    model = _classifier()
    trainer = distaccum.Trainer(
        model, keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), accumulation_steps=K)
    images = ImageFolder(folder, image_size=(6, 6), color_mode="grayscale")
    with pytest.raises(distaccum.BadMicroBatch, match=r"file .*/dog/03\.png \(sample 11\), "
                       "which does not decode$") as raised:
        trainer.fit(distaccum.micro_batches(images, MICRO_BATCH_SIZE), epochs=1)
    assert "\n" not in str(raised.value)
    stopped_at = int(re.search(r"stopped at update step (\d+)", str(raised.value)).group(1))
    assert int(trainer.optimizer.iterations) == stopped_at - 1  # that update not applied


def _config(**keys) -> config_module.TrainConfig:
    return config_module.TrainConfig(micro_batch_size=MICRO_BATCH_SIZE, epochs=1, **keys)


def test_validation_folder_takes_the_training_classes_and_notes_say_what_was_listed(tmp_path):
    train = write_folder(tmp_path / "train")
    # Validation lacks dog and emu: fox is still label 3.
    validation = write_folder(tmp_path / "val", {"cat": 2, "fox": 3}, seed=1)
    loaded = sources.load_data(_config(dataset=train, validation_dataset=validation,
                                       image_options={"image_size": [5, 5]}))
    assert loaded.train.samples.class_names == loaded.validation.samples.class_names
    labels = np.concatenate([y for _, y in loaded.validation.evaluation().as_numpy_iterator()])
    np.testing.assert_array_equal(labels, [0, 0, 3, 3, 3])
    assert loaded.train.element_spec[0].shape.as_list() == [None, 5, 5, 3]
    assert "distaccum: dataset: 20 images in 4 classes, listed in" in loaded.notes[0]
    assert ("distaccum: warning: dataset: class folder 'emu' holds no image; it keeps label 2, "
            "as in Keras") in loaded.notes
    assert any("validation_dataset: class folder 'dog' holds no image" in n for n in loaded.notes)


@pytest.mark.parametrize("keys, message", [
    ({"validation_dataset": "VAL/"},
     r"^validation_dataset: class folder 'owl' is not one of the training classes \(cat, dog, "
     r"emu, fox\)\. Received: validation_dataset='.*/val/'$"),
    ({"image_options": {"image_size": [0, 4]}},
     r"^image_options: image_size must be \[height, width\] \(or one int\), each >= 1\. "
     r"Received: image_size=\[0, 4\]$"),
    ({"image_options": {"colour_mode": "rgb"}},
     r"^image_options: unknown image option 'colour_mode'; the options are image_size, "),
    ({"image_options": {"interpolation": "cubic"}}, r"^image_options: interpolation must be one"),
    ({"dataset": "EMPTY/"}, r"^dataset: no class subfolder .*Received: dataset='.*/empty/'$"),
    ({"dataset": "MISSING/"}, r"^dataset: not a folder\. Received: dataset='.*/missing/'$"),
], ids=["unknown_validation_class", "image_size", "unknown_option", "interpolation",
        "no_class_folder", "missing"])
def test_bad_folder_or_option_is_one_line_naming_the_key(tmp_path, keys, message):
    train = write_folder(tmp_path / "train")
    write_folder(tmp_path / "val", {"cat": 1, "owl": 1})
    (tmp_path / "empty").mkdir()
    folders = {"VAL/": f"{tmp_path}/val/", "EMPTY/": f"{tmp_path}/empty/",
               "MISSING/": f"{tmp_path}/missing/"}
    keys = {key: folders.get(value, value) if isinstance(value, str) else value
            for key, value in {"dataset": train, **keys}.items()}
    with pytest.raises(config_module.ConfigError, match=message):
        sources.load_data(_config(**keys))


def test_image_options_without_a_folder_are_refused_and_parse_takes_no_folder():
    with pytest.raises(config_module.ConfigError, match=r"^image_options: is for folders of "
                       r"images .*dataset='digits' would ignore it"):
        _config(image_options={"image_size": 8})
    with pytest.raises(config_module.ConfigError, match=r"^dataset: must be a glob of TFRecord "
                       "files when parse is set"):
        _config(dataset="/data/train/", parse="my.module:parse")


def test_workers_that_list_different_files_stop_in_one_line(tmp_path, monkeypatch):
    folder = write_folder(tmp_path)

    backend = comm.current()
    # Another worker's listing is the maximum.
    monkeypatch.setattr(backend, "max_all", lambda values: values + tf.constant([1, 0], tf.int64))
    with pytest.raises(ImageFolderError, match=r"^the workers listed different files"):
        ImageFolder(folder)


def test_listing_is_kept_beside_the_index_and_listed_again_when_a_folder_changes(tmp_path):
    folder = write_folder(tmp_path / "train")
    index = tmp_path / "logs" / "record-index.json"
    config = _config(dataset=folder, image_options={"image_size": [5, 5]})
    first = sources.load_data(config, index)
    kept = sources.load_data(config, index)
    assert "20 images in 4 classes, listed in" in first.notes[0]
    assert "20 images in 4 classes, listing kept from an earlier run in" in kept.notes[0]
    assert kept.train.fingerprint == first.train.fingerprint
    assert (index.parent / sources.IMAGE_LISTING).is_file()
    # A file added in a nested folder: that folder's time changed, so the folder is listed again.
    (tmp_path / "train" / "dog" / "nested" / "99.png").write_bytes(
        (tmp_path / "train" / "dog" / "nested" / "01.png").read_bytes())
    again = sources.load_data(config, index)
    assert "21 images in 4 classes, listed in" in again.notes[0]
    assert again.train.fingerprint != first.train.fingerprint
