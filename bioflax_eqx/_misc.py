import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def default_floating_dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def check_positive(**sizes: int) -> None:
    """Raise a ValueError naming the first size that is not a positive integer."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_scale(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")


def uniform(
    key: PRNGKeyArray, shape: tuple[int, ...], bound: float, dtype
) -> Float[Array, "..."]:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
