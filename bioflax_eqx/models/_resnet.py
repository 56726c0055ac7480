"""He et al. 2016's CIFAR ResNet-20 and its residual block."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._common import BATCH_AXIS, global_average


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
        - `key`: split between the two convolutions (a rule that draws feedback on
            every call, such as brSF, needs it; the others ignore it).

        **Returns:**

        The block's output and the updated state.
        """
        key1, key2 = (None, None) if key is None else jax.random.split(key)
        h, state = self.norm1(self.conv1(x, key=key1), state)
        h = self.activation(h)
        h, state = self.norm2(self.conv2(h, key=key2), state)
        shortcut = x[:, :: self.stride, :: self.stride]
        if self.extra_channels:
            shortcut = jnp.pad(shortcut, ((0, self.extra_channels), (0, 0), (0, 0)))
        return self.activation(h + shortcut), state


def resnet20(
    image_shape: tuple[int, int, int],
    out_size: int,
    activation: Callable = jax.nn.relu,
    *,
    key: PRNGKeyArray,
) -> eqx.nn.Sequential:
    """He et al. 2016's CIFAR ResNet-20: conv 3×3 → 16 with batch norm, three stages
    of three [`ResidualBlock`][bioflax_eqx.ResidualBlock]s (16, 32, 64
    channels; the second and third stages start with stride 2), global average
    pool, dense `out_size`. A flat `eqx.nn.Sequential` whose elements are the
    blocks, so that `bfx.convert(..., "dfa")` gives each block one feedback point.
    Convolutions without biases (the norms have them), as in the paper.

    A plain (backprop) Equinox model with state, float32: build it with
    `eqx.nn.make_with_state(bfx.resnet20)(...)` and call it per example as
    `model(x, state)` under `jax.vmap(..., axis_name=bfx.models.BATCH_AXIS)`.

    **Arguments:**

    - `image_shape`: one input image `(C, H, W)`.
    - `out_size`: the number of outputs.
    - `activation`: after every batch norm of the stem and blocks.
    - `key`: for the initial weights.

    **Returns:**

    An `eqx.nn.Sequential` taking one image `(C, H, W)` and the state.
    """
    keys = iter(jax.random.split(key, 11))
    layers: list = [
        _conv3x3(image_shape[0], 16, 1, key=next(keys)),
        _batch_norm(16),
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
        eqx.nn.Lambda(global_average),
        eqx.nn.Linear(channels, out_size, dtype=jnp.float32, key=next(keys)),
    ]
    return eqx.nn.Sequential(layers)
