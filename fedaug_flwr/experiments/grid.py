"""Experiment files (YAML) and the grid of runs they describe.

An experiment file holds a base run config, the axes to sweep (run-config key
-> list of values), optional exclusions, the seeds and the simulation size::

    name: smoke
    output: results/sweeps/smoke      # sweep folder, relative to the current directory
    federation: {num-supernodes: 3, num-cpus: 1, num-gpus: 0.0}
    preset: as-written                # optional: a study preset (fedaug_flwr.presets)
    base: {cvae-rounds: 1, clf-rounds: 1}  # over the preset
    axes:
      dirichlet-beta: [0.1, 100.0]
      num-synthetic: [0, 100]
    exclude:                          # drop cells matching every key of one rule
      - {dirichlet-beta: 100.0, num-synthetic: 0}
    seeds: [0, 1]

A *cell* is one combination of axis values; it is run once per seed, each run
in ``<sweep folder>/<cell name>/seed-<seed>/``. Every run's config is checked
with :meth:`AppConfig.from_run_config` before anything runs, so a typo in a key
or value fails at once, naming the cell.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedaug_flwr.config import AppConfig, ConfigError
from fedaug_flwr.presets import PRESETS, preset_values

TOP_LEVEL_KEYS = (
    "name",
    "description",
    "output",
    "federation",
    "preset",
    "base",
    "axes",
    "exclude",
    "seeds",
    "publish",
    "stages",
)
FEDERATION_DEFAULTS = {"num-supernodes": 10, "num-cpus": 1, "num-gpus": 0.0}
# Keys the sweep itself sets for every run; they may not appear in base or axes.
RESERVED_KEYS = {"seed": "list the seeds under 'seeds'", "output-dir": "the sweep sets it per run"}
BASE_CELL = "base"  # name of the single cell of a grid without axes
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class SweepError(ValueError):
    """An experiment file, a filter or a sweep folder is not usable."""


@dataclass(frozen=True)
class Cell:
    """One combination of axis values (in axis order) and its folder name."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        if not self.values:
            return BASE_CELL
        return "__".join(f"{key}={format_value(value)}" for key, value in self.values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)


@dataclass(frozen=True)
class Run:
    """One cell at one seed: a single Flower run with its own folder."""

    cell: Cell
    seed: int
    run_config: dict[str, Any] = field(compare=False, hash=False)

    @property
    def relative_dir(self) -> Path:
        return Path(self.cell.name) / f"seed-{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.cell.name} seed={self.seed}"


@dataclass(frozen=True)
class SweepSpec:
    """A parsed experiment file."""

    name: str
    description: str
    output: str
    federation: dict[str, Any]
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    exclude: list[dict[str, list[Any]]]
    seeds: list[int]
    preset: str = ""  # a study preset under ``base``, or "" for the app's defaults
    publish: str = ""  # a campaign's published results (experiments.campaign)
    stages: list[dict[str, Any]] = field(default_factory=list)  # a campaign's order

    @property
    def num_supernodes(self) -> int:
        return int(self.federation["num-supernodes"])

    def cells(self) -> list[Cell]:
        """Every combination of axis values that no exclusion rule removes."""
        keys = list(self.axes)
        combos = [tuple(zip(keys, combo, strict=True)) for combo in self._products()]
        return [
            Cell(combo) for combo in combos if not any(_matches(combo, r) for r in self.exclude)
        ]

    def runs(self) -> list[Run]:
        """Cells x seeds, cell-major (all seeds of a cell before the next cell)."""
        preset = preset_values(self.preset) if self.preset else {}
        return [
            Run(cell, seed, {**preset, **self.base, **cell.as_dict(), "seed": seed})
            for cell in self.cells()
            for seed in self.seeds
        ]

    def to_dict(self) -> dict[str, Any]:
        """The plain form written to ``sweep.yaml`` in the sweep folder."""
        return {
            "name": self.name,
            "description": self.description,
            "output": self.output,
            "federation": dict(self.federation),
            **({"preset": self.preset} if self.preset else {}),
            "base": dict(self.base),
            "axes": {key: list(values) for key, values in self.axes.items()},
            "exclude": [dict(rule) for rule in self.exclude],
            "seeds": list(self.seeds),
            **({"publish": self.publish} if self.publish else {}),
            **({"stages": [dict(stage) for stage in self.stages]} if self.stages else {}),
        }

    def _products(self) -> Iterable[tuple[Any, ...]]:
        return itertools.product(*self.axes.values()) if self.axes else [()]


def format_value(value: Any) -> str:
    """A value as it appears in a cell name: ``0.1``, ``10.0``, ``minority``, ``true``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return _UNSAFE.sub("-", text)


def same_value(a: Any, b: Any) -> bool:
    """Equal as run-config values: numbers by value (10 == 10.0), bools only to bools."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _matches(combo: Sequence[tuple[str, Any]], rule: Mapping[str, list[Any]]) -> bool:
    values = dict(combo)
    return all(any(same_value(values[key], v) for v in allowed) for key, allowed in rule.items())


# ----------------------------------------------------------------------------- loading


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check an experiment file (structure only; see :func:`validate`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SweepError(f"cannot read experiment file {path}: {error}") from error
    except yaml.YAMLError as error:
        raise SweepError(f"experiment file {path} is not valid YAML: {error}") from error
    return parse_spec(raw, default_name=path.stem, where=str(path))


def parse_spec(raw: Any, default_name: str = "sweep", where: str = "experiment") -> SweepSpec:
    """Build a :class:`SweepSpec` from the parsed YAML mapping, with clear errors."""
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: the file must be a YAML mapping with keys {TOP_LEVEL_KEYS}")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {unknown}; allowed: {list(TOP_LEVEL_KEYS)}")
    name = str(raw.get("name") or default_name)
    base = _mapping(raw.get("base"), f"{where}: 'base'")
    axes = _axes(raw.get("axes"), where)
    for key in (*base, *axes):
        if key in RESERVED_KEYS:
            raise SweepError(
                f"{where}: '{key}' cannot be set in base or axes ({RESERVED_KEYS[key]})"
            )
    preset = raw.get("preset") or ""
    if preset and preset not in PRESETS:
        raise SweepError(f"{where}: unknown preset {preset!r}; known: {sorted(PRESETS)}")
    overlap = sorted(set(base) & set(axes))
    if overlap:
        raise SweepError(f"{where}: key(s) {overlap} are both in 'base' and in 'axes'")
    spec = SweepSpec(
        name=name,
        description=str(raw.get("description") or "").strip(),
        output=str(raw.get("output") or f"results/sweeps/{name}"),
        federation=_federation(raw.get("federation"), where),
        base=base,
        axes=axes,
        exclude=_exclusions(raw.get("exclude"), axes, where),
        seeds=_seeds(raw.get("seeds"), where),
        preset=str(preset),
        publish=str(raw.get("publish") or ""),
    )
    spec = dataclasses.replace(spec, stages=_stages(raw.get("stages"), spec, where))
    if not spec.cells():
        raise SweepError(f"{where}: the grid is empty (every cell is excluded)")
    names = [cell.name for cell in spec.cells()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SweepError(f"{where}: different cells share the folder name(s) {duplicates}")
    return spec


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SweepError(f"{what} must be a mapping of run-config keys to values; got {value!r}")
    return dict(value)


def _axes(value: Any, where: str) -> dict[str, list[Any]]:
    axes = _mapping(value, f"{where}: 'axes'")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SweepError(
                f"{where}: axis '{key}' must be a non-empty list of values; got {values!r}"
            )
        for i, v in enumerate(values):
            if any(same_value(v, w) for w in values[:i]):
                raise SweepError(f"{where}: axis '{key}' lists the value {v!r} twice")
            if v is None or isinstance(v, dict | list):
                raise SweepError(f"{where}: axis '{key}' has a value that is not a scalar: {v!r}")
    return axes


def _federation(value: Any, where: str) -> dict[str, Any]:
    federation = {**FEDERATION_DEFAULTS, **_mapping(value, f"{where}: 'federation'")}
    unknown = sorted(set(federation) - set(FEDERATION_DEFAULTS))
    if unknown:
        raise SweepError(
            f"{where}: unknown federation key(s) {unknown}; allowed: {list(FEDERATION_DEFAULTS)}"
        )
    for key in ("num-supernodes", "num-cpus"):
        if isinstance(federation[key], bool) or not isinstance(federation[key], int):
            raise SweepError(f"{where}: federation '{key}' must be an integer >= 1")
        if federation[key] < 1:
            raise SweepError(f"{where}: federation '{key}' must be an integer >= 1")
    gpus = federation["num-gpus"]
    if isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus < 0:
        raise SweepError(f"{where}: federation 'num-gpus' must be a number >= 0; got {gpus!r}")
    federation["num-gpus"] = float(gpus)
    return federation


def _exclusions(value: Any, axes: Mapping[str, list[Any]], where: str) -> list[dict[str, list]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SweepError(f"{where}: 'exclude' must be a list of mappings axis -> value(s)")
    rules = []
    for number, rule in enumerate(value, start=1):
        rule = _mapping(rule, f"{where}: exclude rule #{number}")
        if not rule:
            raise SweepError(f"{where}: exclude rule #{number} is empty (it would drop every cell)")
        unknown = sorted(set(rule) - set(axes))
        if unknown:
            raise SweepError(
                f"{where}: exclude rule #{number} names {unknown}, which are not axes "
                f"(axes: {list(axes)})"
            )
        normalized = {k: v if isinstance(v, list) else [v] for k, v in rule.items()}
        for key, allowed in normalized.items():
            for v in allowed:
                if not any(same_value(v, w) for w in axes[key]):
                    raise SweepError(
                        f"{where}: exclude rule #{number}: {key}={v!r} is not a value of that "
                        f"axis ({axes[key]})"
                    )
        rules.append(normalized)
    return rules


def override_federation(spec: SweepSpec, overrides: Mapping[str, list[Any]]) -> SweepSpec:
    """The spec with some federation values replaced (``{"num-gpus": [0.1]}``), checked."""
    if not overrides:
        return spec
    values = {key: vals[-1] for key, vals in overrides.items()}
    federation = _federation({**spec.federation, **values}, "--federation")
    return dataclasses.replace(spec, federation=federation)


def _stages(value: Any, spec: SweepSpec, where: str) -> list[dict[str, Any]]:
    """A campaign's stages: ``{only: {axis: [values]}, seeds: [...]}`` each, checked."""
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        raise SweepError(f"{where}: 'stages' must be a non-empty list of {{only, seeds}} mappings")
    stages = []
    for number, stage in enumerate(value, start=1):
        stage = _mapping(stage, f"{where}: stage #{number}")
        unknown = sorted(set(stage) - {"only", "seeds"})
        if unknown:
            raise SweepError(f"{where}: stage #{number} has unknown key(s) {unknown}")
        seeds = _seeds(stage.get("seeds"), f"{where}: stage #{number}")
        if not set(seeds) <= set(spec.seeds):
            raise SweepError(f"{where}: stage #{number} seeds {seeds} are not all in 'seeds'")
        only = {
            key: values if isinstance(values, list) else [values]
            for key, values in _mapping(stage.get("only"), f"{where}: stage #{number}").items()
        }
        select(spec, {**only, "seed": seeds})  # names real axes and values, or says why not
        stages.append({"only": only, "seeds": seeds})
    return stages


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise SweepError(f"{where}: 'seeds' must be a non-empty list of integers, e.g. [0, 1, 2]")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise SweepError(f"{where}: 'seeds' must hold integers >= 0; got {value!r}")
    if len(set(value)) != len(value):
        raise SweepError(f"{where}: 'seeds' lists a seed twice: {value!r}")
    return list(value)


# ----------------------------------------------------------------------------- checks


def validate(spec: SweepSpec, runs: Sequence[Run] | None = None) -> None:
    """Check every run's config with :class:`AppConfig` (and against the federation size)."""
    runs = spec.runs() if runs is None else runs
    if not runs:
        raise SweepError(f"sweep '{spec.name}': no runs to do")
    for run in runs:
        try:
            config = AppConfig.from_run_config(run.run_config)
        except ConfigError as error:
            axes = f" (axes: {list(spec.axes)})" if spec.axes else ""
            raise SweepError(f"sweep '{spec.name}', cell {run.label}: {error}{axes}") from error
        if config.min_clients > spec.num_supernodes:
            raise SweepError(
                f"sweep '{spec.name}', cell {run.label}: min-clients={config.min_clients} is more "
                f"than federation num-supernodes={spec.num_supernodes}; the run would wait forever"
            )


# ----------------------------------------------------------------------------- filters


def parse_filters(texts: Sequence[str]) -> dict[str, list[Any]]:
    """``["dirichlet-beta=0.1,0.5", "seed=0"]`` -> ``{"dirichlet-beta": [0.1, 0.5], "seed": [0]}``.

    Values are read as YAML scalars, so ``10`` matches an axis value ``10.0``.
    """
    filters: dict[str, list[Any]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise SweepError(f"filter {text!r} must look like 'axis=value' or 'axis=v1,v2'")
        parsed = [yaml.safe_load(v.strip()) for v in values.split(",") if v.strip()]
        filters.setdefault(key, []).extend(parsed)
    return filters


def select(spec: SweepSpec, filters: Mapping[str, list[Any]]) -> list[Run]:
    """The runs whose axis values (and seed) are among the filter's values, for every key."""
    runs = spec.runs()
    for key, wanted in filters.items():
        if key == "seed":
            known = list(spec.seeds)
        elif key in spec.axes:
            known = spec.axes[key]
        else:
            raise SweepError(
                f"cannot filter on '{key}': it is not an axis of sweep '{spec.name}' "
                f"(axes: {[*spec.axes, 'seed']})"
            )
        for value in wanted:
            if not any(same_value(value, k) for k in known):
                raise SweepError(f"filter {key}={value!r} matches nothing; {key} takes {known}")
        runs = [
            run for run in runs if any(same_value(_value_of(run, key), value) for value in wanted)
        ]
    if not runs:
        raise SweepError(f"the filters {dict(filters)} leave no run of sweep '{spec.name}'")
    return runs


def _value_of(run: Run, key: str) -> Any:
    return run.seed if key == "seed" else run.cell.as_dict()[key]
