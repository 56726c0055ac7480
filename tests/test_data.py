"""MNIST and Fashion-MNIST from IDX files: splits, checksums, missing files and
downloads, the data folder, and epoch batches (synthetic sets: test_synthetic.py)."""

import gzip
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bioflax_eqx.data import (
    DataNotFoundError,
    Dataset,
    _download,
    epoch_batches,
    load_dataset,
    read_idx,
    resolve_data_dir,
)


STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
GZ_NAMES = tuple(f"{stem}.gz" for stem in STEMS)
# From the MNIST README in ../shared/data/mnist.
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
# Discard port: nothing listens, so a connection is refused at once.
UNREACHABLE = "http://127.0.0.1:9/"


@pytest.fixture(scope="module")
def mnist(mnist_dir: pathlib.Path) -> Dataset:
    return load_dataset("mnist", mnist_dir, download=False)


def _link_all_but(src: pathlib.Path, dst: pathlib.Path, *skip: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in GZ_NAMES:
        if name not in skip:
            (dst / name).symlink_to(src / name)


def _decompressed(src: pathlib.Path, name: str) -> bytes:
    return gzip.decompress((src / name).read_bytes())


# --------------------------------------------------------------------- MNIST


def test_mnist_splits(mnist: Dataset):
    assert mnist.task == "classification"
    assert (mnist.name, mnist.n_features, mnist.n_classes) == ("mnist", 784, 10)
    assert mnist.n_outputs == 10
    for split, n in ((mnist.train, 55000), (mnist.val, 5000), (mnist.test, 10000)):
        assert split.x.shape == (n, 784)
        assert split.y.shape == (n,)
        assert split.x.dtype == jnp.float32
        assert split.y.dtype == jnp.int32
        x = np.asarray(split.x)
        assert x.min() == 0.0 and x.max() == 1.0
        assert set(np.unique(np.asarray(split.y)).tolist()) == set(range(10))
    # Pixels are k / 255 for integer k.
    k = np.asarray(mnist.test.x[:100], dtype=np.float64) * 255
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert int(mnist.train.y[0]) == 5
    assert int(mnist.test.y[0]) == 7
    # key=None holds out the last 5000 in file order: together they are the file.
    all_y = np.concatenate([np.asarray(mnist.train.y), np.asarray(mnist.val.y)])
    assert np.bincount(all_y).tolist() == TRAIN_LABEL_COUNTS


def test_limit_and_dtype(mnist: Dataset, mnist_dir: pathlib.Path):
    ds = load_dataset(
        "mnist", mnist_dir, download=False, limit=300, val_size=0, dtype=jnp.float64
    )
    assert ds.train.x.shape == (300, 784) and ds.test.x.shape == (300, 784)
    assert ds.val.x.shape == (0, 784) and ds.val.y.shape == (0,)
    assert ds.train.x.dtype == jnp.float64
    np.testing.assert_allclose(ds.train.x, mnist.train.x[:300], atol=1e-7)
    np.testing.assert_array_equal(ds.test.y, mnist.test.y[:300])


def test_split_is_a_function_of_the_key(mnist_dir: pathlib.Path):
    def load(key):
        return load_dataset(
            "mnist", mnist_dir, download=False, limit=2000, val_size=500, key=key
        )

    a, b, c = load(jax.random.key(0)), load(jax.random.key(0)), load(jax.random.key(1))
    full = load_dataset("mnist", mnist_dir, download=False, limit=2000, val_size=0)
    for x, y in (a.train, a.val, a.test):
        assert x.shape[0] == y.shape[0]
    assert a.train.x.shape == (1500, 784) and a.val.x.shape == (500, 784)
    for split_a, split_b in zip((a.train, a.val), (b.train, b.val)):
        np.testing.assert_array_equal(split_a.x, split_b.x)
        np.testing.assert_array_equal(split_a.y, split_b.y)
    assert not np.array_equal(a.val.y, c.val.y)
    # A partition of the prefix: same multiset of labels and of images.
    for ds in (a, c):
        y = np.concatenate([ds.train.y, ds.val.y])
        np.testing.assert_array_equal(np.sort(y), np.sort(np.asarray(full.train.y)))
        x = np.concatenate([ds.train.x, ds.val.x])
        np.testing.assert_allclose(
            np.sort(x.sum(1)), np.sort(np.asarray(full.train.x).sum(1))
        )
    # Without a key the validation split is the tail.
    tail = load(None)
    np.testing.assert_array_equal(tail.val.x, full.train.x[1500:])
    np.testing.assert_array_equal(tail.train.y, full.train.y[:1500])


def test_bad_arguments(mnist_dir: pathlib.Path):
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar", mnist_dir, download=False)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("mnist", mnist_dir, download=False, limit=100, val_size=100)
    with pytest.raises(ValueError, match="limit"):
        load_dataset("mnist", mnist_dir, download=False, limit=0)


def test_plain_files_load(mnist: Dataset, mnist_dir: pathlib.Path, tmp_path):
    # Test files decompressed, training files still gzipped: both kinds in one folder.
    for stem in STEMS[2:]:
        (tmp_path / stem).write_bytes(_decompressed(mnist_dir, f"{stem}.gz"))
    _link_all_but(mnist_dir, tmp_path, *GZ_NAMES[2:])
    ds = load_dataset("mnist", tmp_path, download=False)
    np.testing.assert_array_equal(ds.test.x, mnist.test.x)
    np.testing.assert_array_equal(ds.test.y, mnist.test.y)
    np.testing.assert_array_equal(ds.val.y, mnist.val.y)


def test_read_idx(mnist_dir: pathlib.Path, tmp_path):
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz", limit=3)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    # Other IDX element types come back in native byte order.
    path = tmp_path / "floats.idx"
    values = np.arange(6, dtype=">f8").reshape(2, 3)
    path.write_bytes(b"\0\0\x0e\x02" + b"\0\0\0\x02\0\0\0\x03" + values.tobytes())
    out = read_idx(path)
    assert out.dtype == np.float64 and out.dtype.isnative
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda gz, raw: gz[: len(gz) // 2], "EOFError"),
        (lambda gz, raw: raw[:-100], "9900 of the 10000 data bytes"),
        (lambda gz, raw: raw + b"\0", "trailing bytes"),
        (lambda gz, raw: b"\0\0\x07\x01" + raw[4:], "bad magic number 0x00000701"),
        (lambda gz, raw: raw[:6], "header ends early"),
        (lambda gz, raw: gz[:-8] + bytes(8), "BadGzipFile"),
    ],
    ids=["gz-truncated", "truncated", "trailing", "magic", "header", "crc"],
)
def test_corrupt_file_is_named(mnist_dir: pathlib.Path, tmp_path, damage, message):
    name = "t10k-labels-idx1-ubyte.gz"
    gz = (mnist_dir / name).read_bytes()
    bad = damage(gz, gzip.decompress(gz))
    _link_all_but(mnist_dir, tmp_path, name)
    (tmp_path / name).write_bytes(bad)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("mnist", tmp_path, download=False, limit=10, val_size=1)
    assert str(tmp_path / name) in str(info.value)
    assert "corrupt or truncated" in str(info.value)


def test_altered_content_fails_checksum(mnist_dir: pathlib.Path, tmp_path):
    name = "t10k-labels-idx1-ubyte"
    raw = bytearray(_decompressed(mnist_dir, f"{name}.gz"))
    raw[-1] = (raw[-1] + 1) % 10  # still a valid IDX file
    _link_all_but(mnist_dir, tmp_path, f"{name}.gz")
    (tmp_path / name).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="published checksum"):
        load_dataset("mnist", tmp_path, download=False, limit=10, val_size=1)


def test_mnist_files_are_not_fashion_mnist(mnist_dir: pathlib.Path):
    with pytest.raises(ValueError, match="holds MNIST, not Fashion-MNIST"):
        load_dataset("fashion_mnist", mnist_dir, download=False, limit=10, val_size=1)


# ------------------------------------------------------ missing files, download


def test_missing_files_without_download(mnist_dir: pathlib.Path, tmp_path):
    missing = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    _link_all_but(mnist_dir, tmp_path, *missing)
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", tmp_path, download=False)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert err.missing == missing and err.folder == tmp_path
    message = str(err)
    for name in missing:
        assert name in message
    assert "train-images" not in message and "train-labels" not in message
    assert str(tmp_path) in message
    assert "--data-dir" in message and "BIOFLAX_EQX_DATA" in message
    assert "download=False" in message
    assert sorted(os.listdir(tmp_path)) == sorted(GZ_NAMES[:2])


def test_offline_download_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setitem(_download.MIRRORS, "mnist", (UNREACHABLE,))
    folder = tmp_path / "new" / "mnist"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", folder)
    message = str(info.value)
    assert info.value.missing == GZ_NAMES
    for name in GZ_NAMES:
        assert name in message
    assert str(folder) in message and "--data-dir" in message
    assert f"{UNREACHABLE}train-images-idx3-ubyte.gz" in message
    assert os.listdir(folder) == []


def test_download_falls_back_to_next_mirror(mnist_dir, tmp_path, monkeypatch, server):
    served, url = server
    name = "t10k-labels-idx1-ubyte.gz"
    shutil.copy(mnist_dir / name, served / name)
    monkeypatch.setitem(_download.MIRRORS, "mnist", (UNREACHABLE, url))
    folder = tmp_path / "data"
    _link_all_but(mnist_dir, folder, name)
    ds = load_dataset("mnist", folder, limit=20, val_size=5)
    assert int(ds.test.y[0]) == 7
    assert sorted(os.listdir(folder)) == sorted(GZ_NAMES)
    assert (folder / name).read_bytes() == (mnist_dir / name).read_bytes()


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_download_checksum_mismatch(mnist_dir, tmp_path, monkeypatch, server, dataset):
    served, url = server
    name = "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(_decompressed(mnist_dir, name))
    raw[-1] = (raw[-1] + 1) % 10  # valid IDX, wrong content
    # Served MNIST labels are a wrong file for Fashion-MNIST whatever their bytes.
    (served / name).write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setitem(_download.MIRRORS, dataset, (url,))
    folder = tmp_path / "data"
    _link_all_but(mnist_dir, folder, name)
    with pytest.raises(DataNotFoundError, match="checksum mismatch") as info:
        load_dataset(dataset, folder, limit=10, val_size=1)
    assert info.value.missing == (name,)
    # Neither the bad file nor a temporary file is left behind.
    assert sorted(os.listdir(folder)) == sorted(set(GZ_NAMES) - {name})


def test_download_of_a_truncated_file_is_rejected(
    mnist_dir, tmp_path, monkeypatch, server
):
    served, url = server
    name = "t10k-images-idx3-ubyte.gz"
    gz = (mnist_dir / name).read_bytes()
    (served / name).write_bytes(gz[: len(gz) // 3])
    monkeypatch.setitem(_download.MIRRORS, "mnist", (url,))
    folder = tmp_path / "data"
    _link_all_but(mnist_dir, folder, name)
    with pytest.raises(DataNotFoundError, match="corrupt or truncated"):
        load_dataset("mnist", folder, limit=10, val_size=1)
    assert sorted(os.listdir(folder)) == sorted(set(GZ_NAMES) - {name})


# ------------------------------------------------------------ data folder


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOFLAX_EQX_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    explicit = tmp_path / "explicit"
    assert resolve_data_dir(explicit, "mnist") == explicit
    assert resolve_data_dir(str(explicit), "mnist") == explicit
    assert resolve_data_dir(None, "mnist") == tmp_path / "env"
    monkeypatch.setenv("BIOFLAX_EQX_DATA", "")
    assert resolve_data_dir(None, "mnist") == tmp_path / "xdg" / "bioflax_eqx" / "mnist"
    monkeypatch.delenv("BIOFLAX_EQX_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    expected = tmp_path / "home" / ".cache" / "bioflax_eqx" / "fashion_mnist"
    assert resolve_data_dir(None, "fashion_mnist") == expected
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir(None, "fashion_mnist") == expected


def test_env_var_and_cache_folder_are_used(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BIOFLAX_EQX_DATA", str(mnist_dir))
    ds = load_dataset("mnist", download=False, limit=10, val_size=2)
    assert int(ds.train.y[0]) == 5
    monkeypatch.delenv("BIOFLAX_EQX_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", download=False)
    assert info.value.folder == tmp_path / "bioflax_eqx" / "mnist"
    assert str(tmp_path / "bioflax_eqx" / "mnist") in str(info.value)


def test_the_system_copy_is_read_when_the_cache_is_empty(
    mnist_dir, tmp_path, monkeypatch
):
    # Debian's dataset-fashion-mnist installs the four files in /usr/share; the
    # project's copy of those files plays it here.
    system = mnist_dir.parent / "fashion-mnist"
    if not (system / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {system}")
    monkeypatch.setitem(_download.SYSTEM_COPIES, "fashion_mnist", system)
    monkeypatch.delenv("BIOFLAX_EQX_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = tmp_path / "xdg" / "bioflax_eqx" / "fashion_mnist"
    assert resolve_data_dir(None, "fashion_mnist") == system
    ds = load_dataset("fashion_mnist", download=False, limit=10, val_size=2)
    assert ds.train.x.shape == (8, 784)
    # An explicit folder, the environment variable or a filled cache win.
    assert resolve_data_dir(tmp_path / "mine", "fashion_mnist") == tmp_path / "mine"
    cache.mkdir(parents=True)
    (cache / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert resolve_data_dir(None, "fashion_mnist") == cache
    # With neither, the error says where it looked.
    (cache / "train-images-idx3-ubyte.gz").unlink()
    monkeypatch.setitem(_download.SYSTEM_COPIES, "fashion_mnist", tmp_path / "none")
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion_mnist", download=False)
    message = str(info.value)
    assert f"Looked in {cache} (the cache) and in {tmp_path / 'none'}" in message
    with pytest.raises(DataNotFoundError, match=f"Looked in {tmp_path} only"):
        load_dataset("fashion_mnist", tmp_path, download=False)


# ------------------------------------------------------------- batching


def test_epoch_batches():
    n, batch = 103, 10
    x = jnp.repeat(jnp.arange(n, dtype=jnp.float32)[:, None], 3, axis=1)
    y = jnp.arange(n, dtype=jnp.int32)
    xb, yb = epoch_batches(jax.random.key(0), x, y, batch)
    assert xb.shape == (10, 10, 3) and yb.shape == (10, 10)
    assert xb.dtype == jnp.float32 and yb.dtype == jnp.int32
    # Pairs stay together; each example at most once; the tail is dropped.
    np.testing.assert_array_equal(np.asarray(xb)[..., 0], np.asarray(yb))
    np.testing.assert_array_equal(xb[..., 2], xb[..., 0])
    assert len(np.unique(np.asarray(yb))) == 100
    assert not np.array_equal(np.asarray(yb).ravel(), np.arange(100))
    again = epoch_batches(jax.random.key(0), x, y, batch)
    np.testing.assert_array_equal(again[1], yb)
    other = epoch_batches(jax.random.key(1), x, y, batch)
    assert not np.array_equal(other[1], yb)
    # Inside a caller's jit; regression targets keep their trailing axes.
    xb2, yb2 = jax.jit(lambda k: epoch_batches(k, x, x[:, :1], batch))(
        jax.random.key(0)
    )
    assert xb2.shape == (10, 10, 3) and yb2.shape == (10, 10, 1)
    np.testing.assert_array_equal(xb2, xb)
    np.testing.assert_array_equal(yb2, xb[..., :1])


@pytest.mark.parametrize("batch_size", [0, -1, 104])
def test_epoch_batches_bad_size(batch_size):
    x = jnp.zeros((103, 2))
    y = jnp.zeros((103,), jnp.int32)
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches(jax.random.key(0), x, y, batch_size)


def test_epoch_batches_mismatched_lengths():
    # The shape annotation catches it first under the jaxtyping hook.
    with pytest.raises((ValueError, TypeError)):
        epoch_batches(jax.random.key(0), jnp.zeros((5, 2)), jnp.zeros((4,)), 2)
