"""CIFAR-10 loading, on small files in the real format (augmentation:
test_augment.py).

No test here needs the internet: the archives are generated in `tmp_path`, and
downloads go to a local server or to a `urlopen` that fails.
"""

import hashlib
import io
import os
import pathlib
import tarfile
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx
from bioflax_eqx.data import DataNotFoundError, _cifar, _download, load_dataset


ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
# Records per generated batch file: uneven, so a limit crosses file borders.
SIZES = {**dict(zip(TRAIN_FILES, (3, 4, 2, 3, 5))), TEST_FILE: 6}
N_TRAIN = sum(SIZES[name] for name in TRAIN_FILES)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def _known_image() -> np.ndarray:
    """A (3, 32, 32) image whose every pixel says where it is."""
    c, r, s = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((80 * c + 2 * r + s) % 256).astype(np.uint8)


def _batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images `(n, 3, 32, 32)` and labels `(n,)` (uint8) for each batch file."""
    rng = np.random.default_rng(0)
    out = {}
    for name, n in SIZES.items():
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        out[name] = (images, labels)
    out[TRAIN_FILES[0]][0][0] = _known_image()
    out[TRAIN_FILES[0]][1][0] = 9
    return out


def _encode(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The binary format: per record, 1 label byte then 3072 channel-major pixels."""
    flat = images.reshape(images.shape[0], -1)
    return np.concatenate([labels[:, None], flat], axis=1).tobytes()


BATCHES = _batches()
TRAIN_IMAGES = np.concatenate([BATCHES[n][0] for n in TRAIN_FILES])
TRAIN_LABELS = np.concatenate([BATCHES[n][1] for n in TRAIN_FILES])
TEST_IMAGES, TEST_LABELS = BATCHES[TEST_FILE]


def _write_archive(path: pathlib.Path, skip: tuple[str, ...] = ()) -> str:
    """Packs the batch files like the real archive does; returns its MD5."""
    members = {
        f"{FOLDER}/batches.meta.txt": b"airplane\nautomobile\n",
        # Not in file order: the reader must not depend on it.
        **{f"{FOLDER}/{n}": _encode(*BATCHES[n]) for n in reversed(SIZES)},
        f"{FOLDER}/readme.html": b"<html></html>",
    }
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(FOLDER)
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in members.items():
            if name.rsplit("/", 1)[1] in skip:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_folder(folder: pathlib.Path) -> None:
    folder.mkdir(parents=True)
    for name in SIZES:
        (folder / name).write_bytes(_encode(*BATCHES[name]))


@pytest.fixture
def archive_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """A folder holding a generated archive, whose MD5 is made the expected one."""
    folder = tmp_path / "cifar10"
    folder.mkdir()
    monkeypatch.setattr(_cifar, "_CIFAR10_MD5", _write_archive(folder / ARCHIVE))
    return folder


def _stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (ddof=0) of the [0, 1] pixels, in float64."""
    scaled = images.astype(np.float64) / 255
    return scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))


def _normalised(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    scaled = images.astype(np.float64) / 255
    out = (scaled - mean[None, :, None, None]) / std[None, :, None, None]
    return out.reshape(images.shape[0], -1)


# ------------------------------------------------------------------- loading


def test_load_archive(archive_dir: pathlib.Path):
    ds = load_dataset("cifar10", archive_dir, val_size=0, dtype=jnp.float64)
    assert (ds.name, ds.task, ds.n_features, ds.n_classes) == (
        "cifar10",
        "classification",
        3072,
        10,
    )
    assert ds.image_shape == (3, 32, 32)
    assert ds.train.x.shape == (N_TRAIN, 3072) and ds.val.x.shape == (0, 3072)
    assert ds.test.x.shape == (SIZES[TEST_FILE], 3072)
    assert ds.train.x.dtype == jnp.float64 and ds.train.y.dtype == jnp.int32
    # Labels in file order, batch 1 to 5.
    np.testing.assert_array_equal(ds.train.y, TRAIN_LABELS)
    np.testing.assert_array_equal(ds.test.y, TEST_LABELS)
    assert int(ds.train.y[0]) == 9
    # Normalised with the statistics of the training images, test included.
    mean, std = _stats(TRAIN_IMAGES)
    np.testing.assert_allclose(ds.train.x, _normalised(TRAIN_IMAGES, mean, std))
    np.testing.assert_allclose(ds.test.x, _normalised(TEST_IMAGES, mean, std))
    images = np.asarray(ds.train.x).reshape(-1, 3, 32, 32)
    np.testing.assert_allclose(images.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(images.std(axis=(0, 2, 3)), 1, rtol=1e-12)
    # Channel-major: the flat vector reshapes to the generated image.
    first = images[0] * std[:, None, None] + mean[:, None, None]
    np.testing.assert_allclose(first * 255, _known_image(), atol=1e-9)


def test_float32_default(archive_dir: pathlib.Path):
    ds = load_dataset("cifar10", archive_dir, val_size=2)
    assert ds.train.x.dtype == jnp.float32
    mean, std = _stats(TRAIN_IMAGES[: N_TRAIN - 2])
    expected = _normalised(TRAIN_IMAGES[: N_TRAIN - 2], mean, std)
    np.testing.assert_allclose(ds.train.x, expected, rtol=1e-5, atol=1e-5)


def test_val_split_and_statistics_of_the_train_split(archive_dir: pathlib.Path):
    def load(key):
        return load_dataset(
            "cifar10", archive_dir, val_size=5, key=key, dtype=jnp.float64
        )

    a, b, c = load(jax.random.key(0)), load(jax.random.key(0)), load(jax.random.key(1))
    assert a.train.x.shape == (N_TRAIN - 5, 3072) and a.val.x.shape == (5, 3072)
    np.testing.assert_array_equal(a.val.x, b.val.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    assert not np.array_equal(a.val.x, c.val.x)
    for ds in (a, c):
        # The statistics are those of the train split alone, not of all 17.
        train = np.asarray(ds.train.x).reshape(-1, 3, 32, 32)
        np.testing.assert_allclose(train.mean(axis=(0, 2, 3)), 0, atol=1e-12)
        np.testing.assert_allclose(train.std(axis=(0, 2, 3)), 1, rtol=1e-12)
        val = np.asarray(ds.val.x).reshape(-1, 3, 32, 32)
        assert not np.allclose(val.mean(axis=(0, 2, 3)), 0, atol=1e-3)
        # Train and val partition the training file; both keep file order.
        labels = np.concatenate([np.asarray(ds.train.y), np.asarray(ds.val.y)])
        np.testing.assert_array_equal(np.sort(labels), np.sort(TRAIN_LABELS))
    # Without a key the validation split is the tail, normalised with the head's
    # statistics.
    tail = load(None)
    mean, std = _stats(TRAIN_IMAGES[:-5])
    np.testing.assert_allclose(tail.val.x, _normalised(TRAIN_IMAGES[-5:], mean, std))
    np.testing.assert_array_equal(tail.train.y, TRAIN_LABELS[:-5])


def test_limit_crosses_batch_files(archive_dir: pathlib.Path):
    ds = load_dataset("cifar10", archive_dir, val_size=1, limit=5)
    # 3 records from data_batch_1, 2 from data_batch_2.
    assert ds.train.x.shape == (4, 3072) and ds.val.x.shape == (1, 3072)
    np.testing.assert_array_equal(ds.train.y, TRAIN_LABELS[:4])
    np.testing.assert_array_equal(ds.val.y, TRAIN_LABELS[4:5])
    np.testing.assert_array_equal(ds.test.y, TEST_LABELS[:5])
    mean, std = _stats(TRAIN_IMAGES[:4])
    expected = _normalised(TEST_IMAGES[:5], mean, std)
    np.testing.assert_allclose(ds.test.x, expected, rtol=1e-5, atol=1e-5)


def test_constant_channel_is_only_centred(tmp_path: pathlib.Path):
    folder = tmp_path / FOLDER
    _write_folder(folder)
    ds = load_dataset("cifar10", folder, val_size=0, limit=1, dtype=jnp.float64)
    image = np.asarray(ds.train.x).reshape(3, 32, 32)
    # One image: each channel has a spread, so it is scaled; values stay finite.
    assert np.isfinite(image).all()
    (folder / TRAIN_FILES[0]).write_bytes(
        _encode(np.full((1, 3, 32, 32), 7, np.uint8), np.zeros(1, np.uint8))
    )
    ds = load_dataset("cifar10", folder, val_size=0, limit=1, dtype=jnp.float64)
    np.testing.assert_array_equal(ds.train.x, 0.0)
    np.testing.assert_allclose(
        np.asarray(ds.test.x[0]).reshape(3, 32, 32),
        (TEST_IMAGES[0].astype(np.float64) - 7) / 255,
    )


def test_extracted_folder(tmp_path: pathlib.Path, archive_dir: pathlib.Path):
    reference = load_dataset("cifar10", archive_dir, val_size=3, dtype=jnp.float64)
    # The extracted folder inside the data folder, without the archive (and so
    # without any checksum to match).
    parent = tmp_path / "extracted"
    _write_folder(parent / FOLDER)
    # The data folder may also be the extracted folder itself.
    for folder in (parent, parent / FOLDER):
        ds = load_dataset("cifar10", folder, val_size=3, dtype=jnp.float64)
        for got, want in zip(
            (ds.train, ds.val, ds.test),
            (reference.train, reference.val, reference.test),
        ):
            np.testing.assert_array_equal(got.x, want.x)
            np.testing.assert_array_equal(got.y, want.y)
    # A complete extracted folder is used before the archive.
    (parent / ARCHIVE).write_bytes(b"not an archive")
    ds = load_dataset("cifar10", parent, val_size=3, dtype=jnp.float64, limit=4)
    np.testing.assert_array_equal(ds.test.y, TEST_LABELS[:4])


def test_bad_extracted_file_is_named(tmp_path: pathlib.Path):
    folder = tmp_path / FOLDER
    _write_folder(folder)
    path = folder / TRAIN_FILES[2]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="not a positive multiple") as info:
        load_dataset("cifar10", tmp_path, val_size=1)
    assert str(path) in str(info.value) and "corrupt or truncated" in str(info.value)
    path.write_bytes(_encode(*BATCHES[TRAIN_FILES[2]]))
    labels = BATCHES[TEST_FILE][1].copy()
    labels[1] = 10
    (folder / TEST_FILE).write_bytes(_encode(TEST_IMAGES, labels))
    with pytest.raises(ValueError, match="label 10 >= 10"):
        load_dataset("cifar10", tmp_path, val_size=1)


def test_mnist_and_synthetic_image_shapes(mnist_dir: pathlib.Path, getkey):
    ds = load_dataset("mnist", mnist_dir, download=False, limit=10, val_size=1)
    assert ds.image_shape == (1, 28, 28) and ds.n_features == 784
    ds = bfx.sine(getkey(), n_train=4, n_test=2)
    assert ds.image_shape is None
    # A Dataset is still a pytree that passes through jit.
    assert jax.jit(lambda d: d)(ds).image_shape is None


# ------------------------------------------------------------------ checksums


def test_archive_with_wrong_checksum_is_refused(tmp_path: pathlib.Path):
    # The generated archive is not the published one: its MD5 does not match.
    path = tmp_path / ARCHIVE
    md5 = _write_archive(path)
    with pytest.raises(ValueError, match="published c32a1d4ab5d03f1284b67883e8d87530"):
        load_dataset("cifar10", tmp_path, download=False, val_size=1)
    with pytest.raises(ValueError, match=md5) as info:
        load_dataset("cifar10", tmp_path, download=False, val_size=1)
    assert str(path) in str(info.value)
    assert "delete it and download it again" in str(info.value)


def test_corrupted_archive_is_refused(archive_dir: pathlib.Path):
    path = archive_dir / ARCHIVE
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is not the published") as info:
        load_dataset("cifar10", archive_dir, download=False, val_size=1)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: path.write_bytes(path.read_bytes()[:3000]), "corrupt"),
        (lambda path: path.write_bytes(b"<html>Not Found</html>"), "ReadError"),
        (lambda path: _write_archive(path, skip=(TEST_FILE,)), f"{FOLDER}/{TEST_FILE}"),
    ],
    ids=["truncated", "not-gzip", "member-missing"],
)
def test_malformed_archive_with_matching_checksum(
    archive_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, damage, message
):
    path = archive_dir / ARCHIVE
    damage(path)
    monkeypatch.setattr(
        _cifar, "_CIFAR10_MD5", hashlib.md5(path.read_bytes()).hexdigest()
    )
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("cifar10", archive_dir, download=False, val_size=1)
    assert str(path) in str(info.value)


# ------------------------------------------------------ missing files, download


def _refuse_urlopen(*args, **kwargs):
    raise urllib.error.URLError("no network in tests")


def test_offline_names_the_file_and_the_folder(tmp_path, monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        _refuse_urlopen()

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    folder = tmp_path / "cache" / "cifar10"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", folder)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert err.missing == (ARCHIVE,) and err.folder == folder
    message = str(err)
    assert f"Put {ARCHIVE}" in message and str(folder) in message
    assert URL in message and "no network in tests" in message
    assert f"{FOLDER}/" in message and "--data-dir" in message
    assert "BIOFLAX_EQX_DATA" in message
    # One attempt at the official URL; nothing is left behind.
    assert calls == [URL]
    assert os.listdir(folder) == []


def test_missing_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _refuse_urlopen)
    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / TRAIN_FILES[0]).write_bytes(b"")
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(info.value)
    assert "download=False" in message and ARCHIVE in message
    # An incomplete extracted folder is reported with what it lacks.
    assert "lacks data_batch_2.bin" in message and "test_batch.bin" in message


def test_cache_folder_is_per_data_set(tmp_path, monkeypatch):
    monkeypatch.delenv("BIOFLAX_EQX_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", download=False)
    assert info.value.folder == tmp_path / "bioflax_eqx" / "cifar10"


def test_download_once_into_the_folder(tmp_path, monkeypatch, server):
    served, url = server
    monkeypatch.setattr(_cifar, "_CIFAR10_MD5", _write_archive(served / ARCHIVE))
    monkeypatch.setitem(_download.MIRRORS, "cifar10", (url,))
    folder = tmp_path / "cache" / "cifar10"
    ds = load_dataset("cifar10", folder, val_size=2, limit=6)
    np.testing.assert_array_equal(ds.test.y, TEST_LABELS[:6])
    assert os.listdir(folder) == [ARCHIVE]
    assert (folder / ARCHIVE).read_bytes() == (served / ARCHIVE).read_bytes()
    # Downloaded once: the next load reads the kept file.
    (served / ARCHIVE).unlink()
    again = load_dataset("cifar10", folder, val_size=2, limit=6)
    np.testing.assert_array_equal(again.train.x, ds.train.x)


def test_download_with_wrong_checksum_is_not_kept(tmp_path, monkeypatch, server):
    served, url = server
    _write_archive(served / ARCHIVE)  # Not the published MD5.
    monkeypatch.setitem(_download.MIRRORS, "cifar10", (url,))
    folder = tmp_path / "cifar10"
    with pytest.raises(DataNotFoundError, match="md5 checksum mismatch") as info:
        load_dataset("cifar10", folder, val_size=1)
    assert f"{url}{ARCHIVE}" in str(info.value)
    assert os.listdir(folder) == []


def test_download_of_a_non_archive_is_not_kept(tmp_path, monkeypatch, server):
    served, url = server
    (served / ARCHIVE).write_bytes(b"<html>moved</html>")
    monkeypatch.setitem(_download.MIRRORS, "cifar10", (url,))
    monkeypatch.setattr(
        _cifar, "_CIFAR10_MD5", hashlib.md5(b"<html>moved</html>").hexdigest()
    )
    folder = tmp_path / "cifar10"
    with pytest.raises(DataNotFoundError, match="corrupt or truncated"):
        load_dataset("cifar10", folder, val_size=1)
    assert os.listdir(folder) == []
