"""Checks of arguments, with one message style: "`name` must be a ..., got ...".

Each raises a `ValueError` naming the first argument that fails (the number checks
an `ArgumentError`, which says which argument and why: the trainer's configuration
turns it into a `ConfigError`).
"""

import math
import numbers
from collections.abc import Callable
from typing import TypeGuard

import equinox as eqx
import jax
from jaxtyping import Array


def is_int(x: object) -> TypeGuard[int]:
    # `True` is an `int` too, but never a size.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_finite(x: object) -> TypeGuard[float]:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


class ArgumentError(ValueError):
    """A failed check of one argument: `name` must be ..., `reason` says what."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"`{name}` {reason}")
        self.name = name
        self.reason = reason


def _check(
    values: dict[str, object],
    kind: str,
    is_kind: Callable[[object], TypeGuard[float]],
    zero_ok: bool,
) -> None:
    for name, value in values.items():
        if not (is_kind(value) and (value >= 0 if zero_ok else value > 0)):
            sign = "non-negative" if zero_ok else "positive"
            raise ArgumentError(name, f"must be a {sign} {kind}, got {value!r}.")


def check_positive_int(**values: object) -> None:
    _check(values, "integer", is_int, zero_ok=False)


def check_non_negative_int(**values: object) -> None:
    _check(values, "integer", is_int, zero_ok=True)


def check_positive_number(**values: object) -> None:
    _check(values, "finite number", _is_finite, zero_ok=False)


def check_non_negative_number(**values: object) -> None:
    _check(values, "finite number", _is_finite, zero_ok=True)


def check_layer(layer: object, name: str) -> None:
    """`layer` must be a callable Equinox module with a floating `weight` array."""
    weight = getattr(layer, "weight", None)
    if not isinstance(layer, eqx.Module) or not eqx.is_inexact_array(weight):
        raise ValueError(
            f"{name} wraps an Equinox layer with a floating-point `weight` array "
            f"(e.g. `eqx.nn.Linear`, `eqx.nn.Conv2d`), got {type(layer).__name__}."
        )


def _as_computed(layer: object) -> object:
    """The convolution that `bfx.Im2colConv` computes (its custom derivatives are
    not transposable by `jax.linear_transpose`, the function is the same), else
    `layer`."""
    conv = getattr(layer, "conv", None)
    return conv if isinstance(conv, eqx.nn.Conv) else layer


def example_input(layer: object) -> jax.ShapeDtypeStruct | None:
    """One example's input to `layer`, when the layer itself says it: a dense
    layer's `in_features`; a convolution's `in_channels`, with the smallest
    spatial size its kernel fits; a norm's `shape`; an embedding's index. `None`
    otherwise: a layer of your own is checked when first called."""
    layer = _as_computed(layer)
    weight = getattr(layer, "weight", None)
    if not eqx.is_inexact_array(weight):
        return None
    if isinstance(layer, eqx.nn.Linear):
        shape = () if layer.in_features == "scalar" else (layer.in_features,)
    elif isinstance(layer, eqx.nn.Conv | eqx.nn.ConvTranspose):
        spans = [(k - 1) * d + 1 for k, d in zip(layer.kernel_size, layer.dilation)]
        shape = (layer.in_channels, *spans)
    elif isinstance(layer, eqx.nn.LayerNorm | eqx.nn.RMSNorm):
        shape = layer.shape
    elif isinstance(layer, eqx.nn.Embedding):
        return jax.ShapeDtypeStruct((), jax.numpy.int32)  # an index
    else:
        return None
    return jax.ShapeDtypeStruct(shape, weight.dtype)  # pyright: ignore[reportOptionalMemberAccess]


def check_linear(layer: object, x: jax.ShapeDtypeStruct, name: str) -> None:
    """`layer` must be linear in its input (up to its bias): a rule sends the error
    back through the transpose of its map, with `B` in place of `W`.

    Checked on shapes alone, by transposing `layer` at an input like `x`, so it
    costs one trace and no computation."""
    layer = _as_computed(layer)
    if not jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
        raise ValueError(
            f"{name} wraps a layer linear in a floating-point input; "
            f"{type(layer).__name__} takes {x.dtype} input."
        )
    arrays, static = eqx.partition(layer, eqx.is_array)
    arrays = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arrays
    )

    def call(arrays, x):
        return eqx.combine(arrays, static)(x)  # pyright: ignore[reportCallIssue]

    out = jax.eval_shape(call, arrays, x)

    def transpose(arrays, ct):
        return jax.linear_transpose(lambda x: call(arrays, x), x)(ct)

    try:
        jax.eval_shape(transpose, arrays, out)
    except Exception as e:
        # JAX found an operation it cannot transpose; its error is the cause.
        raise ValueError(
            f"{name} wraps a layer linear in its input (`op(W, x) + b`), such as "
            f"`eqx.nn.Linear` or `eqx.nn.Conv2d`; {type(layer).__name__} is not "
            "(JAX cannot transpose it)."
        ) from e


def check_feedback(name: str, feedback: Array | None, weight: Array) -> None:
    if feedback is None or feedback.shape != weight.shape:
        got = None if feedback is None else feedback.shape
        raise ValueError(
            f"`{name}` must have the shape of the wrapped layer's weight, "
            f"{weight.shape}, got {got}."
        )
    if feedback.dtype != weight.dtype:
        raise ValueError(
            f"`{name}` must have the weight's dtype {weight.dtype}, got "
            f"{feedback.dtype}."
        )


def check_vector_input(x: Array, size: int, name: str) -> None:
    """A clear error for the most common mistake: a batch passed to a per-example
    dense layer or MLP (shapes are static, so this costs nothing after tracing)."""
    if x.shape != (size,):
        hint = (
            " Layers take one example; batch with `jax.vmap`."
            if x.ndim == 2 and x.shape[-1] == size
            else ""
        )
        raise ValueError(
            f"{name} expects an input of shape ({size},), got {x.shape}.{hint}"
        )


def check_conv_input(
    conv: eqx.nn.Conv | eqx.nn.ConvTranspose, x: Array, name: str
) -> None:
    """A convolution's input in the layer's terms (XLA's own message speaks of
    `lhs feature dimension`s): one example, `(in_channels, *spatial)`."""
    rank = conv.num_spatial_dims + 1
    if x.ndim != rank or x.shape[0] != conv.in_channels:
        spatial = ", ".join(["..."] * conv.num_spatial_dims)
        hint = (
            " Layers take one example; batch with `jax.vmap`."
            if x.ndim == rank + 1 and x.shape[1] == conv.in_channels
            else ""
        )
        raise ValueError(
            f"{name} expects an input of shape ({conv.in_channels}, {spatial}) "
            f"({conv.in_channels} channels, {conv.num_spatial_dims} spatial axes), "
            f"got {x.shape}.{hint}"
        )


def check_linear_input(layer: object, x: Array, name: str) -> None:
    if isinstance(layer, eqx.nn.Linear) and layer.in_features != "scalar":
        check_vector_input(x, layer.in_features, name)
    conv = getattr(layer, "conv", layer)  # a convolution, or one computed by im2col
    if isinstance(conv, eqx.nn.Conv | eqx.nn.ConvTranspose):
        check_conv_input(conv, x, name)


def check_wrappable(layer: object, name: str) -> None:
    """`layer` can carry a rule: an Equinox module with a floating `weight`, linear
    in its input where its input is known before a call (see `example_input`)."""
    check_layer(layer, name)
    x = example_input(layer)
    if x is not None:
        check_linear(layer, x, name)
