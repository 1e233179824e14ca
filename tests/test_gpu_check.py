"""bench.gpu_check: the one command prepared for a lent GPU machine, checked here on the CPU.

``--tiny`` runs every part through the same code (a real ``fedaug_flwr.launch`` run of 4
clients, the server's pretraining in its own process, bench.local_epoch, the grid
estimate) at toy size; the JSON it leaves must have the shape a GPU measurement relies on.
"""

from __future__ import annotations

import argparse
import csv
import json
import time

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


# A stand-in for fedaug_flwr.launch, run as a real child process by the real run_child:
# it prints the launcher's phase and round lines, then does what the test asks.
FAKE_LAUNCHER = """
import os, signal, subprocess, sys, time
print("INFO :      [fedaug] phase 'data' starts", flush=True)
print("INFO :      [fedaug] phase 'data' took 0.1 s", flush=True)
print("INFO :      [fedaug] phase 'classifier' starts", flush=True)
for number in (1, 2, 3):
    print(f"fedaug-flwr progress: classifier round {number}/5", flush=True)
    time.sleep(0.3)
if os.environ["FAKE_LAUNCH"] == "hang":  # a run the budget stops, deaf to SIGTERM
    time.sleep(0.5)  # what the results file holds by now
    results = os.path.join(os.environ["FAKE_OUT"], "gpu-check.json")
    with open(results) as saved, open(results + ".mid-run", "w") as copy:
        copy.write(saved.read())
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)
# a run that fails, leaving a process of its own session on its output that prints
# one more round line after the launcher's end
late = "import time; time.sleep(7); print('fedaug-flwr progress: classifier round 4/5', flush=True)"
subprocess.Popen([sys.executable, "-c", late], start_new_session=True)
sys.exit(1)
"""


def fake_whole_run(tmp_path, monkeypatch, behaviour, seconds):
    """bench.gpu_check's whole-run part with nothing after it, on the fake launcher."""
    (tmp_path / "fake_launch.py").write_text(FAKE_LAUNCHER)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_LAUNCH", behaviour)
    monkeypatch.setenv("FAKE_OUT", str(out))
    real_run_child = gpu_check.run_child

    def run_fake(module, *args, **kwargs):
        assert module == "fedaug_flwr.launch"
        return real_run_child("fake_launch", *args, **kwargs)

    monkeypatch.setattr(gpu_check, "run_child", run_fake)
    monkeypatch.setattr(gpu_check, "MIN_PART_S", 1.0)  # a part of seconds, not minutes
    args = argparse.Namespace(
        beta=0.1,
        imputation="minority",
        k=100,
        seed=1,
        data_dir=tmp_path,
        scratch=tmp_path / "scratch",
        tiny=True,
        clients=4,
        gpus_per_client=0.0,
        skip_pretrain=True,
        skip_local_epoch=True,
        code_commit=None,
    )
    check = gpu_check.GpuCheck(out, budget_s=seconds + gpu_check.RESERVE_S, settings={})
    check.part("run", False, lambda left: gpu_check.whole_run(check, args, left))
    return check


def test_a_run_the_budget_stops_is_stopped_within_the_budget_and_keeps_its_timeline(
    tmp_path, monkeypatch
):
    started = time.monotonic()
    check = fake_whole_run(tmp_path, monkeypatch, "hang", seconds=8.0)
    # nothing after the run: it is stopped at the budget's end, not 40 s later
    assert time.monotonic() - started < 8.0 + 3.0
    run = json.loads((check.out / gpu_check.RESULT).read_text())["parts"]["run"]
    assert run["status"] == "stopped" and run["completed"] is False
    assert run["timeline"]["phase-s"] == {"data": 0.1}
    assert len(run["timeline"]["round-s"]["classifier"]) == 2
    assert "projected" in run["timeline"]
    # saved as the lines arrived, while the launcher still ran
    mid_run = json.loads((check.out / (gpu_check.RESULT + ".mid-run")).read_text())
    assert mid_run["parts"]["run"]["status"] == "running"
    assert len(mid_run["parts"]["run"]["timeline"]["round-s"]["classifier"]) == 2


def test_a_failed_run_is_failed_and_a_late_line_does_not_overwrite_its_entry(tmp_path, monkeypatch):
    # the launcher fails at once; a process of its own holds its output past the time
    # limit (3 s), so the command's wall time exceeds it: a failure all the same
    check = fake_whole_run(tmp_path, monkeypatch, "fail", seconds=8.0)
    run = check.results["parts"]["run"]
    assert run["status"] == "failed" and run["returncode"] == 1
    time.sleep(4.0)  # the late round line arrives after the part's entry was written
    saved = json.loads((check.out / gpu_check.RESULT).read_text())["parts"]["run"]
    assert saved["status"] == "failed" and "part-s" in saved
