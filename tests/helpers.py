"""What the tests share: tree comparisons, and the trainer's small runs."""

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import bioflax_eqx as bfx
from bioflax_eqx.training._build import build_model


def tree_allclose(x, y, *, rtol=1e-10, atol=1e-10) -> bool:
    """Same structure, and every pair of leaves is close (arrays) or equal (others)."""
    x_leaves, x_def = jax.tree_util.tree_flatten(x)
    y_leaves, y_def = jax.tree_util.tree_flatten(y)
    if x_def != y_def:
        return False
    for a, b in zip(x_leaves, y_leaves):
        if isinstance(a, jax.Array | np.ndarray):
            if jnp.shape(a) != jnp.shape(b) or not np.allclose(
                np.asarray(a), np.asarray(b), rtol=rtol, atol=atol
            ):
                return False
        elif a != b:
            return False
    return True


def layers_of(model) -> list[Any]:
    """`model.layers` as a list of `Any`: `bfx.MLP.layers` is typed as callables,
    which hides the layers' `weight`, `bias` and `feedback` from pyright."""
    return list(model.layers)


# ---------------------------------------------------------------- the trainer's runs

# 500 training, 100 validation and 600 test examples; 10 steps per epoch. A warm-up,
# so that the step count matters: the optimiser state must be restored exactly. The
# tests' MNIST runs share it, and so their compiled programs.
SMALL: dict[str, Any] = dict(
    dataset="mnist",
    limit=600,
    val_size=100,
    width=16,
    depth=1,
    batch_size=50,
    warmup_epochs=1,
    metrics_batch=100,
)


def small(tmp_path, mnist_dir, **changes) -> bfx.TrainConfig:
    """`SMALL` on the MNIST files in `mnist_dir`, writing to `tmp_path`."""
    fields = {**SMALL, "data_dir": str(mnist_dir), "out": str(tmp_path), **changes}
    return bfx.TrainConfig(**fields)


def without_times(history: list[dict]) -> list[dict]:
    """Epoch records without their timings, which no two runs share."""
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in history]


def read_lines(path: pathlib.Path) -> list[dict]:
    """The records of a JSON-lines file (`metrics.jsonl`)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


class Killed(Exception):
    """Raised by a test's callback to interrupt a run."""


def build_with_state(config: bfx.TrainConfig, seed: int = 0) -> tuple[Any, Any]:
    """The initial model and state of a run; under train's dtype promotion, so that
    the operations compiled for the runs of the other tests are reused."""
    with jax.numpy_dtype_promotion("standard"):
        key = jax.random.split(jax.random.key(seed), 4)[1]  # as train derives it
        return build_model(config, key)


def build(config: bfx.TrainConfig, seed: int = 0) -> Any:
    """The initial model of a run."""
    return build_with_state(config, seed)[0]
