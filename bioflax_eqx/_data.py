"""Data: MNIST-format IDX files, CIFAR-10, synthetic regression tasks, batching
and image augmentation.

Everything a training run consumes comes out of here as JAX arrays, and every random
choice (validation split, synthetic inputs, batch order) is drawn from an explicit
key, so a run is a pure function of its seed.
"""

import functools
import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import pathlib
import posixpath
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray, Shaped, UInt8


_log = logging.getLogger(__name__)

DATA_ENV_VAR = "BIOFLAX_EQX_DATA"

# The four files of an MNIST-format data set, in the order they are read.
_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_DISPLAY_NAMES = {
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
}

# CIFAR-10 in its binary distribution: one archive holding a folder of six batch
# files, each a run of records of 1 label byte + 3072 pixel bytes (channel-major
# 3 x 32 x 32: the 1024 red, then green, then blue pixels, each row-major).
_CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
_CIFAR10_FOLDER = "cifar-10-batches-bin"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR10_TEST = "test_batch.bin"
_CIFAR10_SHAPE = (3, 32, 32)
_CIFAR10_RECORD = 1 + math.prod(_CIFAR10_SHAPE)
# The MD5 published with the archive (https://www.cs.toronto.edu/~kriz/cifar.html).
_CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"

_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}


class _Checksum(NamedTuple):
    algorithm: str
    hexdigest: str
    # True: digest of the decompressed IDX bytes, which survives re-gzipping (the
    # mirrors' .gz files and the project's shared copies differ byte-wise).
    # False: digest of the file exactly as served.
    of_payload: bool


# SHA-256 of the decompressed MNIST files. Their MD5s are the ones published with
# MNIST (6bbc9ace..., a25bea73..., 2646ac64..., 27ae3e4e...).
_MNIST_PAYLOAD_SHA256 = {
    "train-images-idx3-ubyte": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    ),
    "train-labels-idx1-ubyte": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    ),
    "t10k-images-idx3-ubyte": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    ),
    "t10k-labels-idx1-ubyte": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    ),
}

# Fashion-MNIST publishes only MD5s, of the .gz files as served; a download is also
# parsed in full as IDX before it is kept.
_DOWNLOAD_CHECKSUMS: dict[str, dict[str, _Checksum]] = {
    "mnist": {
        stem: _Checksum("sha256", digest, of_payload=True)
        for stem, digest in _MNIST_PAYLOAD_SHA256.items()
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": _Checksum(
            "md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", of_payload=False
        ),
        "train-labels-idx1-ubyte": _Checksum(
            "md5", "25c81989df183df01b3e8a0aad5dffbe", of_payload=False
        ),
        "t10k-images-idx3-ubyte": _Checksum(
            "md5", "bef4ecab320f06d8554ea6380940ec79", of_payload=False
        ),
        "t10k-labels-idx1-ubyte": _Checksum(
            "md5", "bb300cfdad3c16e7a12a480ee83cd310", of_payload=False
        ),
    },
}

# Decompressed SHA-256s checked on every load (files read in full only).
_KNOWN_PAYLOADS: dict[str, dict[str, str]] = {"mnist": _MNIST_PAYLOAD_SHA256}

# Seconds to wait on a silent connection: an offline machine should fail fast.
_TIMEOUT_S = 10.0

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
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


def _corrupt(path: pathlib.Path, why: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid IDX file ({why}); the file is corrupt or truncated: "
        "delete it and download it again"
    )


def _open_maybe_gzip(raw: io.BufferedIOBase) -> io.BufferedIOBase:
    # Decide by content, not by name, so a misnamed file still reads.
    is_gzip = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw


def _read_idx(
    path: pathlib.Path, limit: int | None, hash_name: str | None
) -> tuple[np.ndarray, str | None]:
    """Reads an IDX file; also returns a digest of the decompressed bytes if asked
    (only when the whole file is read)."""
    with open(path, "rb") as raw, _open_maybe_gzip(raw) as f:
        try:
            header = f.read(4)
            if len(header) < 4 or header[:2] != b"\0\0" or header[2] not in _IDX_DTYPES:
                raise _corrupt(path, f"bad magic number 0x{header.hex()}")
            dtype = _IDX_DTYPES[header[2]]
            ndim = header[3]
            if ndim == 0:
                raise _corrupt(path, "magic number declares 0 dimensions")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise _corrupt(path, "header ends early")
            dims = struct.unpack(f">{ndim}I", dims_raw)
            n = dims[0] if limit is None else min(limit, dims[0])
            nbytes = n * math.prod(dims[1:]) * dtype.itemsize
            data = f.read(nbytes)
            if len(data) < nbytes:
                raise _corrupt(
                    path,
                    f"header declares shape {dims}, but only {len(data)} of the "
                    f"{nbytes} data bytes needed are there",
                )
            whole = n == dims[0]
            # Reading past the end also makes gzip check its CRC.
            if whole and f.read(1):
                raise _corrupt(path, f"trailing bytes after the data of shape {dims}")
        except (OSError, EOFError, zlib.error) as e:
            raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    digest = None
    if hash_name is not None and whole:
        h = hashlib.new(hash_name)
        for chunk in (header, dims_raw, data):
            h.update(chunk)
        digest = h.hexdigest()
    array = np.frombuffer(data, dtype).reshape((n, *dims[1:]))
    return array.astype(dtype.newbyteorder("=")), digest


def read_idx(
    path: str | os.PathLike[str], *, limit: int | None = None
) -> Shaped[np.ndarray, " n *dims"]:
    """Reads an array stored in the IDX format of MNIST, gzipped or plain.

    **Arguments:**

    - `path`: the file. Gzip is recognised by its content, not by the file name.
    - `limit`: read only the first `limit` entries along the first axis (fast for
        tests); `None` reads the whole file and also checks that nothing follows the
        data.

    **Returns:**

    A NumPy array in native byte order with the shape the header declares (first
    axis cut to `limit`).

    **Raises:**

    `ValueError`, naming the file, when its magic number is wrong or it is
    truncated, has trailing bytes or is not valid gzip.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    return _read_idx(pathlib.Path(path), limit, None)[0]


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None, dataset: str
) -> pathlib.Path:
    """Finds the folder that holds (or will hold) a data set's files.

    **Arguments:**

    - `data_dir`: an explicit folder (e.g. from `--data-dir`); wins if given.
    - `dataset`: the data set's name, e.g. `"mnist"`; names the cache subfolder.

    **Returns:**

    In order of precedence: `data_dir`; else the folder in the environment
    variable `BIOFLAX_EQX_DATA`; else `$XDG_CACHE_HOME/bioflax_eqx/<dataset>` or
    `~/.cache/bioflax_eqx/<dataset>`. An explicit folder or the environment
    variable names the folder holding the files themselves, not a parent. The
    folder is not created.
    """
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return pathlib.Path(env).expanduser()
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        cache = pathlib.Path(xdg)
    else:
        cache = pathlib.Path.home() / ".cache"
    return cache / "bioflax_eqx" / dataset


def _find(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _validate_idx(path: pathlib.Path, hash_name: str) -> str | None:
    return _read_idx(path, None, hash_name)[1]


def _fetch(
    url: str,
    dest: pathlib.Path,
    checksum: _Checksum,
    validate: Callable[[pathlib.Path, str], str | None] = _validate_idx,
) -> None:
    """Downloads `url` to `dest` via a temporary file that is renamed only once the
    content has verified, so `dest` is never partial and no temporary file stays.

    `validate(path, hash_name)` parses the download in full (raising `ValueError`
    if it is malformed) and returns the digest of its payload, or None."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    tmp = pathlib.Path(tmp_name)
    try:
        file_hash = hashlib.new(checksum.algorithm)
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    file_hash.update(chunk)
        payload_digest = validate(tmp, checksum.algorithm)
        got = payload_digest if checksum.of_payload else file_hash.hexdigest()
        if got != checksum.hexdigest:
            raise ValueError(
                f"{checksum.algorithm} checksum mismatch: expected "
                f"{checksum.hexdigest}, got {got}"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _download(
    dataset: str,
    folder: pathlib.Path,
    files: Sequence[tuple[str, _Checksum]],
    validate: Callable[[pathlib.Path, str], str | None] = _validate_idx,
) -> str | None:
    """Downloads the missing files (names, as on the mirrors, with their
    checksums) into `folder`; returns why it failed, or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {folder}: {e}"
    for file_name, checksum in files:
        reasons = []
        for mirror in _MIRRORS[dataset]:
            url = f"{mirror}{file_name}"
            _log.info("downloading %s", url)
            try:
                _fetch(url, folder / file_name, checksum, validate)
                break
            except (OSError, http.client.HTTPException, ValueError) as e:
                reasons.append(f"  {url}: {e}")
        else:
            # Offline, every later file would fail the same way: stop here.
            return "downloading failed:\n" + "\n".join(reasons)
    return None


def _locate(dataset: str, folder: pathlib.Path, download: bool) -> list[pathlib.Path]:
    missing = [stem for stem in _STEMS if _find(folder, stem) is None]
    if missing:
        if download:
            checksums = _DOWNLOAD_CHECKSUMS[dataset]
            failure = _download(
                dataset, folder, [(f"{s}.gz", checksums[s]) for s in missing]
            )
        else:
            failure = "downloading was not attempted (download=False)"
        if failure is not None:
            still = [f"{s}.gz" for s in _STEMS if _find(folder, s) is None]
            raise DataNotFoundError(
                f"{_DISPLAY_NAMES[dataset]} files missing from {folder}: "
                f"{', '.join(still)}; {failure}\n"
                f"Put these files in {folder} (gzipped, or decompressed without the "
                f"'.gz' suffix), or pass --data-dir (data_dir=...) or set "
                f"{DATA_ENV_VAR} to a folder holding all four files.",
                missing=still,
                folder=folder,
            )
    found = [_find(folder, stem) for stem in _STEMS]
    assert all(p is not None for p in found)
    return [p for p in found if p is not None]


def _read_checked(
    dataset: str, path: pathlib.Path, stem: str, limit: int | None
) -> np.ndarray:
    array, digest = _read_idx(path, limit, "sha256")
    if digest is None:
        return array
    for other, payloads in _KNOWN_PAYLOADS.items():
        if other != dataset and digest in payloads.values():
            raise ValueError(
                f"{path} holds {_DISPLAY_NAMES[other]}, not "
                f"{_DISPLAY_NAMES[dataset]}: point data_dir / {DATA_ENV_VAR} at the "
                f"{_DISPLAY_NAMES[dataset]} folder"
            )
    expected = _KNOWN_PAYLOADS.get(dataset, {}).get(stem)
    if expected is not None and digest != expected:
        raise _corrupt(path, "its content does not match the published checksum")
    return array


def _read_pair(
    dataset: str,
    images_path: pathlib.Path,
    labels_path: pathlib.Path,
    limit: int | None,
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    images = _read_checked(dataset, images_path, _stem(images_path), limit)
    # Labels are small: read them whole so their checksum is always verified.
    labels = _read_checked(dataset, labels_path, _stem(labels_path), None)[:limit]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise _corrupt(
            images_path, f"expected 3-d uint8 images, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise _corrupt(
            labels_path, f"expected 1-d uint8 labels, got {labels.dtype} {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= n_classes:
        raise _corrupt(labels_path, f"label {int(labels.max())} >= {n_classes}")
    return images.reshape(images.shape[0], -1), labels


def _stem(path: pathlib.Path) -> str:
    return path.name.removesuffix(".gz")


# ------------------------------------------------------------------ CIFAR-10

_CIFAR10_BATCHES = (*_CIFAR10_TRAIN, _CIFAR10_TEST)


def _cifar10_corrupt(path: pathlib.Path, why: str) -> ValueError:
    return ValueError(
        f"{path} is not valid CIFAR-10 binary data ({why}); the file is corrupt or "
        "truncated: delete it and download it again"
    )


def _file_digest(path: pathlib.Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
        checksum = _Checksum("md5", _CIFAR10_MD5, of_payload=False)
        failure = _download(
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
    url = f"{_MIRRORS['cifar10'][0]}{_CIFAR10_ARCHIVE}"
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


def _read_cifar10(
    folder: pathlib.Path, download: bool, limit: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(train images, train labels, test images, test labels)`, uint8, images
    flat and channel-major."""
    source = _locate_cifar10(folder, download)
    if source.is_dir():
        batches = _read_cifar10_folder(source, limit)
    else:
        digest = _file_digest(source, "md5")
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


# ------------------------------------------------------------------- loading


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
        `bioflax_eqx._data.resolve_data_dir` for the default. For MNIST and
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
    if name not in _DISPLAY_NAMES:
        raise ValueError(
            f"unknown data set {name!r}; expected one of {sorted(_DISPLAY_NAMES)}"
        )
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    n_classes = 10
    folder = resolve_data_dir(data_dir, name)
    if name == "cifar10":
        image_shape = _CIFAR10_SHAPE
        train_x, train_y, test_x, test_y = _read_cifar10(folder, download, limit)
    else:
        image_shape = (1, 28, 28)
        paths = _locate(name, folder, download)
        train_x, train_y = _read_pair(name, paths[0], paths[1], limit, n_classes)
        test_x, test_y = _read_pair(name, paths[2], paths[3], limit, n_classes)
    if not 0 <= val_size < train_x.shape[0]:
        raise ValueError(
            f"val_size must be in [0, {train_x.shape[0]}) for {train_x.shape[0]} "
            f"training examples, got {val_size}"
        )
    dtype = jnp.dtype(dtype)

    def labels(y: np.ndarray) -> Array:
        return jnp.asarray(y, dtype=jnp.int32)

    # Move uint8 to the device and scale there: a quarter of the bytes.
    if name == "cifar10":
        (tx, ty), (vx, vy) = _hold_out(
            key, jnp.asarray(train_x), labels(train_y), val_size
        )
        mean, std = _channel_stats(tx, _CIFAR10_SHAPE)
        mean, std = jnp.asarray(mean, dtype), jnp.asarray(std, dtype)

        def scale(x: Array) -> Array:
            return _normalise(x, mean, std, dtype)

        train = Split(scale(tx), ty)
        val = Split(scale(vx), vy)
        test = Split(scale(jnp.asarray(test_x)), labels(test_y))
    else:

        def scale(x: Array) -> Array:
            return x.astype(dtype) / jnp.asarray(255, dtype)

        (tx, ty), (vx, vy) = _hold_out(
            key, scale(jnp.asarray(train_x)), labels(train_y), val_size
        )
        train, val = Split(tx, ty), Split(vx, vy)
        test = Split(scale(jnp.asarray(test_x)), labels(test_y))
    return Dataset(
        train=train,
        val=val,
        test=test,
        n_features=train_x.shape[1],
        n_classes=n_classes,
        task="classification",
        name=name,
        image_shape=image_shape,
    )


def _check_sizes(**sizes: int) -> None:
    for what, size in sizes.items():
        least = 0 if what in ("n_val", "n_test", "depth") else 1
        if size < least:
            raise ValueError(f"{what} must be at least {least}, got {size}")


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
    _check_sizes(
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        in_size=in_size,
        out_size=out_size,
        width=width,
        depth=depth,
    )
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
    _check_sizes(n_train=n_train, n_val=n_val, n_test=n_test)
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


@functools.partial(jax.jit, static_argnames="batch_size")
def epoch_batches(
    key: PRNGKeyArray,
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

    - `key`: decides the order.
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
    idx = jax.random.permutation(key, n)[: steps * batch_size]
    xb = jnp.take(x, idx, axis=0).reshape(steps, batch_size, *x.shape[1:])
    yb = jnp.take(y, idx, axis=0).reshape(steps, batch_size, *y.shape[1:])
    return xb, yb


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
    if pad < 0:
        raise ValueError(f"pad must be non-negative, got {pad}")
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
