"""Fashion-MNIST and grey-level data: the reader on small IDX files written here (each of
torchvision's layouts), where it looks by default, what happens when it is absent, and
the run-config keys that decide binarization (``binarize``, ``synthetic-binarize``)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from fedaug_flwr import data
from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.data import (
    DataError,
    Digits,
    binarize,
    load_idx_folder,
    load_node_data,
    load_source,
    resolve_source,
)
from fedaug_flwr.protocol import TaskConfig
from fedaug_flwr.training import TensorData
from tests.data_files import idx_bytes, write_npz

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_fashion_folder(folder, n_train=30, n_test=10, compress=False, seed=0) -> dict:
    """Four IDX files of random grey-level 'clothing' (0..255) with labels 0..9."""
    rng = np.random.default_rng(seed)
    arrays = {
        FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        FILES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        TEST_FILES[0]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST_FILES[1]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        payload = idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return arrays


@pytest.fixture
def offline(monkeypatch):
    """Both downloads fail (as on a machine without internet); the calls are recorded."""
    calls = []

    def fail(folder):
        calls.append(folder)
        raise OSError("no network")

    monkeypatch.setattr(data, "download_mnist", fail)
    monkeypatch.setattr(data, "download_fashion_mnist", fail)
    return calls


# ------------------------------------------------------------------ the reader


@pytest.mark.parametrize("layout", ["", "raw", "FashionMNIST/raw"])
@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_is_read_from_each_torchvision_layout_as_grey_levels(
    tmp_path, layout, compress
):
    arrays = write_fashion_folder(tmp_path / layout if layout else tmp_path, compress=compress)
    loaded = load_idx_folder(tmp_path, "fashion-mnist")
    assert loaded.source == "fashion-mnist" and loaded.grey
    assert loaded.location == str(tmp_path / layout if layout else tmp_path)
    assert loaded.pool.grey and loaded.test.grey
    # grey levels kept byte for byte: no binarization of clothing
    assert np.array_equal(loaded.pool.images, arrays[FILES[0]])
    assert np.array_equal(loaded.test.images, arrays[TEST_FILES[0]])
    assert loaded.pool.labels.tolist() == arrays[FILES[1]].tolist()
    assert loaded.pool.labels.dtype == np.int64
    # a subset keeps its kind
    assert loaded.pool.subset(np.arange(5)).grey


def test_mnist_layout_is_not_fashion_mnists(tmp_path):
    write_fashion_folder(tmp_path / "MNIST" / "raw")
    with pytest.raises(DataError, match=r"no Fashion-MNIST IDX files .* FashionMNIST/raw/"):
        load_idx_folder(tmp_path, "fashion-mnist")


def test_binarize_on_binarizes_fashion_mnist_and_off_keeps_mnist_grey(tmp_path):
    arrays = write_fashion_folder(tmp_path / "FashionMNIST" / "raw")
    binary = load_idx_folder(tmp_path, "fashion-mnist", binarized=True)
    assert not binary.grey
    assert np.array_equal(binary.pool.images, binarize(arrays[FILES[0]]))
    write_fashion_folder(tmp_path / "MNIST" / "raw", seed=1)
    grey_digits = load_idx_folder(tmp_path, "mnist", binarized=False)
    assert grey_digits.grey and grey_digits.pool.images.max() > 1


def test_load_source_takes_the_data_sets_own_choice_by_default(tmp_path):
    write_fashion_folder(tmp_path / "raw")
    assert load_source("fashion-mnist", str(tmp_path)).grey
    assert not load_source("fashion-mnist", str(tmp_path), binarized=True).grey
    assert not load_source("mnist-5k", "").grey
    assert load_source("mnist-5k", "", binarized=False).grey
    assert load_source("mnist-5k", "") is load_source("mnist-5k", "", binarized=True)  # cached
    grey_digits = load_source("mnist-5k", "", binarized=False).pool.images
    assert grey_digits.max() == 255 and len(np.unique(grey_digits)) > 2


def test_too_dark_grey_levels_are_refused_as_grey_too(tmp_path):
    folder = tmp_path / "raw"
    arrays = write_fashion_folder(folder)
    (folder / FILES[0]).write_bytes(idx_bytes(arrays[FILES[0]] // 16))
    with pytest.raises(DataError, match=r"pixels only reach 15: read as grey levels .* black"):
        load_idx_folder(tmp_path, "fashion-mnist")


# ------------------------------------------------------------------ where and when not


def test_fashion_mnist_has_its_own_default_folder_and_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDAUG_FASHION_DATA_DIR", raising=False)
    monkeypatch.setenv("FEDAUG_DATA_DIR", str(tmp_path / "digits"))
    assert data.data_dir_for("", "fashion-mnist") == data.DEFAULT_FASHION_DATA_DIR
    assert data.DEFAULT_FASHION_DATA_DIR.name == "fashion-mnist"
    monkeypatch.setenv("FEDAUG_FASHION_DATA_DIR", str(tmp_path / "clothes"))
    assert data.data_dir_for("", "fashion-mnist") == tmp_path / "clothes"
    assert data.data_dir_for("", "mnist") == tmp_path / "digits"
    assert data.data_dir_for(str(tmp_path / "given"), "fashion-mnist") == tmp_path / "given"
    write_fashion_folder(tmp_path / "clothes" / "FashionMNIST" / "raw")
    assert resolve_source("fashion-mnist", "") == ("fashion-mnist", str(tmp_path / "clothes"), "")


def test_fashion_mnist_does_not_fall_back_to_digits(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("FEDAUG_FASHION_DATA_DIR", str(tmp_path / "cache"))  # the default
    with pytest.raises(DataError) as raised:
        resolve_source("fashion-mnist", "")
    message = str(raised.value)
    assert "no network" in message and "no offline substitute" in message
    assert "FEDAUG_FASHION_DATA_DIR" in message and "data-dir" in message
    assert offline == [tmp_path / "cache"]  # it tried the download, into the default folder


def test_an_explicit_fashion_data_dir_that_cannot_be_used_is_an_error(tmp_path, offline):
    with pytest.raises(DataError, match=r"data-dir '.*clothes' does not exist"):
        resolve_source("fashion-mnist", str(tmp_path / "clothes"))
    a_file = tmp_path / "fashion.tar"
    a_file.write_bytes(b"x")
    with pytest.raises(DataError, match=r"is not a folder; .*Fashion-MNIST's IDX files"):
        resolve_source("fashion-mnist", str(a_file))
    assert offline == []  # nothing downloaded into a mistyped path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"holds no Fashion-MNIST IDX files .* download"):
        resolve_source("fashion-mnist", str(empty))
    assert offline == [empty]


def test_a_successful_download_is_used(tmp_path, monkeypatch):
    def download(folder):
        write_fashion_folder(folder / "FashionMNIST" / "raw")
        return folder

    monkeypatch.setattr(data, "download_fashion_mnist", download)
    target = tmp_path / "new"
    target.mkdir()
    assert resolve_source("fashion-mnist", str(target)) == ("fashion-mnist", str(target), "")


def test_mnist_still_falls_back_to_mnist5k_at_the_default_location(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("FEDAUG_DATA_DIR", str(tmp_path / "cache"))
    source, location, reason = resolve_source("mnist", "")
    assert (source, location) == ("mnist-5k", "") and "no network" in reason


# ------------------------------------------------------------------ a node's own data


def test_a_nodes_own_data_follows_the_runs_binarization(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20)
    path = write_npz(tmp_path / "grey.npz", grey, labels)
    assert np.array_equal(load_node_data(path, binarized=False).images, grey)
    assert np.array_equal(load_node_data(path).images, binarize(grey))
    # 0/1 images in a grey-level run are black and white: 0 and 255
    binary = write_npz(tmp_path / "binary.npz", binarize(grey), labels)
    as_grey = load_node_data(binary, binarized=False)
    assert as_grey.grey and set(np.unique(as_grey.images)) == {0, 255}


# ------------------------------------------------------------------ representation


def test_digits_know_their_kind_and_refuse_grey_bytes_called_binary():
    images = np.full((2, 28, 28), 200, dtype=np.uint8)
    labels = np.array([1, 2])
    with pytest.raises(DataError, match=r"reach 200: grey-level images .* grey=True"):
        Digits(images, labels)
    with pytest.raises(DataError, match="must be uint8"):
        Digits(images.astype(np.float32) / 255, labels, grey=True)
    grey = Digits(images, labels, grey=True)
    assert grey.scale == 255 and Digits(images // 200, labels).scale == 1


def test_tensor_data_scales_grey_levels_to_0_1_and_refuses_mixed_kinds():
    labels = np.array([0, 1])
    grey = Digits(np.array([[[0] * 28] * 28, [[255] * 27 + [51]] * 28], np.uint8), labels, True)
    tensors = TensorData.from_digits(grey)
    assert tensors.images.dtype == torch.float32
    assert tensors.images.min() == 0.0 and tensors.images.max() == 1.0
    assert torch.isclose(tensors.images[1, 0, 0, -1], torch.tensor(0.2))
    binary = Digits(np.ones((2, 28, 28), np.uint8), labels)
    assert TensorData.from_digits(binary).images.max() == 1.0
    with pytest.raises(ValueError, match="binary .* and grey-level .* in one training set"):
        TensorData.from_digits(grey, binary)


# ------------------------------------------------------------------ run config


def test_binarize_auto_is_the_data_sets_choice_and_can_be_overridden():
    assert AppConfig.from_run_config({}).binarized  # mnist-5k: the study's binary digits
    assert AppConfig.from_run_config({"dataset": "mnist"}).binarized
    assert not AppConfig.from_run_config({"dataset": "fashion-mnist"}).binarized
    on = AppConfig.from_run_config({"dataset": "fashion-mnist", "binarize": "on"})
    assert on.binarized and on.synthetic_binarize == "rescale"
    off = AppConfig.from_run_config({"dataset": "mnist", "binarize": "off"})
    assert not off.binarized
    with pytest.raises(ConfigError, match=r"'binarize' must be one of \['auto', 'on', 'off'\]"):
        AppConfig.from_run_config({"binarize": "yes"})
    with pytest.raises(ConfigError, match="'dataset' must be one of"):
        AppConfig.from_run_config({"dataset": "fashion"})


def test_synthetic_binarize_is_recorded_off_for_grey_data_and_off_refused_for_binary():
    for value in ("rescale", "round", "off"):
        config = AppConfig.from_run_config(
            {"dataset": "fashion-mnist", "synthetic-binarize": value}
        )
        assert config.synthetic_binarize == "off"
        # what summary.json records and every message carries round-trips unchanged
        assert AppConfig.from_run_config(config.to_run_config()) == config
    with pytest.raises(ConfigError, match=r"synthetic-binarize='off' .* binarize='auto'"):
        AppConfig.from_run_config({"synthetic-binarize": "off"})
    with pytest.raises(ConfigError, match=r"synthetic-binarize='off' .* binarize='on'"):
        AppConfig.from_run_config(
            {"dataset": "fashion-mnist", "binarize": "on", "synthetic-binarize": "off"}
        )


def test_the_message_config_carries_fashion_mnist_and_binarize(tmp_path):
    config = AppConfig.from_run_config({"dataset": "fashion-mnist", "binarize": "auto"})
    task = TaskConfig(config, "fashion-mnist", str(tmp_path))
    again = TaskConfig.from_record(task.to_record())
    assert again == task and not again.app.binarized
