"""TensorBoard logging (fedaug_flwr.tracking), read back with TensorBoard's own reader."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.tracking import TENSORBOARD_DIR, RunLog, flatten_numbers
from tests.sweep_fixtures import fake_summary


def read(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, pytest.approx(event.value)) for event in events.Scalars(tag)]


def test_a_runs_rounds_config_and_hyper_parameters_are_read_back(tmp_path):
    config = AppConfig.from_run_config({"tensorboard": True, "output-dir": str(tmp_path)})
    summary = fake_summary(config.to_run_config(), f1=0.7, loss=1.0, round_losses=[1.5, 1.2, 1.0])
    tb = RunLog.for_run(config, tmp_path)
    assert tb is not None and tb.folder == tmp_path / TENSORBOARD_DIR
    with tb:
        tb.log_config(config.to_run_config())
        for row in summary["cvae"]["rounds"]:  # live, one round at a time
            assert tb.log_round("cvae", row["round"], row) == 2
        tb.log_rounds("classifier", summary["classifier"]["rounds"])  # or a phase at once
        tb.close(final_metrics=summary["final"])
    assert tb.closed
    tb.close()  # twice is harmless

    events = read(tmp_path / TENSORBOARD_DIR)
    tags = set(events.Tags()["scalars"])
    assert {"cvae/train/train-loss", "cvae/train/val-loss"} <= tags
    assert {
        "classifier/train/train-loss",
        "classifier/evaluate/macro-f1",
        "classifier/evaluate/macro-f1-weighted",
        "classifier/global-test/accuracy",
    } <= tags
    assert not any(tag.endswith("/round") or tag == "round" for tag in tags)
    assert scalars(events, "cvae/train/train-loss") == [(1, 200.0)]
    assert scalars(events, "classifier/train/train-loss") == [(1, 1.6), (2, 1.3), (3, 1.1)]
    assert scalars(events, "classifier/global-test/loss") == [(1, 1.5), (2, 1.2), (3, 1.0)]
    # aggregated macro-F1 of round r is f1 - 0.1 * (3 - r) in the fixture
    assert scalars(events, "classifier/evaluate/macro-f1") == [(1, 0.5), (2, 0.6), (3, 0.7)]
    # the final metrics recorded with the hyper-parameters
    assert scalars(events, "final/clients/macro-f1") == [(0, 0.7)]
    assert scalars(events, "final/global-test/accuracy") == [(0, 0.85)]

    # the config: a text table and TensorBoard's hparams plugin data
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| imputation | `'minority'` |" in text and "| tensorboard | `True` |" in text
    plugin = events.SummaryMetadata("_hparams_/session_start_info").plugin_data
    assert plugin.plugin_name == "hparams"
    from tensorboard.plugins.hparams import plugin_data_pb2

    session = plugin_data_pb2.HParamsPluginData.FromString(plugin.content).session_start_info
    assert session.hparams["imputation"].string_value == "minority"
    assert session.hparams["clf-rounds"].number_value == 15
    assert session.hparams["tensorboard"].number_value == 1  # torch writes bools as numbers
    # one run, one folder: no timestamped subfolder from add_hparams
    assert [p.name for p in (tmp_path / TENSORBOARD_DIR).iterdir() if p.is_dir()] == []


def test_a_sweep_of_runs_is_one_logdir_with_a_run_per_folder(tmp_path):
    for cell in ("beta-0.1/seed-0", "beta-0.1/seed-1"):
        with RunLog(tmp_path / cell / TENSORBOARD_DIR) as tb:
            tb.log_round("classifier", 1, {"evaluate": {"macro-f1": 0.5}})
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    runs.Reload()
    assert sorted(runs.Runs()) == [
        "beta-0.1/seed-0/tensorboard",
        "beta-0.1/seed-1/tensorboard",
    ]


def test_it_is_off_unless_asked_for(tmp_path):
    config = AppConfig.from_run_config({})
    assert config.tensorboard is False
    assert RunLog.for_run(config, tmp_path) is None
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    with pytest.raises(ConfigError, match="run-config key 'tensorboard' must be true"):
        AppConfig.from_run_config({"tensorboard": "yes"})


def test_only_numbers_are_logged():
    row = {
        "round": 2,
        "train": {"loss": 1, "ok": True, "note": "x", "missing": None},
        "train-per-client": [{"loss": 1.0}],
        "evaluate": {"macro-f1": 0.5, "deep": {"x": 2.5}},
    }
    assert flatten_numbers(row) == {
        "round": 2.0,
        "train/loss": 1.0,
        "evaluate/macro-f1": 0.5,
        "evaluate/deep/x": 2.5,
    }


@pytest.mark.usefixtures("in_process_run")
def test_a_real_run_writes_its_rounds_and_final_metrics(tmp_path):
    from flwr.app import Context, RecordDict

    import client_app
    from server_app import build_server_app
    from tests.local_grid import SMALL_RUN, LocalGrid

    output = tmp_path / "run"
    run_config = {
        **SMALL_RUN,
        "clf-rounds": 2,
        "quality-samples": 0,
        "tensorboard": True,
        "output-dir": str(output),
    }
    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    build_server_app(run_config)(
        LocalGrid(client_app.app, nodes), Context(1, 1, {}, RecordDict(), {})
    )
    events = read(output / TENSORBOARD_DIR)
    accuracy = scalars(events, "classifier/global-test/accuracy")
    assert [step for step, _ in accuracy] == [1, 2]
    assert [step for step, _ in scalars(events, "cvae/train/train-loss")] == [1]
    summary = json.loads((output / "summary.json").read_text())
    final_accuracy = summary["final"]["global-test"]["accuracy"]
    assert scalars(events, "final/global-test/accuracy") == [(0, final_accuracy)]
    assert accuracy[-1][1] == final_accuracy
