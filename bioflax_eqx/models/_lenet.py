"""LeNet as biotorch benchmarks it."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from ._common import features_size, flatten


def lenet(
    image_shape: tuple[int, int, int],
    out_size: int,
    activation: Callable = jnp.tanh,
    *,
    key: PRNGKeyArray,
) -> eqx.nn.Sequential:
    """LeNet as biotorch benchmarks it: conv 5×5 → `c1`, 2×2 max pool, conv 5×5 →
    `c2`, pool, dense `d`, 84, `out_size`. On grey images (MNIST) LeNet-5's widths
    `(c1, c2, d) = (6, 16, 120)` (the 28×28 image padded by 2, as biotorch resizes
    it to 32×32); on colour images (CIFAR-10) biotorch's wider CIFAR LeNet, `(32,
    64, 128)`. Both reach 5×5 features after the second pool, where biotorch's
    third 5×5 convolution is the dense layer `d`.

    A plain (backprop) Equinox model, float32; give it a rule with
    [`bioflax_eqx.convert`][].

    **Arguments:**

    - `image_shape`: one input image `(C, H, W)`.
    - `out_size`: the number of outputs.
    - `activation`: after every hidden layer; LeNet-5's own `tanh` by default.
    - `key`: for the initial weights.

    **Returns:**

    An `eqx.nn.Sequential` taking one image `(C, H, W)`.
    """
    channels, height, _ = image_shape
    c1, c2, d = (6, 16, 120) if channels == 1 else (32, 64, 128)
    keys = jax.random.split(key, 5)
    padding = 2 if height == 28 else 0
    f32 = jnp.float32
    act = eqx.nn.Lambda(activation)
    features = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(channels, c1, 5, padding=padding, dtype=f32, key=keys[0]),
            act,
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Conv2d(c1, c2, 5, dtype=f32, key=keys[1]),
            act,
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Lambda(flatten),
        ]
    )
    n = features_size(features, image_shape)
    return eqx.nn.Sequential(
        [
            *features.layers,
            eqx.nn.Linear(n, d, dtype=f32, key=keys[2]),
            act,
            eqx.nn.Linear(d, 84, dtype=f32, key=keys[3]),
            act,
            eqx.nn.Linear(84, out_size, dtype=f32, key=keys[4]),
        ]
    )
