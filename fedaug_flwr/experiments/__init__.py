"""Sweeps over run configs: YAML grids, a resumable runner, tidy tables and the study's figures.

- :mod:`.grid`: experiment files (base config, axes, exclusions, seeds) -> cells and runs;
- :mod:`.runner`: one real Flower simulation per (cell, seed), skipping complete runs;
- :mod:`.aggregate`: CSV tables per run and per cell (mean, std, n over seeds);
- :mod:`.figures`: the study's figures and Table 1 from those tables;
- :mod:`.claims`: the study's imputation claims as differences paired by seed;
- ``python -m fedaug_flwr.experiments``: the command line (run, list, aggregate, plot).
"""
