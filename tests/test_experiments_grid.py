"""Experiment files: expansion into cells and runs, names, filters, validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedaug_flwr.config import default_run_config
from fedaug_flwr.experiments.grid import (
    SweepError,
    format_value,
    load_spec,
    parse_filters,
    parse_spec,
    select,
    validate,
)
from tests.sweep_fixtures import IMPUTATION_SPEC

CONF = Path(__file__).resolve().parent.parent / "conf"


def spec_of(**changes):
    return parse_spec({**IMPUTATION_SPEC, **changes})


def test_cells_are_the_product_of_axes_minus_exclusions_in_axis_order():
    spec = spec_of()
    names = [cell.name for cell in spec.cells()]
    assert names == [
        "dirichlet-beta=0.1__imputation=none__num-synthetic=0",
        "dirichlet-beta=0.1__imputation=uniform__num-synthetic=100",
        "dirichlet-beta=0.1__imputation=minority__num-synthetic=100",
        "dirichlet-beta=10.0__imputation=none__num-synthetic=0",
        "dirichlet-beta=10.0__imputation=uniform__num-synthetic=100",
        "dirichlet-beta=10.0__imputation=minority__num-synthetic=100",
    ]


def test_runs_are_cells_times_seeds_with_base_axes_and_seed_in_their_config():
    spec = spec_of()
    runs = spec.runs()
    assert len(runs) == 6 * 3
    first = runs[0]
    assert first.run_config == {
        "cvae-rounds": 1,
        "clf-rounds": 2,
        "dirichlet-beta": 0.1,
        "imputation": "none",
        "num-synthetic": 0,
        "seed": 0,
    }
    assert [r.seed for r in runs[:3]] == [0, 1, 2]  # seeds of a cell run together
    assert str(first.relative_dir) == f"{first.cell.name}/seed-0"


def test_a_grid_without_axes_is_one_base_cell():
    spec = spec_of(axes=None, exclude=None, seeds=[3])
    assert [run.label for run in spec.runs()] == ["base seed=3"]


def test_value_formatting_in_names_is_filesystem_safe():
    assert format_value(0.1) == "0.1"
    assert format_value(10.0) == "10.0"
    assert format_value(True) == "true"
    assert format_value("a/b c") == "a-b-c"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"axes": {"dirichlet-beta": []}}, "non-empty list"),
        ({"axes": {"dirichlet-beta": [0.1, 0.1]}, "exclude": None}, "twice"),
        ({"seeds": []}, "'seeds' must be a non-empty list"),
        ({"seeds": [0, 0]}, "lists a seed twice"),
        ({"seeds": [-1]}, "integers >= 0"),
        ({"exclude": [{"clf-rounds": 2}]}, "not axes"),
        ({"exclude": [{"num-synthetic": 7}]}, "not a value of that axis"),
        ({"exclude": [{}]}, "is empty"),
        ({"exclude": [{"num-synthetic": [0, 100]}]}, "the grid is empty"),
        ({"base": {"seed": 1}}, "list the seeds under 'seeds'"),
        ({"base": {"output-dir": "/x"}}, "the sweep sets it"),
        ({"base": {"num-synthetic": 5}}, "both in 'base' and in 'axes'"),
        ({"federation": {"num-supernodes": 0}}, "'num-supernodes' must be an integer >= 1"),
        ({"federation": {"clients": 3}}, "unknown federation key"),
        ({"rounds": 3}, "unknown key(s) ['rounds']"),
    ],
)
def test_bad_experiment_files_are_rejected_with_the_reason(changes, message):
    with pytest.raises(SweepError) as error:
        spec_of(**changes)
    assert message in str(error.value)


def test_an_unknown_axis_fails_validation_naming_the_key_and_the_cell():
    spec = spec_of(axes={"dirichlet-beta": [0.1], "learning-rate": [0.1]}, exclude=None)
    with pytest.raises(SweepError) as error:
        validate(spec)
    assert "learning-rate" in str(error.value)
    assert "dirichlet-beta=0.1__learning-rate=0.1 seed=0" in str(error.value)


def test_a_bad_value_fails_validation_before_anything_runs():
    spec = spec_of(axes={"imputation": ["uniform", "sometimes"]}, exclude=None)
    with pytest.raises(SweepError, match="imputation=sometimes.*'imputation' must be one of"):
        validate(spec)


def test_a_yaml_boolean_where_a_string_is_expected_is_reported():
    raw = yaml.safe_load("axes: {imputation: [off, uniform]}\nseeds: [0]")
    with pytest.raises(SweepError, match=r"got False \(bool\)"):
        validate(parse_spec(raw))


def test_more_min_clients_than_supernodes_is_refused():
    spec = spec_of(federation={"num-supernodes": 2}, base={"min-clients": 3})
    with pytest.raises(SweepError, match="min-clients=3 is more than federation num-supernodes=2"):
        validate(spec)


def test_filters_select_runs_by_axis_values_and_seed():
    spec = spec_of()
    filters = parse_filters(["dirichlet-beta=10", "imputation=none,minority", "seed=1"])
    assert filters == {"dirichlet-beta": [10], "imputation": ["none", "minority"], "seed": [1]}
    runs = select(spec, filters)
    assert [r.label for r in runs] == [
        "dirichlet-beta=10.0__imputation=none__num-synthetic=0 seed=1",
        "dirichlet-beta=10.0__imputation=minority__num-synthetic=100 seed=1",
    ]


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["clf-rounds=2"], "not an axis"),
        (["dirichlet-beta=0.3"], "matches nothing"),
        (["seed=9"], "matches nothing"),
        (["dirichlet-beta"], "must look like 'axis=value'"),
    ],
)
def test_bad_filters_are_rejected(texts, message):
    with pytest.raises(SweepError, match=message):
        select(spec_of(), parse_filters(texts))


def test_filters_that_leave_nothing_are_an_error():
    with pytest.raises(SweepError, match="leave no run"):
        select(spec_of(), parse_filters(["imputation=none", "num-synthetic=100"]))


def test_load_spec_reads_yaml_and_names_the_file_in_errors(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("axes: {dirichlet-beta: [0.1]}\nseeds: [0]\n")
    spec = load_spec(path)
    assert spec.name == "mine" and spec.output == "results/sweeps/mine"
    path.write_text("axes: [oops\n")
    with pytest.raises(SweepError, match="mine.yaml is not valid YAML"):
        load_spec(path)
    with pytest.raises(SweepError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("name", "runs", "supernodes"),
    [("smoke", 6, 3), ("imputation", 175, 100), ("reproduction", 30, 5)],
)
def test_shipped_imputation_grids_expand_and_validate(name, runs, supernodes):
    spec = load_spec(CONF / f"{name}.yaml")
    validate(spec)
    assert len(spec.runs()) == runs
    assert spec.num_supernodes == supernodes
    # k = 0 is run once, as imputation "none"; every other k once per mode
    for cell in spec.cells():
        values = cell.as_dict()
        assert (values["imputation"] == "none") == (values["num-synthetic"] == 0)


def test_the_study_grid_has_the_studys_axes_and_five_seeds():
    spec = load_spec(CONF / "imputation.yaml")
    assert spec.axes["dirichlet-beta"] == [0.1, 0.3, 0.5, 10.0, 100.0]
    assert spec.axes["num-synthetic"] == [0, 100, 500, 1000]
    assert spec.seeds == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("name", "betas", "runs", "rounds"),
    [
        ("finetune", [0.1, 0.3, 0.5, 10.0, 100.0], 50, None),
        # vanilla keeps 10 rounds x 1 epoch, fine-tuning 2 rounds x 8 epochs
        ("reproduction-finetune", [0.1, 0.3, 100.0], 18, (10, 2)),
    ],
)
def test_shipped_finetune_grids_compare_vanilla_and_pretraining_per_beta(name, betas, runs, rounds):
    spec = load_spec(CONF / f"{name}.yaml")
    assert spec.axes["dirichlet-beta"] == betas
    assert spec.axes["pretrain"] == ["off", "federated"]
    assert spec.base["imputation"] == "none"
    assert len(spec.runs()) == runs
    cells = [cell.as_dict() for cell in spec.cells()]
    assert len(cells) == 2 * len(betas)  # one vanilla and one pretrained cell per beta
    assert set(spec.axes) == {"dirichlet-beta", "pretrain"}
    if rounds is not None:
        assert (spec.base["clf-rounds"], spec.base["finetune-rounds"]) == rounds
    if "pretrain" not in default_run_config():
        pytest.skip("the finetune variant (run-config key 'pretrain') is not merged yet")
    validate(spec)


def test_the_paper_scale_campaigns_pair_their_beta_01_runs_across_presets():
    """conf/paper-scale-as-written.yaml runs stage 1's beta 0.1 cells under the other
    preset: same runs, seeds, split and scale, only the preset's method differs."""
    as_run = load_spec(CONF / "paper-scale.yaml")
    as_written = load_spec(CONF / "paper-scale-as-written.yaml")
    for spec in (as_run, as_written):
        validate(spec)
    assert (as_run.preset, as_written.preset) == ("as-run", "as-written")
    assert len(as_run.runs()) == 200 and len(as_written.runs()) == 15

    def stage1_beta_01(run) -> bool:
        config = run.run_config
        return (
            config["dirichlet-beta"] == 0.1
            and config["pretrain"] == "off"
            and config["num-synthetic"] in (0, 100, 1000)
            and run.seed in (0, 1, 2)
        )

    def key(run) -> tuple:
        return tuple(run.run_config[k] for k in ("imputation", "num-synthetic")) + (run.seed,)

    counterparts = {key(run): run for run in as_run.runs() if stage1_beta_01(run)}
    assert sorted(counterparts) == sorted(key(run) for run in as_written.runs())
    split = ("dataset", "dirichlet-beta", "min-partition-size", "seed", "cvae-rounds", "clf-rounds")
    for run in as_written.runs():
        other = counterparts[key(run)]
        assert {k: run.run_config[k] for k in split} == {k: other.run_config[k] for k in split}
    assert as_written.num_supernodes == as_run.num_supernodes == 100


def test_the_batchnorm_statistics_runs_repeat_paper_scale_runs_with_the_diagnostic_on():
    """conf/batchnorm-statistics.yaml: each run is a paper-scale run (same cell, seed,
    preset, data, clients, rounds) with only bn-recalibration-images added, so its
    training, and every number but the added score, is that run's."""
    paper = load_spec(CONF / "paper-scale.yaml")
    diagnostic = load_spec(CONF / "batchnorm-statistics.yaml")
    validate(diagnostic)
    assert diagnostic.preset == paper.preset == "as-run"
    assert diagnostic.num_supernodes == paper.num_supernodes == 100
    counterparts = {(tuple(sorted(run.run_config.items())), run.seed) for run in paper.runs()}
    runs = diagnostic.runs()
    assert len(runs) == 12
    for run in runs:
        config = dict(run.run_config)
        assert config.pop("bn-recalibration-images") == 10_000
        config["pretrain"] = "off"  # the paper-scale file's own axis
        assert (tuple(sorted(config.items())), run.seed) in counterparts
