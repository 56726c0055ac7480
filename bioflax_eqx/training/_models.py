"""The trainer's networks, as plain Equinox models (backprop), converted to a rule
with [`bioflax_eqx.convert`][]: so that backprop and every rule start from the same
weights for a seed."""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._mlp import MLP


# Batch norm's statistics are over the vmapped batch of this name.
BATCH_AXIS = "batch"


def _flatten(x: Array) -> Array:
    return jnp.ravel(x)


def _global_average(x: Float[Array, "channels height width"]) -> Array:
    return jnp.mean(x, axis=(1, 2))


def mlp(
    in_size: int,
    out_size: int,
    width: int,
    depth: int,
    activation: Callable,
    *,
    key: PRNGKeyArray,
) -> MLP:
    """A [`bioflax_eqx.MLP`][] trained by backprop, on flat inputs."""
    return MLP(
        in_size,
        out_size,
        width,
        depth,
        rule="bp",
        activation=activation,
        dtype=jnp.float32,
        key=key,
    )


def lenet(
    image_shape: tuple[int, int, int],
    out_size: int,
    activation: Callable,
    *,
    key: PRNGKeyArray,
) -> eqx.nn.Sequential:
    """LeNet as biotorch benchmarks it: conv 5×5 → `c1`, 2×2 max pool, conv 5×5 →
    `c2`, pool, dense `d`, 84, `out_size`. On grey images (MNIST) LeNet-5's widths
    `(c1, c2, d) = (6, 16, 120)` (the 28×28 image padded by 2, as biotorch resizes
    it to 32×32); on colour images (CIFAR-10) biotorch's wider CIFAR LeNet, `(32,
    64, 128)`. Both reach 5×5 features after the second pool, where biotorch's
    third 5×5 convolution is the dense layer `d`."""
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
            eqx.nn.Lambda(_flatten),
        ]
    )
    n = _features_size(features, image_shape)
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


def vgg(
    image_shape: tuple[int, int, int],
    out_size: int,
    activation: Callable,
    *,
    key: PRNGKeyArray,
) -> eqx.nn.Sequential:
    """A small VGG-style net: three stages of a 3×3 convolution (padding 1; 32, 64
    and 128 channels) and a 2×2 max pool, then dense 256 and `out_size`."""
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
    layers.append(eqx.nn.Lambda(_flatten))
    n = _features_size(eqx.nn.Sequential(layers), image_shape)
    return eqx.nn.Sequential(
        [
            *layers,
            eqx.nn.Linear(n, 256, dtype=f32, key=next(keys)),
            act,
            eqx.nn.Linear(256, out_size, dtype=f32, key=next(keys)),
        ]
    )


def _features_size(features: eqx.nn.Sequential, image_shape: tuple[int, ...]) -> int:
    x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
    return math.prod(jax.eval_shape(features, x).shape)


def _conv3x3(
    in_channels: int, out_channels: int, stride: int, *, key: PRNGKeyArray
) -> eqx.nn.Conv2d:
    # No bias: the batch norm after it has one.
    return eqx.nn.Conv2d(
        in_channels,
        out_channels,
        3,
        stride=stride,
        padding=1,
        use_bias=False,
        dtype=jnp.float32,
        key=key,
    )


def _batch_norm(channels: int) -> eqx.nn.BatchNorm:
    # PyTorch's momentum of 0.1 for the running statistics.
    return eqx.nn.BatchNorm(
        channels, axis_name=BATCH_AXIS, mode="batch", momentum=0.9, dtype=jnp.float32
    )


class ResidualBlock(eqx.nn.StatefulLayer):
    """He et al.'s basic block: conv 3×3, batch norm, activation, conv 3×3, batch
    norm, plus the shortcut, then the activation. The shortcut is option A of the
    paper (CIFAR): identity, or where the block halves the image and doubles the
    channels, every second pixel with zero channels appended (no parameters)."""

    conv1: eqx.nn.Conv2d
    norm1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    norm2: eqx.nn.BatchNorm
    activation: Callable
    stride: int = eqx.field(static=True)
    extra_channels: int = eqx.field(static=True)
    # Read by `bfx.convert` to trace the block's shapes under the right vmap.
    axis_name: str = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        activation: Callable,
        *,
        key: PRNGKeyArray,
    ):
        key1, key2 = jax.random.split(key)
        self.conv1 = _conv3x3(in_channels, out_channels, stride, key=key1)
        self.norm1 = _batch_norm(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, 1, key=key2)
        self.norm2 = _batch_norm(out_channels)
        self.activation = activation
        self.stride = stride
        self.extra_channels = out_channels - in_channels
        self.axis_name = BATCH_AXIS

    def is_stateful(self) -> bool:
        return True

    def __call__(
        self,
        x: Float[Array, "channels height width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Array, eqx.nn.State]:
        """**Arguments:**

        - `x`: one image `(C, H, W)`.
        - `state`: the batch norms' state.
        - `key`: unused.

        **Returns:**

        The block's output and the updated state.
        """
        del key
        h, state = self.norm1(self.conv1(x), state)
        h = self.activation(h)
        h, state = self.norm2(self.conv2(h), state)
        shortcut = x[:, :: self.stride, :: self.stride]
        if self.extra_channels:
            shortcut = jnp.pad(shortcut, ((0, self.extra_channels), (0, 0), (0, 0)))
        return self.activation(h + shortcut), state


def resnet20(
    image_shape: tuple[int, int, int],
    out_size: int,
    activation: Callable,
    *,
    key: PRNGKeyArray,
) -> eqx.nn.Sequential:
    """He et al. 2016's CIFAR ResNet-20: conv 3×3 → 16 with batch norm, three stages
    of three [`ResidualBlock`][bioflax_eqx.training.ResidualBlock]s (16, 32, 64
    channels; the second and third stages start with stride 2), global average
    pool, dense `out_size`. A flat `eqx.nn.Sequential` whose elements are the
    blocks, so that `bfx.convert(..., "dfa")` gives each block one feedback point.
    Convolutions without biases (the norms have them), as in the paper."""
    keys = iter(jax.random.split(key, 11))
    f32 = jnp.float32
    layers: list = [
        eqx.nn.Conv2d(
            image_shape[0], 16, 3, padding=1, use_bias=False, dtype=f32, key=next(keys)
        ),
        eqx.nn.BatchNorm(
            16, axis_name=BATCH_AXIS, mode="batch", momentum=0.9, dtype=f32
        ),
        eqx.nn.Lambda(activation),
    ]
    channels = 16
    for width in (16, 32, 64):
        for i in range(3):
            stride = 2 if i == 0 and width != 16 else 1
            layers.append(
                ResidualBlock(channels, width, stride, activation, key=next(keys))
            )
            channels = width
    layers += [
        eqx.nn.Lambda(_global_average),
        eqx.nn.Linear(channels, out_size, dtype=jnp.float32, key=next(keys)),
    ]
    return eqx.nn.Sequential(layers)
