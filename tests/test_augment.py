"""Image augmentation (`bfx.augment_images`): random crops of the zero-padded image
and horizontal flips, per example, against a NumPy reference; a function of the key,
under `jit` and `lax.scan`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx
from bioflax_eqx.data._batches import _crop_and_flip


def _reference(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
    """Crop of the zero-padded image at `(row, column)` offsets, then a flip."""
    h, w = images.shape[-2:]
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.stack(
        [p[:, dy : dy + h, dx : dx + w] for p, (dy, dx) in zip(padded, offsets)]
    )
    return np.where(flips[:, None, None, None], out[..., ::-1], out)


def _match(image: np.ndarray, out: np.ndarray, pad: int) -> list[tuple[int, int, bool]]:
    """Every (row offset, column offset, flipped) that turns `image` into `out`."""
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            for flip in (False, True):
                ref = _reference(
                    image[None], np.array([[dy, dx]]), np.array([flip]), pad
                )
                if np.array_equal(ref[0], out):
                    found.append((dy, dx, flip))
    return found


def _images(key, shape) -> jax.Array:
    # Bounded away from 0, so the zero padding shows and every crop differs.
    return jax.random.uniform(key, shape, jnp.float64, minval=0.5, maxval=1.5)


def test_crop_and_flip_matches_numpy(getkey):
    images = _images(getkey(), (5, 2, 6, 7))
    offsets = np.array([[0, 0], [4, 4], [2, 2], [0, 3], [4, 1]], np.int32)
    flips = np.array([False, True, False, True, True])
    for pad in (2, 0):
        if pad == 0:
            offsets = np.zeros_like(offsets)
        got = _crop_and_flip(images, jnp.asarray(offsets), jnp.asarray(flips), pad)
        np.testing.assert_array_equal(
            got, _reference(np.asarray(images), offsets, flips, pad)
        )
    got = np.asarray(
        _crop_and_flip(
            images, jnp.asarray([[2, 2]] * 5, jnp.int32), jnp.zeros(5, bool), 2
        )
    )
    np.testing.assert_array_equal(got, images)
    # Offset (0, 0): shifted down and right, zeros on the top and left.
    got = np.asarray(
        _crop_and_flip(images, jnp.zeros((5, 2), jnp.int32), jnp.zeros(5, bool), 2)
    )
    assert (got[:, :, :2, :] == 0).all() and (got[:, :, :, :2] == 0).all()
    np.testing.assert_array_equal(got[:, :, 2:, 2:], np.asarray(images)[:, :, :4, :5])


def test_augment_is_a_random_crop_and_flip_per_example(getkey):
    shape, pad = (2, 5, 6), 2
    x = _images(getkey(), (400, *shape))
    out = np.asarray(bfx.augment_images(getkey(), x, shape, pad=pad))
    assert out.shape == x.shape and out.dtype == x.dtype
    draws = []
    for image, augmented in zip(np.asarray(x), out):
        found = _match(image, augmented, pad)
        assert len(found) == 1
        draws.append(found[0])
    # Each example draws its own offset and flip: all 25 offsets and both flips.
    assert len({(dy, dx) for dy, dx, _ in draws}) == (2 * pad + 1) ** 2
    flipped = sum(flip for _, _, flip in draws)
    assert 140 < flipped < 260


def test_augment_flat_and_batch_axes(getkey):
    key = getkey()
    images = _images(getkey(), (3, 4, 3, 32, 32))
    flat = images.reshape(3, 4, 3072)
    out_images = bfx.augment_images(key, images, (3, 32, 32))
    out_flat = bfx.augment_images(key, flat, (3, 32, 32))
    assert out_images.shape == images.shape and out_flat.shape == flat.shape
    # The flat input is the channel-major image: the same augmentation.
    np.testing.assert_array_equal(out_flat.reshape(images.shape), out_images)
    for b in range(3):
        for i in range(4):
            assert len(
                _match(np.asarray(images[b, i]), np.asarray(out_images[b, i]), 4)
            )
    single = bfx.augment_images(key, flat[0, 0], (3, 32, 32))
    assert single.shape == (3072,)


def test_augment_options(getkey):
    shape = (1, 4, 4)
    x = _images(getkey(), (50, 16))
    key = getkey()
    np.testing.assert_array_equal(
        bfx.augment_images(key, x, shape, pad=0, flip=False), x
    )
    flipped = np.asarray(bfx.augment_images(key, x, shape, pad=0)).reshape(50, 4, 4)
    images = np.asarray(x).reshape(50, 4, 4)
    same = (flipped == images).all(axis=(1, 2))
    mirrored = (flipped == images[..., ::-1]).all(axis=(1, 2))
    assert (same | mirrored).all() and same.any() and mirrored.any()
    cropped = np.asarray(bfx.augment_images(key, x, shape, pad=1, flip=False))
    for image, out in zip(images, cropped.reshape(50, 1, 4, 4)):
        assert all(not flip for _, _, flip in _match(image[None], out, 1))
    with pytest.raises(ValueError, match="neither"):
        bfx.augment_images(key, x, (1, 4, 5))
    with pytest.raises(ValueError, match="pad"):
        bfx.augment_images(key, x, shape, pad=-1)
    with pytest.raises(ValueError, match="image_shape"):
        bfx.augment_images(key, x, (0, 4, 4))


def test_augment_is_a_function_of_the_key(getkey):
    x = _images(getkey(), (8, 3072))
    a, b = jax.random.key(0), jax.random.key(1)
    np.testing.assert_array_equal(
        bfx.augment_images(a, x, (3, 32, 32)), bfx.augment_images(a, x, (3, 32, 32))
    )
    assert not np.array_equal(
        bfx.augment_images(a, x, (3, 32, 32)), bfx.augment_images(b, x, (3, 32, 32))
    )


def test_augment_under_jit_and_scan(getkey):
    shape = (3, 32, 32)
    x = _images(getkey(), (4, 6, 3072))  # 4 steps of 6 examples
    keys = jax.random.split(getkey(), 4)

    @jax.jit
    def epoch(keys, x):
        def step(total, inputs):
            key, batch = inputs
            out = bfx.augment_images(key, batch, shape)
            return total + out.sum(), out

        return jax.lax.scan(step, jnp.zeros((), x.dtype), (keys, x))

    total, outs = epoch(keys, x)
    for i in range(4):
        np.testing.assert_array_equal(outs[i], bfx.augment_images(keys[i], x[i], shape))
    np.testing.assert_allclose(total, outs.sum())
    jitted = jax.jit(lambda k, b: bfx.augment_images(k, b, shape, pad=2))
    np.testing.assert_array_equal(
        jitted(keys[0], x[0]), bfx.augment_images(keys[0], x[0], shape, pad=2)
    )
