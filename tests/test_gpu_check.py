"""bench.gpu_check: the one command prepared for a lent GPU machine, checked here on the CPU.

``--tiny`` runs every part through the same code (a real ``fedaug_flwr.launch`` run of 4
clients, the server's pretraining in its own process, bench.local_epoch, the grid
estimate) at toy size; the JSON it leaves must have the shape a GPU measurement relies on.
"""

from __future__ import annotations

import csv
import json

from bench import gpu_check
from tests.data_files import real_digits, write_idx_folder


def small_mnist(folder):
    """600 training and 100 test digits as an IDX folder, the layout of full MNIST."""
    images, labels = real_digits(700)
    write_idx_folder(folder, images[:600], labels[:600], "train")
    write_idx_folder(folder, images[600:], labels[600:], "t10k")
    return folder


def test_tiny_check_runs_every_part_and_writes_their_results(tmp_path):
    out = tmp_path / "out"
    code = gpu_check.main(
        [
            "--tiny",
            "--data-dir",
            str(small_mnist(tmp_path / "mnist")),
            "--out",
            str(out),
            "--scratch",
            str(tmp_path / "scratch"),
            "--code-commit",
            "abc123",
        ]
    )
    result = json.loads((out / gpu_check.RESULT).read_text())
    parts = result["parts"]
    assert code == 0, json.dumps(parts, indent=1)[-4000:]
    assert list(parts) == list(gpu_check.PARTS)
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(
        gpu_check.PARTS, "done"
    )
    assert result["machine"]["flwr"] and "elapsed-s" in result

    run = parts["run"]  # the whole run, through the launcher
    assert run["completed"] and run["returncode"] == 0 and run["campaign-result"] is False
    assert run["launcher"][:3] == ["python", "-m", "fedaug_flwr.launch"]
    assert {"cvae", "imputation", "classifier", "total"} <= set(run["timing-s"])
    assert run["data"]["source"] == "mnist" and run["data"]["num-clients"] == 4
    assert len(run["classifier-round-timing-s"]) == 2  # round 0 (initial) and round 1
    assert run["campaign-cell"].endswith(
        "imputation=minority__num-synthetic=100__pretrain=off/seed-1"
    )
    published = json.loads((out / "campaign" / "summary.json").read_text())
    assert published["compact"]["made-on"]["logical-cpus"] >= 1
    assert published["config"]["data-dir"] == "(local folder, not published)"
    assert published["study-preset"]["name"] != "as-written"
    with open(out / "campaign" / "clients.csv") as table:
        assert len(list(csv.DictReader(table))) == 4
    assert "fedaug-flwr: run" in (out / "whole-run.log").read_text()

    pretrain = parts["pretrain"]  # on the whole run's CVAE
    assert pretrain["completed"] and pretrain["cvae"] == "the whole run's CVAE"
    assert pretrain["seconds"] > 0 and pretrain["device"] == "cpu"
    assert [(e["epoch"], e["of"]) for e in pretrain["epochs-seen"]] == [(1, 1)]

    epochs = parts["local-epoch"]["variants"]  # the as-run optimiser, both tiny variants
    assert [(row["optimiser"], row["variant"]) for row in epochs] == [
        ("sgd", "today"),
        ("sgd", "fused"),
    ]
    assert all(row["device"] == "cpu" and row["gradient-error"] < 1e-4 for row in epochs)
    assert parts["local-epoch"]["optimisers"]["sgd"]["paper-scale-run"]

    grid = parts["grid"]  # from the whole run, k = 100 scaled from its k = 40
    assert [row["k"] for row in grid["rows"]] == [0, 100, 500, 1000]
    assert all(row["basis"] == "scaled from k = 40" for row in grid["rows"])
    assert grid["rows"][0]["run min"] < grid["rows"][-1]["run min"]
    assert grid["grid-hours"] > 0

    # what comes back from a device call: at most 8 files, at most 2 folders down
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)


def test_a_failed_part_keeps_the_others_and_skips_are_recorded(tmp_path):
    check = gpu_check.GpuCheck(tmp_path, budget_s=100.0, settings={})
    check.part("run", False, lambda seconds: {"wall-s": 1.0})
    check.part("pretrain", False, lambda seconds: 1 / 0)
    check.part("local-epoch", True, lambda seconds: {"never": "called"})
    check.budget_s = 0.0  # the budget is spent: a measuring part is skipped
    check.part("grid", False, lambda seconds: {"rows": []})
    check.part("later", False, lambda seconds: {"never": "called"})
    parts = json.loads((tmp_path / gpu_check.RESULT).read_text())["parts"]
    assert parts["run"] == {"status": "done", "wall-s": 1.0, "part-s": parts["run"]["part-s"]}
    assert parts["pretrain"]["status"] == "failed"
    assert "ZeroDivisionError" in parts["pretrain"]["error"]
    assert parts["local-epoch"]["status"] == "skipped"
    assert parts["grid"]["status"] == "done"  # computed from what is there, needs no time
    assert parts["later"]["status"] == "skipped" and "budget" in parts["later"]["reason"]


def test_a_stopped_runs_timeline_gives_its_phases_rounds_and_projected_end():
    timeline = gpu_check.RunTimeline()
    lines = [  # (arrival s, launcher line), as a run stopped in round 4 of 5 prints them
        (30.0, "INFO :      [fedaug] phase 'data' starts"),
        (32.0, "INFO :      [fedaug] phase 'data' took 2.1 s"),
        (32.5, "INFO :      [fedaug] phase 'cvae' starts"),
        (33.0, "fedaug-flwr progress: cvae round 1/2"),
        (60.0, "fedaug-flwr progress: cvae round 2/2; 1 done in 27 s"),
        (62.0, "INFO :      [fedaug] phase 'cvae' took 30.0 s"),
        (63.0, "INFO :      [fedaug] phase 'classifier' starts"),
        (64.0, "fedaug-flwr progress: classifier round 1/5"),
        (90.0, "fedaug-flwr progress: classifier round 2/5; 1 done in 26 s"),
        (115.0, "fedaug-flwr progress: classifier round 3/5; 2 done in 51 s"),
        (142.0, "fedaug-flwr progress: classifier round 4/5; 3 done in 1 min 18 s"),
        (150.0, "INFO :      aggregate_train: Received 100 results"),
    ]
    assert [timeline.see(line, at) for at, line in lines][-1] is False  # not a timing line
    report = timeline.report()
    assert report["startup-s"] == 30.0
    assert report["phase-s"] == {"data": 2.1, "cvae": 30.0}
    assert report["round-s"] == {"cvae": [27.0], "classifier": [26.0, 25.0, 27.0]}
    # round 4 began at 142 s; rounds 4 and 5 at the median round, 26 s
    assert report["projected"]["classifier-end-s"] == 194.0
    timeline.see("INFO :      [fedaug] phase 'classifier' took 130.0 s", 194.0)
    assert "projected" not in timeline.report()  # a finished phase needs no projection
