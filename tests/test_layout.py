"""The package's layering: the core (rules, DFA, feedback primitives, convert, MLP,
optimiser masks, metrics) stands on its own, without data loading, the reference
models or training; the reference models (`bioflax_eqx.models`) stand on the core
alone; data loading stands on nothing of the package but its argument checks."""

import subprocess
import sys
import textwrap

import pytest


CORE = (
    "_rules",
    "_sign",
    "_registry",
    "_feedback",
    "_dfa",
    "_channel",
    "_convert",
    "_mlp",
    "_optim",
    "_metrics",
    "_layers",
    "_checks",
    "_mirror",
)


def _loaded(modules: tuple[str, ...]) -> set[str]:
    """The package's modules that importing `modules` (of `bioflax_eqx`) loads.

    `bioflax_eqx/__init__.py` exports data and training too, so importing
    `bioflax_eqx._rules` the usual way would load them through the package. The
    fresh interpreter below registers an empty `bioflax_eqx` package (its real
    folder, its `__init__` not run) and then really imports each module: what ends
    up in `sys.modules` is exactly their own import graph."""
    script = textwrap.dedent(
        f"""
        import importlib, importlib.util, sys, types

        spec = importlib.util.find_spec("bioflax_eqx")
        package = types.ModuleType("bioflax_eqx")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["bioflax_eqx"] = package
        for name in {modules!r}:
            importlib.import_module("bioflax_eqx." + name)
        print(" ".join(sorted(m for m in sys.modules if m.startswith("bioflax_eqx."))))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    loaded = set(done.stdout.split())
    assert {f"bioflax_eqx.{name}" for name in modules} <= loaded
    return loaded


@pytest.mark.parametrize(
    "modules, forbidden",
    [
        (CORE, ("data", "models", "training")),
        (("models",), ("data", "training")),
        (("data",), ("models", "training", *(m for m in CORE if m != "_checks"))),
    ],
    ids=["core", "models", "data"],
)
def test_each_floor_stands_on_the_ones_below(modules, forbidden):
    loaded = _loaded(modules)
    outside = {
        m
        for m in loaded
        if m.startswith(tuple(f"bioflax_eqx.{name}" for name in forbidden))
    }
    assert not outside, f"{modules} load {sorted(outside)}"
