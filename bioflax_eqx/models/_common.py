"""What the reference networks share: the name of the batch axis of their batch
norms, and the helpers that size a dense layer after convolutions."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


# Batch norm's statistics are over the vmapped batch of this name: call a model
# with batch norm under `jax.vmap(..., axis_name=BATCH_AXIS)`.
BATCH_AXIS = "batch"


def flatten(x: Array) -> Array:
    return jnp.ravel(x)


def global_average(x: Float[Array, "channels height width"]) -> Array:
    return jnp.mean(x, axis=(1, 2))


def features_size(features: eqx.nn.Sequential, image_shape: tuple[int, ...]) -> int:
    """The number of features `features` makes of one image, from shapes alone."""
    x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    return math.prod(jax.eval_shape(features, x).shape)
