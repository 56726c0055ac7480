"""A small VGG-style network."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ._common import features_size, flatten


def vgg(
    image_shape: tuple[int, int, int],
    out_size: int,
    activation: Callable = jax.nn.relu,
    *,
    key: PRNGKeyArray,
) -> eqx.nn.Sequential:
    """A small VGG-style net: three stages of a 3×3 convolution (padding 1; 32, 64
    and 128 channels) and a 2×2 max pool, then dense 256 and `out_size`.

    A plain (backprop) Equinox model, float32; give it a rule with
    [`bioflax_eqx.convert`][].

    **Arguments:**

    - `image_shape`: one input image `(C, H, W)`.
    - `out_size`: the number of outputs.
    - `activation`: after every hidden layer.
    - `key`: for the initial weights.

    **Returns:**

    An `eqx.nn.Sequential` taking one image `(C, H, W)`.
    """
    keys = iter(jax.random.split(key, 5))
    f32 = jnp.float32
    act = eqx.nn.Lambda(activation)
    layers = []
    channels = image_shape[0]
    for width in (32, 64, 128):
        layers += [
            eqx.nn.Conv2d(channels, width, 3, padding=1, dtype=f32, key=next(keys)),
            act,
            eqx.nn.MaxPool2d(2, 2),
        ]
        channels = width
    layers.append(eqx.nn.Lambda(flatten))
    n = features_size(eqx.nn.Sequential(layers), image_shape)
    return eqx.nn.Sequential(
        [
            *layers,
            eqx.nn.Linear(n, 256, dtype=f32, key=next(keys)),
            act,
            eqx.nn.Linear(256, out_size, dtype=f32, key=next(keys)),
        ]
    )
