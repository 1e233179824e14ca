"""Every entry point rejects bad input before work starts, naming the input and what is allowed.

One parametrized test per entry point: the run config (AppConfig and the
ServerApp), the config a ClientApp receives in a message, the node config,
data files, and the command lines of the launcher and of the deployment
script. (The experiment YAML of the sweeps is not part of this branch.)
"""

from __future__ import annotations

import gzip
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

import client_app
from fedaug_flwr import deploy, launch
from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.data import DataError, load_node_data
from fedaug_flwr.models import CVAE
from fedaug_flwr.node import NodeConfigError
from fedaug_flwr.partition import PartitionError
from fedaug_flwr.protocol import CONFIG, GENERATOR, IMPUTE, TaskConfig
from server_app import build_server_app
from tests.conftest import make_context, make_message
from tests.data_files import idx_bytes, real_digits, write_idx_folder, write_npz
from tests.local_grid import LocalGrid, set_task_identity

# ------------------------------------------------------------------ run config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"cvae-rounds": "3"}, r"'cvae-rounds' must be an integer >= 1; got '3' \(str\)"),
        ({"cvae-rounds": 1.5}, r"'cvae-rounds' must be an integer >= 1; got 1.5"),
        ({"clf-rounds": True}, r"'clf-rounds' must be an integer >= 1; got True"),
        ({"cvae-lr": "fast"}, r"'cvae-lr' must be a number > 0"),
        ({"cvae-rounds": 0}, r"'cvae-rounds' must be an integer >= 1; got 0"),
        ({"num-synthetic": -1}, r"'num-synthetic' must be an integer >= 0"),
        ({"fraction-train": 1.5}, r"'fraction-train' must be a number in \(0, 1\]"),
        ({"dirichlet-beta": 0.0}, r"'dirichlet-beta' must be a number > 0"),
        ({"cvae-lr": float("nan")}, r"'cvae-lr' must be a number > 0; got nan"),
        ({"round-timeout": 0.0}, r"'round-timeout' must be a number of seconds > 0"),
        ({"min-partition-size": 2}, r"'min-partition-size' must be an integer >= 3"),
        (
            {"dataset": "cifar10"},
            r"'dataset' must be one of \['mnist-5k', 'mnist', 'fashion-mnist'\]",
        ),
        ({"imputation": "random"}, r"'imputation' must be one of \['none', 'uniform'"),
        ({"cvae-round": 3}, r"unknown run-config key\(s\) \['cvae-round'\]; known keys:"),
        ({"val-fraction": 0.5, "test-fraction": 0.4}, r"must leave at least 10% for training"),
        ({"binarize": "grey"}, r"'binarize' must be one of \['auto', 'on', 'off'\]"),
        ({"synthetic-binarize": "off"}, r"synthetic-binarize='off' \(grey-level synthetic"),
        ({"proximal-mu": 0.1, "pretrain": "local"}, r"proximal-mu=0.1 .* pretrain='local'"),
    ],
)
def test_bad_run_config_is_rejected_before_the_server_writes_anything(
    overrides, expected, tmp_path
):
    with pytest.raises(ConfigError, match=expected):
        AppConfig.from_run_config(overrides)
    # The ServerApp checks the same way before it creates the results folder.
    set_task_identity()
    output_dir = tmp_path / "results"
    run_config = {**overrides, "output-dir": str(output_dir)}
    grid = LocalGrid(client_app.app, [{"partition-id": 0, "num-partitions": 1}])
    with pytest.raises(ConfigError, match=expected):
        build_server_app()(grid, Context(1, 1, {}, RecordDict(), run_config))
    assert not output_dir.exists()
    assert grid.delivered == []


# ------------------------------------------------------ config inside a message


def _impute_message(config: dict | None):
    content = RecordDict({GENERATOR: ArrayRecord(CVAE(3).state_dict())})
    if config is not None:
        content[CONFIG] = ConfigRecord(config)
    return make_message(content, IMPUTE)


def _good_message_config() -> dict:
    return dict(TaskConfig(AppConfig.from_run_config({}), "mnist-5k", "").to_record())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"cvae-lr": "fast"}, r"'cvae-lr' must be a number > 0"),
        ({"num-synthetic": -5}, r"'num-synthetic' must be an integer >= 0"),
        ({"imputation": "everything"}, r"'imputation' must be one of"),
        ({"not-a-key": 1}, r"unknown run-config key\(s\) \['not-a-key'\]"),
        (
            {"data-source": "cifar10"},
            r"'data-source' must be one of \['mnist-5k', 'mnist', 'fashion-mnist'\]",
        ),
        ({"data-source": None}, r"message config lacks \['data-source'\]"),
        (None, r"query.impute message lacks its 'config' record"),
    ],
)
def test_clientapp_rejects_a_bad_message_config(change, expected):
    if change is None:
        message = _impute_message(None)
    else:
        config = _good_message_config()
        config.update({k: v for k, v in change.items() if v is not None})
        for key in [k for k, v in change.items() if v is None]:
            del config[key]
        message = _impute_message(config)
    context = make_context(0, 3)
    with pytest.raises(ConfigError, match=expected):
        client_app.app(message, context)
    assert len(context.state) == 0  # nothing was kept on the node


# ------------------------------------------------------------------ node config


@pytest.mark.parametrize(
    ("node_config", "error", "expected"),
    [
        ({}, NodeConfigError, r"needs partition-id and either num-partitions \(a Dirichlet"),
        ({"partition-id": 0}, NodeConfigError, r"or data-path \(the node's own data\)"),
        ({"data-path": "/data/site.npz"}, NodeConfigError, r"needs partition-id"),
        (
            {"partition-id": "0", "num-partitions": 3},
            NodeConfigError,
            r"'partition-id' must be an integer >= 0, different on every SuperNode; "
            r"got '0' \(str\)",
        ),
        (
            {"partition-id": True, "num-partitions": 3},
            NodeConfigError,
            r"'partition-id' must be an integer",
        ),
        (
            {"partition-id": 3, "num-partitions": 3},
            NodeConfigError,
            r"'partition-id' must lie in 0..num-partitions-1 \(0..2\); got 3",
        ),
        ({"partition-id": -1, "num-partitions": 3}, NodeConfigError, r"got -1"),
        (
            {"partition-id": 0, "num-partitions": 0},
            NodeConfigError,
            r"'num-partitions' must be >= 1; got 0",
        ),
        (
            {"partition-id": 0, "num-partitions": 3, "site": "x"},
            NodeConfigError,
            r"unknown node-config key\(s\) \['site'\]; allowed: partition-id",
        ),
        ({"data-path": 7}, NodeConfigError, r"'data-path' must be a quoted path string"),
        (
            {"partition-id": 0, "data-path": "/nonexistent/site.npz"},
            DataError,
            r"data-path '/nonexistent/site.npz' does not exist; it must be an .npz file",
        ),
        (
            {"data-path": "tiny.npz"},
            PartitionError,
            r"holds 6 images, fewer than min-partition-size=40: too small to split",
        ),
        (
            {"partition-id": 0, "num-partitions": 500},
            PartitionError,
            r"4000 images cannot give 500 clients at least 40 each",
        ),
    ],
)
def test_clientapp_rejects_a_bad_node_config(node_config, error, expected, tmp_path):
    if node_config.get("data-path") == "tiny.npz":
        tiny = write_npz(tmp_path / "tiny.npz", *real_digits(6))
        node_config = {"partition-id": 0, "data-path": str(tiny)}
    context = Context(1, 7, node_config, RecordDict(), {})
    with pytest.raises(error, match=expected):
        client_app.app(_impute_message(_good_message_config()), context)
    assert len(context.state) == 0


# ------------------------------------------------------------------- data files


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it would create a file. It must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _make_bad_data(kind: str, folder: Path) -> Path:
    images, labels = real_digits(30)
    good = folder / "good.npz"
    write_npz(good, images, labels)
    if kind == "missing":
        return folder / "absent.npz"
    if kind == "dangling-link":
        (folder / "link.npz").symlink_to(folder / "gone.npz")
        return folder / "link.npz"
    if kind == "not-npz":
        (folder / "digits.csv").write_text("0,1,2\n")
        return folder / "digits.csv"
    if kind == "truncated-npz":
        (folder / "cut.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return folder / "cut.npz"
    if kind == "garbage-npz":
        (folder / "junk.npz").write_bytes(os.urandom(2000))
        return folder / "junk.npz"
    if kind == "unreadable-npz":
        # a Unix socket: no user can read it, root included (who ignores permission bits)
        with socket.socket(socket.AF_UNIX) as unreadable:
            unreadable.bind(str(folder / "s.npz"))
        return folder / "s.npz"
    if kind == "npz-without-y":
        np.savez(folder / "x-only.npz", x=images)
        return folder / "x-only.npz"
    if kind == "pickled-npz":
        payload = np.array([_RunsCodeWhenUnpickled(folder / "PWNED")], dtype=object)
        np.savez(folder / "pickled.npz", x=payload, y=labels[:1])
        return folder / "pickled.npz"
    arrays = {
        "wrong-shape": (np.zeros((30, 32, 32), np.uint8), labels),
        "flat-images": (images.reshape(30, 784), labels),
        "float-images": (images.astype(np.float32) / 255, labels),
        "label-10": (images, np.where(labels == labels[0], 10, labels)),
        "negative-label": (images, np.concatenate([[-1], labels[1:]])),
        "float-labels": (images, labels.astype(np.float64)),
        "too-few-labels": (images, labels[:-1]),
        "empty": (images[:0], labels[:0]),
        "dark-images": ((images // 17).astype(np.uint8), labels),  # 0..15: all black if rounded
    }
    if kind in arrays:
        return write_npz(folder / f"{kind}.npz", *arrays[kind])
    idx = folder / "idx"
    if kind == "idx-empty-folder":
        idx.mkdir()
        return idx
    write_idx_folder(idx, images, labels)
    images_file, labels_file = idx / "train-images-idx3-ubyte", idx / "train-labels-idx1-ubyte"
    if kind == "idx-no-labels":
        labels_file.unlink()
    elif kind == "idx-truncated":
        images_file.write_bytes(images_file.read_bytes()[:-100])
    elif kind == "idx-bad-magic":
        images_file.write_bytes(b"\x1f\x8b" + images_file.read_bytes()[2:])
    elif kind == "idx-label-10":
        labels_file.write_bytes(idx_bytes(np.full(30, 10)))
    elif kind == "idx-wrong-shape":
        images_file.write_bytes(idx_bytes(np.zeros((30, 20, 20))))
    elif kind == "idx-corrupt-gz":
        packed = bytearray(gzip.compress(images_file.read_bytes()))
        packed[20:30] = b"\xff" * 10
        images_file.unlink()
        (idx / "train-images-idx3-ubyte.gz").write_bytes(bytes(packed))
    return idx


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", r"data-path '.*absent.npz' does not exist; it must be an .npz file"),
        ("dangling-link", r"link.npz' does not exist"),
        ("not-npz", r"digits.csv' is neither a folder nor an .npz file"),
        ("truncated-npz", r"cut.npz' is not a readable .npz file \(corrupt, truncated"),
        ("garbage-npz", r"junk.npz' is not a readable .npz file"),
        ("unreadable-npz", r"/s.npz' is not a readable .npz file"),
        ("npz-without-y", r"x-only.npz' lacks array\(s\) \['y'\] \(has \['x'\]\)"),
        ("pickled-npz", r"pickled.npz' holds arrays that cannot be read without unpickling"),
        ("wrong-shape", r"images must have shape \(N, 28, 28\); got \(30, 32, 32\)"),
        ("flat-images", r"images must have shape \(N, 28, 28\); got \(30, 784\)"),
        ("float-images", r"images must be uint8 \(0..255 grey levels or 0/1\); got dtype float32"),
        ("label-10", r"labels must lie in 0..9; got 0..10"),
        ("negative-label", r"labels must lie in 0..9; got -1"),
        ("float-labels", r"labels must be integers 0..9; got dtype float64"),
        ("too-few-labels", r"need one label per image, shape \(30,\); got \(29,\)"),
        ("empty", r"empty.npz' holds no images"),
        ("dark-images", r"dark-images.npz': uint8 pixels only reach 15: .* all black"),
        ("idx-empty-folder", r"idx' holds no IDX image files; it must be an .npz file"),
        ("idx-no-labels", r"train-images-idx3-ubyte has no matching train-labels-idx1-ubyte"),
        ("idx-truncated", r"train-images-idx3-ubyte is truncated or corrupt"),
        ("idx-bad-magic", r"train-images-idx3-ubyte is not an IDX file \(bad magic number\)"),
        ("idx-label-10", r"labels must lie in 0..9; got 10..10"),
        ("idx-wrong-shape", r"images must have shape \(N, 28, 28\); got \(30, 20, 20\)"),
        ("idx-corrupt-gz", r"cannot read IDX file .*train-images-idx3-ubyte.gz: error"),
    ],
)
def test_bad_node_data_is_rejected_without_running_its_code(kind, expected, tmp_path):
    path = _make_bad_data(kind, tmp_path)
    with pytest.raises(DataError, match=expected):
        load_node_data(path)
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------- the launcher CLI


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--num-supernodes", "0"], r"--num-supernodes and --num-cpus must be >= 1"),
        (["--num-supernodes", "three"], r"argument --num-supernodes: invalid int value: 'three'"),
        (["--num-cpus", "0"], r"--num-supernodes and --num-cpus must be >= 1"),
        (["--num-gpus", "-0.5"], r"--num-gpus >= 0"),
        (["--run-config", "cvae-rounds=0"], r"'cvae-rounds' must be an integer >= 1; got 0"),
        (["--run-config", "rounds=3"], r"unknown run-config key\(s\) \['rounds'\]"),
        (["--run-config", "output-dir=/tmp/x"], r"cannot parse --run-config 'output-dir=/tmp/x'"),
        (["--run-config", "num-synthetic 100"], r"'num-synthetic 100' is not key=value"),
        (["--run-config", "/nonexistent/preset.toml"], r"cannot read --run-config file"),
        (["--run-config", "dataset='emnist'"], r"'dataset' must be one of"),
        (["--colour", "red"], r"unrecognized arguments: --colour red"),
    ],
)
def test_launcher_rejects_bad_arguments_before_starting_anything(
    argv, expected, monkeypatch, capsys
):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the launcher started a simulation despite bad input")

    monkeypatch.setattr(launch, "simulate", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        launch.main(argv)
    assert exit_info.value.code == 2
    assert re.search(expected, capsys.readouterr().err)


# ---------------------------------------------------------- the deployment CLI


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["up", "--num-supernodes", "0"], r"--num-supernodes must be an integer >= 1; got 0"),
        (["up", "--superlink-port", "80"], r"--superlink-port must be an integer port in 1024.."),
        (["up", "--supernode-port", "65534"], r"ports .*\.\.65536 run past 65535"),
        (
            ["up", "--superlink-port", "20001", "--supernode-port", "20000"],
            r"--superlink-port 20001 collides with the SuperNode ports 20000..20002",
        ),
        (["up", "--superlink-port", "BUSY"], r"port\(s\) \[BUSY(, \d+)*\] on 127.0.0.1 are in use"),
        (
            ["up", "--num-supernodes", "2", "--data-path", "GOOD"],
            r"--data-path must be given once per SuperNode \(2\) or not at all",
        ),
        (
            ["up", "--num-supernodes", "1", "--data-path", "/nonexistent/a.npz"],
            r"data-path '/nonexistent/a.npz' does not exist",
        ),
        (["up", "--num-supernodes", "1", "--data-path", "CORRUPT"], r"is not a readable .npz"),
        (["up", "--torch-threads", "-1"], r"--torch-threads must be >= 1"),
        (["up", "--secure", "yes"], r"unrecognized arguments: yes"),
        (["run", "--run-config", "clf-rounds=0"], r"'clf-rounds' must be an integer >= 1"),
        (["run"], r"no deployment is up in .*; run `up` first"),
        (["sideways"], r"invalid choice: 'sideways'"),
    ],
)
def test_deploy_script_rejects_bad_arguments_before_starting_anything(
    argv, expected, tmp_path, busy_port, monkeypatch, capsys
):
    def must_not_start(*args, **kwargs):
        raise AssertionError("the deployment script started a process despite bad input")

    monkeypatch.setattr(deploy.SuperLink, "start", must_not_start)
    monkeypatch.setattr(deploy.SuperNode, "start", must_not_start)
    monkeypatch.setattr(deploy, "flwr_run", must_not_start)
    good = write_npz(tmp_path / "good.npz", *real_digits(30))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(good.read_bytes()[:100])
    substitutes = {"BUSY": str(busy_port), "GOOD": str(good), "CORRUPT": str(corrupt)}
    argv = [substitutes.get(arg, arg) for arg in argv]
    state_dir = tmp_path / "state"
    with pytest.raises(SystemExit) as exit_info:
        deploy.main(["--state-dir", str(state_dir), *argv])
    assert exit_info.value.code == 2
    assert re.search(expected.replace("BUSY", str(busy_port)), capsys.readouterr().err)
    assert not state_dir.exists()  # nothing half-done


# ------------------------------------------------------------------ model files


def test_model_files_are_loaded_as_weights_only_never_running_code(tmp_path):
    import pickle

    import torch

    from fedaug_flwr.results import load_state_dict, save_state_dict

    weights = CVAE(3).state_dict()
    save_state_dict(tmp_path / "cvae.pt", weights)
    loaded = load_state_dict(tmp_path / "cvae.pt")
    assert all(torch.equal(loaded[key], weights[key]) for key in weights)

    torch.save({"weight": _RunsCodeWhenUnpickled(tmp_path / "PWNED")}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
