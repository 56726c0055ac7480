"""The package's layering: the core (rules, DFA, feedback primitives, convert, MLP,
optimiser masks, metrics) stands on its own, without data loading or training."""

import subprocess
import sys
import textwrap


CORE = (
    "_rules",
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


def test_core_imports_neither_data_nor_training():
    # `bioflax_eqx/__init__.py` exports data and training too, so importing
    # `bioflax_eqx._rules` the usual way would load them through the package. The
    # fresh interpreter below registers an empty `bioflax_eqx` package (its real
    # folder, its `__init__` not run) and then really imports each core module: what
    # ends up in `sys.modules` is exactly the core's own import graph.
    script = textwrap.dedent(
        f"""
        import importlib, importlib.util, sys, types

        spec = importlib.util.find_spec("bioflax_eqx")
        package = types.ModuleType("bioflax_eqx")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["bioflax_eqx"] = package
        for name in {CORE!r}:
            importlib.import_module("bioflax_eqx." + name)
        print(" ".join(sorted(m for m in sys.modules if m.startswith("bioflax_eqx."))))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    loaded = set(done.stdout.split())
    assert {f"bioflax_eqx.{name}" for name in CORE} <= loaded
    outside = {
        m for m in loaded if m.startswith(("bioflax_eqx.data", "bioflax_eqx.training"))
    }
    assert not outside, f"the core loads {sorted(outside)}"
