"""Cutting an epoch into minibatches and augmenting images, both on device."""

import functools
import math

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, Shaped

from .._checks import check_non_negative_int


@functools.partial(jax.jit, static_argnames="batch_size")
def epoch_batches(
    key: PRNGKeyArray | None,
    x: Shaped[Array, " n *xdims"],
    y: Shaped[Array, " n *ydims"],
    batch_size: int,
) -> tuple[Shaped[Array, "steps batch *xdims"], Shaped[Array, "steps batch *ydims"]]:
    """Shuffles one epoch and cuts it into equal minibatches, on device.

    The last `n % batch_size` examples of the shuffled order are dropped, so every
    step has the same shape (one compilation) and each example is seen at most once
    per epoch; a different key drops different examples. Compiled with `jax.jit`
    (`batch_size` static); it also traces inside a caller's `jit`.

    **Arguments:**

    - `key`: decides the order; `None` keeps the examples' own order (the last
        `n % batch_size` dropped).
    - `x`, `y`: inputs and targets, first axis = examples.
    - `batch_size`: examples per step, in `[1, n]`.

    **Returns:**

    `(xb, yb)` of shapes `(n // batch_size, batch_size, ...)`, with `xb[i, j]`
    still paired with `yb[i, j]`; scan over the first axis.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} examples but y has {y.shape[0]}")
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    steps = n // batch_size
    if key is None:
        xb, yb = x[: steps * batch_size], y[: steps * batch_size]
    else:
        idx = jax.random.permutation(key, n)[: steps * batch_size]
        xb, yb = jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)
    return (
        xb.reshape(steps, batch_size, *x.shape[1:]),
        yb.reshape(steps, batch_size, *y.shape[1:]),
    )


def _crop_and_flip(
    images: Float[Array, "n channels height width"],
    offsets: Int[Array, "n 2"],
    flips: Shaped[Array, " n"],
    pad: int,
) -> Float[Array, "n channels height width"]:
    """Crops each zero-padded image at its `(row, column)` offset in
    `[0, 2 * pad]`, then mirrors it left-right where `flips` is true."""
    c, h, w = images.shape[1:]
    if pad:
        padded = jnp.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))

        def crop(image: Array, offset: Array) -> Array:
            start = (jnp.zeros((), offset.dtype), offset[0], offset[1])
            return lax.dynamic_slice(image, start, (c, h, w))

        images = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], images[..., ::-1], images)


@functools.partial(jax.jit, static_argnames=("image_shape", "pad", "flip"))
def augment_images(
    key: PRNGKeyArray,
    x: Float[Array, "*shape"],
    image_shape: tuple[int, int, int],
    *,
    pad: int = 4,
    flip: bool = True,
) -> Float[Array, "*shape"]:
    """The standard CIFAR augmentation: random crop with zero padding, then a
    random horizontal flip, drawn independently for every example.

    Each image is padded with `pad` zeros on all four sides and cropped back to
    its size at a uniformly random offset (each of the `(2 * pad + 1) ** 2`
    positions equally likely), then mirrored left-right with probability 1/2.
    A pure function of `key` (the same key gives the same result), compiled with
    `jax.jit` (`image_shape`, `pad` and `flip` static); it also traces inside a
    caller's `jit` or `lax.scan`, so an epoch can augment each minibatch on
    device.

    The padding is zero in the units of `x`: for inputs normalised per channel,
    as [`load_dataset`][bioflax_eqx.load_dataset] returns CIFAR-10, that is the
    training mean colour.

    **Arguments:**

    - `key`: decides every offset and flip.
    - `x`: a batch of images, either flat, of shape `(*batch, C * H * W)` with
        each vector channel-major (as in a [`Dataset`][bioflax_eqx.Dataset]), or
        image-shaped, `(*batch, C, H, W)`; any number of batch axes, every
        example augmented independently.
    - `image_shape`: `(C, H, W)` of one image, e.g. `Dataset.image_shape`.
    - `pad`: pixels of zero padding on each side; `0` turns cropping off.
    - `flip`: whether to flip at random; `False` turns flipping off.

    **Returns:**

    The augmented batch, of the same shape and dtype as `x`.
    """
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(
            f"image_shape must be (channels, height, width), got {image_shape}"
        )
    check_non_negative_int(pad=pad)
    if x.shape[-3:] == image_shape:
        batch = x.shape[:-3]
    elif x.shape[-1:] == (math.prod(image_shape),):
        batch = x.shape[:-1]
    else:
        raise ValueError(
            f"x of shape {x.shape} is neither (*batch, {math.prod(image_shape)}) "
            f"nor (*batch, {', '.join(map(str, image_shape))})"
        )
    n = math.prod(batch)
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (n, 2), 0, 2 * pad + 1, jnp.int32)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (n,))
    else:
        flips = jnp.zeros((n,), bool)
    images = _crop_and_flip(x.reshape(n, *image_shape), offsets, flips, pad)
    return images.reshape(x.shape)
