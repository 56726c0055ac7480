"""The CPU-friendly building blocks: the fused Threefry draws exactly what
`jax.random` draws (also as brSF's per-call feedback)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p

import bioflax_eqx as bfx
from bioflax_eqx._kernels import threefry2x32, uniform


# Threefry-2x32-20 known answers from Random123 (Salmon et al. 2011):
# (key0, key1, counter0, counter1) -> (out0, out1).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF,) * 4, (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344, 0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize(("inputs", "outputs"), KNOWN_ANSWERS)
def test_threefry_known_answers(inputs, outputs):
    k0, k1, x0, x1 = (jnp.asarray(v, jnp.uint32) for v in inputs)
    got = threefry2x32(k0, k1, x0[None], x1[None])
    assert [int(g[0]) for g in got] == list(outputs)


def test_threefry_matches_jax(getkey):
    words = jax.random.bits(getkey(), (6, 50), jnp.uint32)
    k0, k1 = words[0, 0], words[1, 0]
    mine = jax.jit(threefry2x32)(k0, k1, words[2], words[3])
    theirs = threefry2x32_p.bind(
        jnp.broadcast_to(k0, (50,)), jnp.broadcast_to(k1, (50,)), words[2], words[3]
    )
    for a, b in zip(mine, theirs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("shape", [(3,), (5, 7), (64, 33)])
@pytest.mark.parametrize("raw", [False, True])
def test_uniform_is_jax_random_uniform(dtype, shape, raw, getkey):
    key = jax.random.key_data(getkey()) if raw else getkey()
    with jax.threefry_partitionable(True):
        expected = jax.random.uniform(key, shape, dtype, -0.3, 0.3)
        got = jax.jit(lambda k: uniform(k, shape, 0.3, dtype))(key)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_uniform_with_another_key_implementation():
    key = jax.random.key(0, impl="rbg")
    draw = np.asarray(uniform(key, (200, 200), 2.0, jnp.float32))
    assert draw.min() >= -2.0 and draw.max() < 2.0
    assert abs(draw.mean()) < 0.05 and abs(draw.std() - 4 / np.sqrt(12)) < 0.05
    other = np.asarray(
        uniform(jax.random.key(1, impl="rbg"), (200, 200), 2.0, jnp.float32)
    )
    assert not np.array_equal(draw, other)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "make",
    [
        lambda dtype, key: eqx.nn.Linear(7, 5, dtype=dtype, key=key),
        lambda dtype, key: eqx.nn.Conv2d(3, 4, (3, 2), dtype=dtype, key=key),
    ],
    ids=["linear", "conv2d"],
)
def test_brsf_draw_is_jax_random_uniform(make, dtype, getkey):
    # brSF's per-call magnitudes come from the fused Threefry: compiled, the same
    # bits as jax.random.uniform(key, weight.shape, ±scale) for any weight shape.
    layer = bfx.BRSF(make(dtype, getkey()))
    weight = layer.weight
    key = getkey()
    got = eqx.filter_jit(lambda layer, key: layer.feedback_weight(key=key))(layer, key)
    magnitude = jax.random.uniform(key, weight.shape, dtype, -layer.scale, layer.scale)
    assert got.dtype == dtype and got.shape == weight.shape
    np.testing.assert_array_equal(got, jnp.abs(magnitude) * jnp.sign(weight))
