from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
