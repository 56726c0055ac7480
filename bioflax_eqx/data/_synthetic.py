"""Synthetic regression tasks, drawn from an explicit key: a random teacher network
and a sine."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Float, PRNGKeyArray

from .._checks import check_non_negative_int, check_positive_int
from ._dataset import Dataset, Split


def _regression_splits(
    x: Float[Array, "n features"],
    y: Float[Array, "n outputs"],
    noise: Float[Array, "n outputs"],
    n_train: int,
    n_val: int,
) -> tuple[Split, Split, Split]:
    n_fit = n_train + n_val
    # Noise on the splits that are fit or tuned on; test targets stay clean so the
    # test loss measures the distance to the true function.
    y = jnp.concatenate([y[:n_fit] + noise[:n_fit], y[n_fit:]])
    return (
        Split(x[:n_train], y[:n_train]),
        Split(x[n_train:n_fit], y[n_train:n_fit]),
        Split(x[n_fit:], y[n_fit:]),
    )


# One compiled program per configuration: op by op, every small operation would
# compile separately (seconds on CPU).
@functools.partial(jax.jit, static_argnames=("sizes", "n_splits", "dtype"))
def _teacher_student_splits(
    key: PRNGKeyArray,
    noise_std: Float[Array, ""] | float,
    *,
    sizes: tuple[int, ...],
    n_splits: tuple[int, int, int],
    dtype: np.dtype,
) -> tuple[Split, Split, Split]:
    teacher_key, data_key = jax.random.split(key)
    # Two draws in all: each one adds a threefry kernel, slow to compile on CPU.
    # The teacher depends only on its key and sizes, not on the number of examples.
    shapes = [(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
    n_params = sum(a * b + b for a, b in shapes)
    params = jax.random.normal(teacher_key, (n_params,), dtype)
    data = jax.random.normal(data_key, (sum(n_splits), sizes[0] + sizes[-1]), dtype)
    x, noise = data[:, : sizes[0]], noise_std * data[:, sizes[0] :]
    h, start = x, 0
    for i, (fan_in, fan_out) in enumerate(shapes):
        scale = 1 / math.sqrt(fan_in)
        w = scale * params[start : start + fan_in * fan_out].reshape(fan_in, fan_out)
        start += fan_in * fan_out
        b = scale * params[start : start + fan_out]
        start += fan_out
        h = h @ w + b[None, :]
        if i < len(shapes) - 1:
            h = jnp.tanh(h)
    return _regression_splits(x, h, noise, n_splits[0], n_splits[1])


def teacher_student(
    key: PRNGKeyArray,
    *,
    n_train: int,
    n_test: int,
    in_size: int,
    out_size: int,
    width: int,
    depth: int,
    n_val: int = 0,
    noise_std: float = 0.0,
    dtype: DTypeLike = jnp.float32,
) -> Dataset:
    """A regression task whose targets come from a random, fixed teacher network.

    The teacher is a tanh MLP with `depth` hidden layers of `width` units and a
    linear output layer; its weights and biases are drawn from
    `N(0, 1/fan_in)`. Inputs are standard normal.

    **Arguments:**

    - `key`: decides the teacher, the inputs and the noise.
    - `n_train`, `n_val`, `n_test`: examples in each split.
    - `in_size`, `out_size`: input and target dimensions.
    - `width`, `depth`: the teacher's hidden width and number of hidden layers
        (`depth=0` gives an affine teacher).
    - `noise_std`: standard deviation of Gaussian noise added to the train and
        validation targets (test targets are the teacher's exact outputs).
    - `dtype`: floating dtype of inputs and targets.

    **Returns:**

    A [`Dataset`][bioflax_eqx.Dataset] with `task="regression"`, `n_classes=None`,
    inputs of shape `(n, in_size)` and targets of shape `(n, out_size)`.
    """
    check_positive_int(n_train=n_train, in_size=in_size, out_size=out_size, width=width)
    check_non_negative_int(n_val=n_val, n_test=n_test, depth=depth)
    train, val, test = _teacher_student_splits(
        key,
        noise_std,
        sizes=(in_size, *[width] * depth, out_size),
        n_splits=(n_train, n_val, n_test),
        dtype=jnp.dtype(dtype),
    )
    return Dataset(
        train=train,
        val=val,
        test=test,
        n_features=in_size,
        n_classes=None,
        task="regression",
        name="teacher_student",
    )


@functools.partial(jax.jit, static_argnames=("n_splits", "dtype"))
def _sine_splits(
    key: PRNGKeyArray,
    noise_std: Float[Array, ""] | float,
    *,
    n_splits: tuple[int, int, int],
    dtype: np.dtype,
) -> tuple[Split, Split, Split]:
    x_key, noise_key = jax.random.split(key)
    shape = (sum(n_splits), 1)
    x = jax.random.uniform(x_key, shape, dtype, minval=-math.pi, maxval=math.pi)
    noise = noise_std * jax.random.normal(noise_key, shape, dtype)
    return _regression_splits(x, jnp.sin(x), noise, n_splits[0], n_splits[1])


def sine(
    key: PRNGKeyArray,
    *,
    n_train: int,
    n_test: int,
    n_val: int = 0,
    noise_std: float = 0.0,
    dtype: DTypeLike = jnp.float32,
) -> Dataset:
    """A one-dimensional regression task: `y = sin(x)` for `x` uniform on
    `[-pi, pi)`.

    **Arguments:**

    - `key`: decides the inputs and the noise.
    - `n_train`, `n_val`, `n_test`: examples in each split.
    - `noise_std`: standard deviation of Gaussian noise added to the train and
        validation targets (test targets are exact).
    - `dtype`: floating dtype of inputs and targets.

    **Returns:**

    A [`Dataset`][bioflax_eqx.Dataset] with `task="regression"`, `n_classes=None`,
    `n_features=1` and inputs and targets of shape `(n, 1)`.
    """
    check_positive_int(n_train=n_train)
    check_non_negative_int(n_val=n_val, n_test=n_test)
    train, val, test = _sine_splits(
        key, noise_std, n_splits=(n_train, n_val, n_test), dtype=jnp.dtype(dtype)
    )
    return Dataset(
        train=train,
        val=val,
        test=test,
        n_features=1,
        n_classes=None,
        task="regression",
        name="sine",
    )
