"""DFA's error channel: opening and closing it, and the feedback matrices it feeds.

The channel is zeros threaded through the forward pass next to the activations. It
changes nothing going forward; going backward, `close_error_channel` puts the
network's output error `e` on it, and every feedback point reads `e` from it.

Shapes. The error has shape `error_shape = (*positions, error_features)`:

- per example, `positions = ()`: `e` is one vector of `error_features` (a
    classifier's logits), and a point after an activation `h` of any shape holds `B`
    of shape `(*h.shape, error_features)` and sends `h` the cotangent `B e`;
- per token, e.g. `positions = (context,)` for a sequence model whose output is
    `(context, vocab)`: a point's `B` has shape `(*shape, error_features)` for the
    activation of *one position*, shared across positions (Launay et al. 2020), and
    the activation, of shape `(*positions, *shape)`, receives `B e_t` at every
    position `t` from its own token's error: `e @ B.T` for `B` of shape
    `(width, vocab)`.
"""

import math
from collections.abc import Sequence

from jax import numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import check_positive_int, check_positive_number
from ._feedback import close, open_channel
from ._misc import default_floating_dtype, uniform


def as_shape(shape: int | Sequence[int], name: str) -> tuple[int, ...]:
    """`shape` as a tuple of positive ints (an int is a vector's size)."""
    if isinstance(shape, int):
        check_positive_int(**{name: shape})
        return (shape,)
    shape = tuple(shape)
    check_positive_int(**{f"{name}[{i}]": n for i, n in enumerate(shape)})
    if not shape:
        raise ValueError(f"`{name}` must have at least one axis, got ().")
    return shape


def open_error_channel(
    x: Array, error_shape: int | Sequence[int], dtype=None
) -> Float[Array, "*error_shape"]:
    """Open the error channel at the start of a model's per-example `__call__`.

    **Arguments:**

    - `x`: the model's input (one example; tokens too). The channel is made to
        depend on it so that under `jax.vmap` every example carries its own error.
    - `error_shape`: the shape of the network output: an int `error_features` for
        one error vector per example, or `(*positions, error_features)`, e.g.
        `(context, vocab)` for a per-token error, which feedback points after
        activations of shape `(context, *shape)` read position by position.
    - `dtype`: the channel's float dtype; defaults to `x`'s if floating, else JAX's
        default float.

    **Returns:**

    Zeros of shape `error_shape`.
    """
    shape = as_shape(error_shape, "error_features")
    if dtype is None:
        x_float = jnp.issubdtype(x.dtype, jnp.floating)
        dtype = x.dtype if x_float else default_floating_dtype()
    return open_channel(x, shape, dtype)


def close_error_channel(
    output: Float[Array, "*error_shape"], channel: Float[Array, "*error_shape"]
) -> Float[Array, "*error_shape"]:
    """Close the error channel at the model's output.

    **Arguments:**

    - `output`: the network output `y` (one example), of the channel's shape:
        `(error_features,)`, or `(*positions, error_features)` per token.
    - `channel`: the channel returned by the last feedback point.

    **Returns:**

    `output`, unchanged. On the backward pass its cotangent `e = ∂L/∂y` is also sent
    down the channel to every feedback point.
    """
    if output.shape != channel.shape:
        raise ValueError(
            f"the network output has shape {output.shape} but the error channel has "
            f"shape {channel.shape}; open the channel with "
            f"`error_shape={output.shape}`."
        )
    return close(output, channel)


def init_feedback(
    shape: tuple[int, ...], error_features: int, scale: float, dtype, key: PRNGKeyArray
) -> Array:
    """`B ~ U(-s/√size, s/√size)` of shape `(*shape, error_features)`, `size` the
    number of entries of the activation it feeds (of one position, per token)."""
    check_positive_int(error_features=error_features)
    check_positive_number(feedback_scale=scale)
    bound = scale / math.sqrt(math.prod(shape))
    return uniform(key, (*shape, error_features), bound, dtype)


def check_point(name: str, feedback: Array, h: Array, channel: Array) -> None:
    """`h` must be `(*positions, *feedback.shape[:-1])` for a channel of shape
    `(*positions, feedback.shape[-1])`."""
    if feedback.ndim < 2:
        raise ValueError(f"{name}'s `feedback` must have shape (*shape, error).")
    if channel.ndim == 0 or channel.shape[-1] != feedback.shape[-1]:
        raise ValueError(
            f"{name} expects an error channel of shape {feedback.shape[-1:]} (or "
            f"(*positions, {feedback.shape[-1]}) per token), got {channel.shape}; "
            "open it with `bfx.open_error_channel`."
        )
    positions = channel.shape[:-1]
    expected = (*positions, *feedback.shape[:-1])
    if h.shape != expected:
        batched = not positions and h.shape[1:] == feedback.shape[:-1]
        hint = " Layers take one example; batch with `jax.vmap`." if batched else ""
        per_token = f" ({len(positions)} leading position axes)" if positions else ""
        raise ValueError(
            f"{name} expects an activation of shape {expected}{per_token}, got "
            f"{h.shape}.{hint}"
        )
