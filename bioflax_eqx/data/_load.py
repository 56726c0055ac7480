"""The image data sets' entry point: `load_dataset`."""

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, PRNGKeyArray

from .._checks import check_positive_int
from ._cifar import CIFAR10_SHAPE, cifar10_normaliser, read_cifar10
from ._dataset import DISPLAY_NAMES, Dataset, Split
from ._download import resolve_data_dir
from ._idx import MNIST_SHAPE, read_mnist


# `(channels, height, width)` of one image of each image data set.
IMAGE_SHAPES = {
    "mnist": MNIST_SHAPE,
    "fashion_mnist": MNIST_SHAPE,
    "cifar10": CIFAR10_SHAPE,
}
# Training and test examples of each image data set (known without reading it).
IMAGE_SIZES = {
    "mnist": (60_000, 10_000),
    "fashion_mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
}


# Jitted: op by op, the permutation alone compiles many small programs.
@functools.partial(jax.jit, static_argnames="val_size")
def _hold_out(
    key: PRNGKeyArray | None, x: Array, y: Array, val_size: int
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    n = x.shape[0]
    if key is None:
        return (x[: n - val_size], y[: n - val_size]), (
            x[n - val_size :],
            y[n - val_size :],
        )
    perm = jax.random.permutation(key, n)
    # Both parts keep file order: the key only decides membership.
    train_idx = jnp.sort(perm[: n - val_size])
    val_idx = jnp.sort(perm[n - val_size :])
    return (
        (jnp.take(x, train_idx, axis=0), jnp.take(y, train_idx, axis=0)),
        (jnp.take(x, val_idx, axis=0), jnp.take(y, val_idx, axis=0)),
    )


def _scaler(name: str, train_x: Array, dtype: np.dtype) -> Callable[[Array], Array]:
    """How uint8 pixels become inputs: CIFAR-10 standardised per channel with
    statistics of the training split `train_x`, the others scaled to `[0, 1]`."""
    if name == "cifar10":
        return cifar10_normaliser(train_x, dtype)
    return lambda x: x.astype(dtype) / jnp.asarray(255, dtype)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    val_size: int = 5000,
    key: PRNGKeyArray | None = None,
    limit: int | None = None,
    dtype: DTypeLike = jnp.float32,
) -> Dataset:
    """Loads MNIST, Fashion-MNIST or CIFAR-10, downloading the files once if needed.

    **Arguments:**

    - `name`: `"mnist"`, `"fashion_mnist"` or `"cifar10"`.
    - `data_dir`: the folder holding the data; see
        `bioflax_eqx.data.resolve_data_dir` for the default. For MNIST and
        Fashion-MNIST, the four IDX files (gzipped or plain). For CIFAR-10, the
        binary distribution `cifar-10-binary.tar.gz` (read without extracting),
        or its extracted `cifar-10-batches-bin/` folder (used first when
        complete), or the folder's six `.bin` files themselves.
    - `download`: when files are missing, fetch them (the four `.gz` files from
        the known mirrors; CIFAR-10's archive from
        `https://www.cs.toronto.edu/~kriz/`) into the folder, verifying their
        checksums. Without it, or offline, a
        [`DataNotFoundError`][bioflax_eqx.DataNotFoundError] names the missing
        files and the folder to put them in.
    - `val_size`: examples of the training set held out as the validation split
        (may be 0).
    - `key`: decides which training examples are held out. `None` holds out the
        last `val_size` in file order.
    - `limit`: read only the first `limit` training and the first `limit` test
        examples (before the validation split), for fast tests. MNIST files read
        in full are also checked against the published checksums; the CIFAR-10
        archive is always checked against its published MD5 (the extracted
        files have no published checksum: only their record structure is
        checked).
    - `dtype`: floating dtype of the inputs.

    **Returns:**

    A [`Dataset`][bioflax_eqx.Dataset] with `task="classification"`,
    `n_classes=10`, `int32` labels and flat inputs; train and validation keep
    file order.

    - MNIST, Fashion-MNIST: `n_features=784`, `image_shape=(1, 28, 28)`, pixels
        scaled to `[0, 1]`.
    - CIFAR-10: `n_features=3072`, `image_shape=(3, 32, 32)`, channel-major
        (`x.reshape(3, 32, 32)` is the image). Pixels are scaled to `[0, 1]`,
        then every channel is normalised with the mean and standard deviation
        (over all its pixels, `ddof=0`) of the `train` split actually loaded,
        that is after `limit` and after the validation split is held out; the
        same statistics are applied to the validation and test splits. On the
        full 45,000-image default split they are close to the commonly quoted
        means (0.491, 0.482, 0.447) and stds (0.247, 0.243, 0.262).
    """
    if name not in DISPLAY_NAMES:
        raise ValueError(
            f"unknown data set {name!r}; expected one of {sorted(DISPLAY_NAMES)}"
        )
    if limit is not None:
        check_positive_int(limit=limit)
    read = read_cifar10 if name == "cifar10" else functools.partial(read_mnist, name)
    train_x, train_y, test_x, test_y = read(
        resolve_data_dir(data_dir, name), download, limit
    )
    if not 0 <= val_size < train_x.shape[0]:
        raise ValueError(
            f"val_size must be in [0, {train_x.shape[0]}) for {train_x.shape[0]} "
            f"training examples, got {val_size}"
        )
    # Hold out and move to the device as uint8 (a quarter of the bytes), then scale.
    (tx, ty), (vx, vy) = _hold_out(
        key, jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32), val_size
    )
    scale = _scaler(name, tx, jnp.dtype(dtype))
    test = Split(scale(jnp.asarray(test_x)), jnp.asarray(test_y, jnp.int32))
    return Dataset(
        train=Split(scale(tx), ty),
        val=Split(scale(vx), vy),
        test=test,
        n_features=train_x.shape[1],
        n_classes=10,
        task="classification",
        name=name,
        image_shape=IMAGE_SHAPES[name],
    )
