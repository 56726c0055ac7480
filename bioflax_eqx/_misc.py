import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def default_floating_dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def uniform(
    key: PRNGKeyArray, shape: tuple[int, ...], bound: float, dtype
) -> Float[Array, "..."]:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
