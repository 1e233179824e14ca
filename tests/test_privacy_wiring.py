"""The privacy audit and the CVAE's differential privacy, wired into runs: the real
ClientApp with real Messages, and the real pipeline in this process (``LocalGrid``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, RecordDict

import client_app
from fedaug_flwr import dp, pipeline
from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.experiments.aggregate import final_row
from fedaug_flwr.models import CVAE
from fedaug_flwr.partition import ClientSplit
from fedaug_flwr.protocol import PrivacyAnswer
from fedaug_flwr.replies import privacy_check
from fedaug_flwr.results import FAILURE, SUMMARY
from tests.conftest import TINY, make_context, make_message
from tests.data_files import real_digits, write_npz
from tests.local_grid import SMALL_RUN, LocalGrid
from tests.test_client_app import NUM_PARTITIONS, expected_split, task_record

SMALL = {**SMALL_RUN, "imputation": "minority", "quality-samples": 0}
IMAGE_PIXELS = 28 * 28


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("node-data")
    return [
        {
            "partition-id": i,
            "data-path": str(write_npz(folder / f"site-{i}.npz", *real_digits(90, offset=i))),
        }
        for i in range(3)
    ]


def run(nodes, tmp_path, name: str, **overrides) -> tuple[dict, LocalGrid]:
    """The real pipeline; the summary (or the failure record) and the grid."""
    grid = LocalGrid(client_app.app, nodes)
    config = AppConfig.from_run_config({**SMALL, **overrides, "output-dir": str(tmp_path / name)})
    try:
        pipeline.run(grid, config, run_id=1)
    except dp.PrivacyBudgetError:
        return json.loads((tmp_path / name / FAILURE).read_text()), grid
    return json.loads((tmp_path / name / SUMMARY).read_text()), grid


def kinds(grid: LocalGrid) -> list[str]:
    return [kind for _, kind in grid.delivered]


# ------------------------------------------------------------------ the message


def test_audit_message_round_trip_returns_statistics_only():
    context = make_context(1, NUM_PARTITIONS)
    content = RecordDict({"generator": ArrayRecord(CVAE().state_dict()), "config": task_record()})
    reply = client_app.app(make_message(content, "query.privacy"), context)

    assert not reply.has_error()
    assert set(reply.content.keys()) == {"metrics"}  # no ArrayRecord, no ConfigRecord
    assert not reply.content.array_records
    metrics = reply.content["metrics"]
    for key, value in metrics.items():  # numbers and short lists: nothing image-sized
        values = value if isinstance(value, list) else [value]
        assert len(values) <= IMAGE_PIXELS // 8, key  # the longest: 98 distance bins
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in values), key
    assert privacy_check(reply, 7) is None
    assert set(PrivacyAnswer.REQUIRED) <= set(metrics)
    # members: the training split; held out: validation + test, never trained on
    split = expected_split(1, AppConfig.from_run_config(TINY))
    assert metrics["train-images"] == metrics["members"] == len(split.train)
    assert metrics["heldout-images"] == metrics["non-members"] == len(split.val) + len(split.test)
    assert metrics["synthetic-images"] + metrics["synthetic-unmatched"] == len(split.train)
    assert 0.0 <= metrics["auc-loss"] <= 1.0 and 0.0 <= metrics["auc-generated-nearest"] <= 1.0
    answer = PrivacyAnswer.from_metrics(metrics)
    assert answer.audit["flagged-share"] == metrics["flagged-images"] / metrics["synthetic-images"]


def test_privacy_check_refuses_a_reply_carrying_an_image():
    context = make_context(0, NUM_PARTITIONS)
    content = RecordDict({"generator": ArrayRecord(CVAE().state_dict()), "config": task_record()})
    reply = client_app.app(make_message(content, "query.privacy"), context)
    reply.content["metrics"]["closest-train-distances"] = [0] * IMAGE_PIXELS
    assert "at most 5" in privacy_check(reply, 7)


# ------------------------------------------------------------------ runs


@pytest.mark.usefixtures("in_process_run")
def test_run_with_the_audit_has_the_privacy_section_figure_and_table_columns(nodes, tmp_path):
    summary, grid = run(nodes, tmp_path, "audited")

    assert kinds(grid).count("query.privacy") == 3
    # after the CVAE phase, before the imputation
    assert kinds(grid).index("query.privacy") > max(
        i for i, k in enumerate(kinds(grid)) if k == "train.cvae"
    )
    assert kinds(grid).index("query.privacy") < kinds(grid).index("query.impute")
    section = summary["privacy"]
    audit = section["audit"]
    assert section["failures"] == [] and audit["clients"] == 3
    assert len(section["per-client"]) == 3
    assert audit["synthetic-images"] == sum(c["synthetic-images"] for c in section["per-client"])
    assert sum(audit["histogram-ratio"]) == audit["synthetic-images"]
    shares = [c["flagged-share"] for c in section["per-client"]]
    assert audit["flagged-excess-mean"] == pytest.approx(np.mean(shares) - 0.05)
    assert sum(audit["histogram-ratio-reference"]) == audit["reference-images"]
    for attack in ("loss", "generated-nearest"):
        assert section["membership-inference"][attack]["clients"] == 3
        assert 0.0 <= section["membership-inference"][attack]["mean"] <= 1.0
    folder = tmp_path / "audited"
    assert summary["artifacts"]["privacy-distances"] == "privacy_distances.png"
    assert (folder / "privacy_distances.png").stat().st_size > 0
    row = final_row(summary)
    assert row["privacy-flagged-share"] == audit["flagged-share"]
    assert row["privacy-auc-loss"] == section["membership-inference"]["loss"]["mean"]
    assert summary["cvae"]["dp"] == {"mode": "off"}

    # switched off: no privacy message, and the summary says why
    summary, grid = run(nodes, tmp_path, "unaudited", **{"privacy-audit": False})
    assert "query.privacy" not in kinds(grid)
    assert summary["privacy"] == {"skipped": "privacy-audit = false"}


@pytest.mark.usefixtures("in_process_run")
def test_sample_level_dp_records_each_clients_epsilon_per_round(nodes, tmp_path):
    rounds, noise = 2, 1.1
    summary, _ = run(
        nodes,
        tmp_path,
        "sample",
        **{"cvae-dp": "sample", "cvae-rounds": rounds, "cvae-dp-noise": noise},
        **{"privacy-audit": False},
    )
    section = summary["cvae"]["dp"]
    assert section["mode"] == "sample" and section["noise-multiplier"] == noise
    assert [r["round"] for r in section["epsilon-per-round"]] == [1, 2]
    config = AppConfig.from_run_config(summary["config"])
    sizes = {c["partition-id"]: c["real-train"] for c in summary["clients"]}
    for row in section["epsilon-per-round"]:
        assert len(row["per-client"]) == 3
        for client in row["per-client"]:
            expected = dp.epsilon_per_round(
                noise, sizes[client["partition-id"]], config.cvae_batch_size, 1, rounds, 1e-5
            )
            assert client["epsilon"] == pytest.approx(expected[row["round"] - 1], rel=1e-6)
        assert row["epsilon-max"] == max(c["epsilon"] for c in row["per-client"])
    first, second = section["epsilon-per-round"]
    assert second["epsilon-max"] > first["epsilon-max"] > 0  # cumulative
    assert section["epsilon"] == second["epsilon-max"]
    assert final_row(summary)["cvae-dp-epsilon-spent"] == section["epsilon"]


@pytest.mark.usefixtures("in_process_run")
def test_sample_level_budget_too_small_stops_the_run_before_any_step(nodes, tmp_path, monkeypatch):
    steps = []
    real_train = dp.train

    def counting_train(*args, **kwargs):
        steps.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(dp, "train", counting_train)
    failure, grid = run(
        nodes,
        tmp_path,
        "over-budget",
        **{"cvae-dp": "sample", "cvae-dp-noise": 0.3, "cvae-dp-epsilon": 1.0},
    )
    assert failure["status"] == "failed"
    assert "PrivacyBudgetError" in failure["error"]
    assert "cvae-dp-epsilon=1" in failure["error"] and "round 1" in failure["error"]
    assert steps == []  # no client took a DP-SGD step
    assert kinds(grid).count("train.cvae") == 3 and "query.impute" not in kinds(grid)
    assert not (tmp_path / "over-budget" / "cvae.pt").exists()

    # a noise derived from the same budget keeps it
    summary, _ = run(
        nodes,
        tmp_path,
        "derived",
        **{"cvae-dp": "sample", "cvae-dp-noise": 0.0, "cvae-dp-epsilon": 1.0},
        **{"privacy-audit": False},
    )
    assert 0.9 <= summary["cvae"]["dp"]["epsilon"] <= 1.0
    assert steps


@pytest.mark.usefixtures("in_process_run")
def test_client_level_dp_records_flowers_epsilon_and_refuses_a_known_overrun(nodes, tmp_path):
    rounds, noise = 2, 1.5
    summary, grid = run(
        nodes,
        tmp_path,
        "client",
        **{"cvae-dp": "client", "cvae-rounds": rounds, "cvae-dp-noise": noise},
        **{"privacy-audit": False},
    )
    section = summary["cvae"]["dp"]
    assert section["mode"] == "client" and section["clients-per-round"] == 3
    assert [r["round"] for r in section["epsilon-per-round"]] == [1, 2]
    for row in section["epsilon-per-round"]:  # Flower's accountant, as dp.py computes it
        assert row["epsilon"] == pytest.approx(
            dp.client_level_epsilon(noise, row["round"], 1e-5), rel=1e-9
        )
    assert section["noise-stdv"] == pytest.approx(noise * 1.0 / 3)
    # every client's update counted alike, and each round was recorded per client
    for row in summary["cvae"]["rounds"]:
        assert [c["num-examples"] for c in row["train-per-client"]] == [1, 1, 1]
    assert kinds(grid).count("train.cvae") == 3 * rounds

    failure, grid = run(
        nodes,
        tmp_path,
        "client-over",
        **{"cvae-dp": "client", "cvae-dp-noise": 1.0, "cvae-dp-epsilon": 2.0},
    )
    assert "PrivacyBudgetError" in failure["error"] and "client-level" in failure["error"]
    assert "train.cvae" not in kinds(grid)  # refused before any message was sent


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"cvae-dp": "maybe"}, "'cvae-dp' must be one of"),
        ({"cvae-dp-delta": 1.5}, "'cvae-dp-delta' must be a number strictly between 0 and 1"),
        ({"cvae-dp-clip": 0.0}, "'cvae-dp-clip' must be a number > 0"),
        ({"cvae-dp-epsilon": -1.0}, "'cvae-dp-epsilon' must be a number >= 0"),
        ({"cvae-dp-noise": -0.5}, "'cvae-dp-noise' must be a number >= 0"),
        ({"privacy-audit": "yes"}, "'privacy-audit' must be true"),
        ({"cvae-dp": "sample", "cvae-dp-noise": 0.0}, "needs a noise multiplier"),
        ({"cvae-dp": "client", "fraction-train": 0.5}, "cvae-dp='client' needs fraction-train"),
    ],
)
def test_privacy_keys_are_validated_by_name(overrides, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        AppConfig.from_run_config(overrides)
    assert AppConfig.from_run_config({}).cvae_dp == "off"  # off by default


def test_heldout_split_is_validation_plus_test():
    from fedaug_flwr.node import heldout_split

    split = expected_split(0, AppConfig.from_run_config(TINY))
    heldout = heldout_split(ClientSplit(0, split.train, split.val, split.test))
    assert len(heldout) == len(split.val) + len(split.test)
    assert np.array_equal(heldout.labels, np.concatenate([split.val.labels, split.test.labels]))
