"""The synthetic data sets: a teacher network's regression task (`teacher_student`)
and `sine`, functions of their key."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bioflax_eqx.data import Dataset, sine, teacher_student


def _teacher(key, noise_std: float = 0.0) -> Dataset:
    return teacher_student(
        key,
        n_train=2000,
        n_val=50,
        n_test=300,
        in_size=5,
        out_size=3,
        width=16,
        depth=2,
        noise_std=noise_std,
    )


def test_teacher_student():
    key = jax.random.key(3)
    clean = _teacher(key)
    assert (clean.task, clean.name) == ("regression", "teacher_student")
    assert (clean.n_features, clean.n_classes, clean.n_outputs) == (5, None, 3)
    for split, n in ((clean.train, 2000), (clean.val, 50), (clean.test, 300)):
        assert split.x.shape == (n, 5) and split.y.shape == (n, 3)
        assert split.x.dtype == jnp.float32 and split.y.dtype == jnp.float32
    again = _teacher(key)
    np.testing.assert_array_equal(again.train.y, clean.train.y)
    np.testing.assert_array_equal(again.test.x, clean.test.x)
    other = _teacher(jax.random.key(4))
    assert not np.allclose(other.train.y, clean.train.y)
    assert np.std(np.asarray(clean.train.y)) > 0.1
    # Noise goes on train and val targets only.
    noisy = _teacher(key, noise_std=0.5)
    np.testing.assert_array_equal(noisy.train.x, clean.train.x)
    np.testing.assert_array_equal(noisy.test.y, clean.test.y)
    diff = np.asarray(noisy.train.y) - np.asarray(clean.train.y)
    assert np.std(diff) == pytest.approx(0.5, rel=0.1)
    assert not np.allclose(noisy.val.y, clean.val.y)


def test_teacher_without_hidden_layers_is_affine():
    ds = teacher_student(
        jax.random.key(0),
        n_train=20,
        n_test=0,
        in_size=4,
        out_size=2,
        width=8,
        depth=0,
        dtype=jnp.float64,
    )
    assert ds.train.x.dtype == ds.train.y.dtype == jnp.float64
    x = np.concatenate([np.asarray(ds.train.x), np.ones((20, 1))], axis=1)
    coef, *_ = np.linalg.lstsq(x, np.asarray(ds.train.y), rcond=None)
    np.testing.assert_allclose(x @ coef, ds.train.y, atol=1e-10)
    assert ds.test.x.shape == (0, 4) and ds.test.y.shape == (0, 2)


def test_teacher_student_bad_sizes():
    with pytest.raises(ValueError, match="width"):
        teacher_student(
            jax.random.key(0),
            n_train=4,
            n_test=2,
            in_size=3,
            out_size=1,
            width=0,
            depth=1,
        )


def test_sine():
    ds = sine(jax.random.key(0), n_train=500, n_val=20, n_test=100)
    assert (ds.task, ds.name, ds.n_classes) == ("regression", "sine", None)
    assert ds.n_features == ds.n_outputs == 1
    assert ds.train.x.shape == (500, 1) and ds.train.y.shape == (500, 1)
    assert ds.val.x.shape == (20, 1) and ds.test.y.shape == (100, 1)
    for split in (ds.train, ds.val, ds.test):
        x = np.asarray(split.x)
        assert x.min() >= -math.pi and x.max() < math.pi
        np.testing.assert_allclose(split.y, np.sin(x), atol=1e-6)
    x = np.asarray(ds.train.x)
    assert x.min() < -3.0 and x.max() > 3.0  # covers the interval
    again = sine(jax.random.key(0), n_train=500, n_val=20, n_test=100)
    np.testing.assert_array_equal(again.train.x, ds.train.x)
    other = sine(jax.random.key(1), n_train=500, n_val=20, n_test=100)
    assert not np.allclose(other.train.x, ds.train.x)
    # Static metadata: a whole Dataset passes through jit.
    total = jax.jit(lambda d: jnp.sum(d.test.y) + d.n_features)(ds)
    assert float(total) == pytest.approx(np.asarray(ds.test.y).sum() + 1, rel=1e-5)
