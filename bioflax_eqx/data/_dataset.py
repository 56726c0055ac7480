"""What every data set comes out as: three splits and the facts a model needs."""

import pathlib
from collections.abc import Sequence
from typing import Literal, NamedTuple

import equinox as eqx
from jaxtyping import Array, Float, Int


# The image data sets by name, as messages spell them.
DISPLAY_NAMES = {
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
}


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing and could not be downloaded.

    The message names the missing files and the folder to put them in; the same
    facts are on the attributes `missing` (file names) and `folder`.
    """

    missing: tuple[str, ...]
    folder: pathlib.Path | None

    def __init__(
        self,
        message: str,
        missing: Sequence[str] = (),
        folder: pathlib.Path | None = None,
    ):
        super().__init__(message)
        self.missing = tuple(missing)
        self.folder = folder


class Split(NamedTuple):
    """One split of a data set: inputs `x` and targets `y`, first axis = examples.

    `y` holds `int32` class labels for classification and floats of shape
    `(n, outputs)` for regression.
    """

    x: Float[Array, "n features"]
    y: Int[Array, " n"] | Float[Array, "n outputs"]


class Dataset(eqx.Module):
    """A data set split into `train`, `val` and `test`, plus what a model needs.

    A pytree whose leaves are the arrays; the descriptive fields are static, so a
    whole `Dataset` can be passed through `jax.jit`.

    Inputs are always flat vectors of `n_features`. For image data sets,
    `image_shape` is the `(channels, height, width)` of one image, and
    `x.reshape(*batch, *image_shape)` gives the images (channel-major, rows
    top to bottom): `(1, 28, 28)` for MNIST and Fashion-MNIST, `(3, 32, 32)` for
    CIFAR-10, `None` for data that are not images.
    """

    train: Split
    val: Split
    test: Split
    n_features: int = eqx.field(static=True)
    # None for regression.
    n_classes: int | None = eqx.field(static=True)
    task: Literal["classification", "regression"] = eqx.field(static=True)
    name: str = eqx.field(static=True)
    image_shape: tuple[int, ...] | None = eqx.field(static=True, default=None)

    @property
    def n_outputs(self) -> int:
        """Width of a model's output: classes, or target dimensions."""
        if self.n_classes is not None:
            return self.n_classes
        return self.train.y.shape[-1]
