"""CIFAR-10 in its binary distribution, read from the archive or its extracted
folder, and the per-channel normalisation of its images."""

import functools
import math
import pathlib
import posixpath
import tarfile
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, UInt8

from ._dataset import DataNotFoundError
from ._download import DATA_ENV_VAR, MIRRORS, Checksum, download_files, file_digest


# CIFAR-10 in its binary distribution: one archive holding a folder of six batch
# files, each a run of records of 1 label byte + 3072 pixel bytes (channel-major
# 3 x 32 x 32: the 1024 red, then green, then blue pixels, each row-major).
_CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
_CIFAR10_FOLDER = "cifar-10-batches-bin"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR10_TEST = "test_batch.bin"
CIFAR10_SHAPE = (3, 32, 32)
_CIFAR10_RECORD = 1 + math.prod(CIFAR10_SHAPE)
# The MD5 published with the archive (https://www.cs.toronto.edu/~kriz/cifar.html).
_CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
_CIFAR10_BATCHES = (*_CIFAR10_TRAIN, _CIFAR10_TEST)


def _cifar10_corrupt(path: pathlib.Path, why: str) -> ValueError:
    return ValueError(
        f"{path} is not valid CIFAR-10 binary data ({why}); the file is corrupt or "
        "truncated: delete it and download it again"
    )


def _cifar10_records(
    raw: bytes, size: int, limit: int | None, path: pathlib.Path
) -> tuple[np.ndarray, np.ndarray]:
    """Splits the first records of a batch file of `size` bytes into
    `(images (n, 3072), labels (n,))`, both uint8."""
    n = size // _CIFAR10_RECORD
    if limit is not None:
        n = min(n, limit)
    if len(raw) < n * _CIFAR10_RECORD:
        raise _cifar10_corrupt(path, f"ends after {len(raw)} bytes")
    records = np.frombuffer(raw[: n * _CIFAR10_RECORD], np.uint8)
    records = records.reshape(n, _CIFAR10_RECORD)
    labels = records[:, 0]
    if labels.size and int(labels.max()) >= 10:
        raise _cifar10_corrupt(path, f"label {int(labels.max())} >= 10")
    return records[:, 1:], labels


def _check_record_size(path: pathlib.Path, size: int, what: str) -> None:
    if size == 0 or size % _CIFAR10_RECORD:
        raise _cifar10_corrupt(
            path,
            f"{what} has {size} bytes, not a positive multiple of the "
            f"{_CIFAR10_RECORD}-byte record",
        )


def _read_cifar10_folder(
    folder: pathlib.Path, limit: int | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    batches = {}
    for name in _CIFAR10_BATCHES:
        path = folder / name
        size = path.stat().st_size
        _check_record_size(path, size, "the file")
        n = size // _CIFAR10_RECORD
        if limit is not None:
            n = min(n, limit)
        with open(path, "rb") as f:
            raw = f.read(n * _CIFAR10_RECORD)
        batches[name] = _cifar10_records(raw, size, limit, path)
    return batches


def _parse_cifar10_archive(
    path: pathlib.Path, limit: int | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads the six batch files out of the archive in one pass over its stream."""
    wanted = {f"{_CIFAR10_FOLDER}/{name}": name for name in _CIFAR10_BATCHES}
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                name = wanted.get(posixpath.normpath(member.name))
                if name is None or name in batches:
                    continue
                where = f"member {member.name}"
                if not member.isfile():
                    raise _cifar10_corrupt(path, f"{where} is not a regular file")
                _check_record_size(path, member.size, where)
                n = member.size // _CIFAR10_RECORD
                if limit is not None:
                    n = min(n, limit)
                f = tar.extractfile(member)
                assert f is not None
                raw = f.read(n * _CIFAR10_RECORD)
                batches[name] = _cifar10_records(raw, member.size, limit, path)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _cifar10_corrupt(path, f"{type(e).__name__}: {e}") from e
    missing = [f"{_CIFAR10_FOLDER}/{n}" for n in _CIFAR10_BATCHES if n not in batches]
    if missing:
        raise _cifar10_corrupt(path, f"the archive lacks {', '.join(missing)}")
    return batches


def _validate_cifar10_archive(path: pathlib.Path, hash_name: str) -> None:
    del hash_name  # Only the archive's own digest is published.
    _parse_cifar10_archive(path, 1)


def _cifar10_extracted(folder: pathlib.Path) -> pathlib.Path | None:
    """The folder holding all six extracted batch files: `folder`'s
    `cifar-10-batches-bin/`, or `folder` itself."""
    for candidate in (folder / _CIFAR10_FOLDER, folder):
        if all((candidate / name).is_file() for name in _CIFAR10_BATCHES):
            return candidate
    return None


def _locate_cifar10(folder: pathlib.Path, download: bool) -> pathlib.Path:
    """The extracted batch folder if complete, else the archive (downloaded into
    `folder` if missing and `download`)."""
    extracted = _cifar10_extracted(folder)
    if extracted is not None:
        return extracted
    archive = folder / _CIFAR10_ARCHIVE
    if archive.is_file():
        return archive
    if download:
        checksum = Checksum("md5", _CIFAR10_MD5, of_payload=False)
        failure = download_files(
            "cifar10",
            folder,
            [(_CIFAR10_ARCHIVE, checksum)],
            _validate_cifar10_archive,
        )
    else:
        failure = "downloading was not attempted (download=False)"
    if failure is None and archive.is_file():
        return archive
    partial = folder / _CIFAR10_FOLDER
    lacking = ""
    if partial.is_dir():
        absent = [n for n in _CIFAR10_BATCHES if not (partial / n).is_file()]
        lacking = f" ({partial} lacks {', '.join(absent)})"
    url = f"{MIRRORS['cifar10'][0]}{_CIFAR10_ARCHIVE}"
    raise DataNotFoundError(
        f"CIFAR-10 missing from {folder}: neither {_CIFAR10_ARCHIVE} nor a complete "
        f"{_CIFAR10_FOLDER}/ folder is there{lacking}; {failure}\n"
        f"Put {_CIFAR10_ARCHIVE} (from {url}, about 163 MiB) in {folder}, or its "
        f"extracted {_CIFAR10_FOLDER}/ folder (data_batch_1.bin ... data_batch_5.bin "
        f"and test_batch.bin), or pass --data-dir (data_dir=...) or set "
        f"{DATA_ENV_VAR} to a folder holding it.",
        missing=(_CIFAR10_ARCHIVE,),
        folder=folder,
    )


def read_cifar10(
    folder: pathlib.Path, download: bool, limit: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(train images, train labels, test images, test labels)`, uint8, images
    flat and channel-major."""
    source = _locate_cifar10(folder, download)
    if source.is_dir():
        batches = _read_cifar10_folder(source, limit)
    else:
        digest = file_digest(source, "md5")
        if digest != _CIFAR10_MD5:
            raise _cifar10_corrupt(
                source,
                f"its MD5 {digest} is not the published {_CIFAR10_MD5} of "
                f"{_CIFAR10_ARCHIVE}",
            )
        batches = _parse_cifar10_archive(source, limit)
    train_x = np.concatenate([batches[n][0] for n in _CIFAR10_TRAIN])[:limit]
    train_y = np.concatenate([batches[n][1] for n in _CIFAR10_TRAIN])[:limit]
    test_x, test_y = batches[_CIFAR10_TEST]
    return train_x, train_y, test_x, test_y


@functools.partial(jax.jit, static_argnames="shape")
def _pixel_sums(
    x: UInt8[Array, "n features"], shape: tuple[int, int, int]
) -> tuple[Float[Array, "n channels rows"], Float[Array, "n channels rows"]]:
    # Sums of each image row and of its squares: integers of at most
    # width * 255**2 (2,080,800 for CIFAR-10), exact in float32 below 2**24 and
    # faster than integer sums. The totals are finished on the host in float64,
    # exact too, so the statistics do not depend on `dtype`.
    v = x.reshape(x.shape[0], *shape).astype(jnp.float32)
    return v.sum(axis=3), (v * v).sum(axis=3)


def _channel_stats(
    x: UInt8[Array, "n features"], shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (`ddof=0`) of `x / 255`, in
    float64 on the host."""
    assert shape[2] * 255**2 < 2**24
    sums, squares = _pixel_sums(x, shape)
    count = x.shape[0] * shape[1] * shape[2]
    mean = np.asarray(sums, np.float64).sum(axis=(0, 2)) / count
    var = np.asarray(squares, np.float64).sum(axis=(0, 2)) / count - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    # A constant channel (one image, say) is only centred.
    std = np.where(std > 0, std, 255.0)
    return mean / 255, std / 255


@functools.partial(jax.jit, static_argnames="dtype")
def _normalise(
    x: UInt8[Array, "n features"],
    mean: Float[Array, " channels"],
    std: Float[Array, " channels"],
    dtype: np.dtype,
) -> Float[Array, "n features"]:
    n, c = x.shape[0], mean.shape[0]
    scaled = x.reshape(n, c, x.shape[1] // c).astype(dtype) / jnp.asarray(255, dtype)
    out = (scaled - mean[None, :, None]) / std[None, :, None]
    return out.reshape(x.shape)


def cifar10_normaliser(
    train_x: UInt8[Array, "n features"], dtype: np.dtype
) -> Callable[[UInt8[Array, "m features"]], Float[Array, "m features"]]:
    """Scales pixels to `[0, 1]`, then standardises each channel with the mean and
    standard deviation of `train_x`, the training split actually loaded."""
    mean, std = _channel_stats(train_x, CIFAR10_SHAPE)
    mean, std = jnp.asarray(mean, dtype), jnp.asarray(std, dtype)
    return lambda x: _normalise(x, mean, std, dtype)
