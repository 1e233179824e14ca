"""bench.gpu_carry: what a lent GPU machine is sent must hold every dependency the app needs."""

from __future__ import annotations

from bench import gpu_carry


def test_every_runtime_dependency_is_carried_or_taken_from_the_image():
    assert gpu_carry.unaccounted_dependencies() == []


def test_a_dependency_nobody_provides_is_named(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["flwr[simulation]==1.42.0", "Scikit_Learn>=1.5",'
        ' "mlxtend>=0.23", "some-new-lib>=2 ; python_version >= \'3.10\'"]\n'
    )
    assert gpu_carry.unaccounted_dependencies(pyproject) == ["some-new-lib"]
