"""MNIST and Fashion-MNIST: the IDX file format, the four files of each data set and
their published checksums."""

import gzip
import hashlib
import io
import math
import os
import pathlib
import struct
import zlib

import numpy as np
from jaxtyping import Shaped

from .._checks import check_non_negative_int
from ._dataset import DISPLAY_NAMES, DataNotFoundError
from ._download import DATA_ENV_VAR, Checksum, download_files, where_looked


# One image of either data set: channels, height, width.
MNIST_SHAPE = (1, 28, 28)

# The four files of an MNIST-format data set, in the order they are read.
_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

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
_DOWNLOAD_CHECKSUMS: dict[str, dict[str, Checksum]] = {
    "mnist": {
        stem: Checksum("sha256", digest, of_payload=True)
        for stem, digest in _MNIST_PAYLOAD_SHA256.items()
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": Checksum(
            "md5", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", of_payload=False
        ),
        "train-labels-idx1-ubyte": Checksum(
            "md5", "25c81989df183df01b3e8a0aad5dffbe", of_payload=False
        ),
        "t10k-images-idx3-ubyte": Checksum(
            "md5", "bef4ecab320f06d8554ea6380940ec79", of_payload=False
        ),
        "t10k-labels-idx1-ubyte": Checksum(
            "md5", "bb300cfdad3c16e7a12a480ee83cd310", of_payload=False
        ),
    },
}

# Decompressed SHA-256s checked on every load (files read in full only).
_KNOWN_PAYLOADS: dict[str, dict[str, str]] = {"mnist": _MNIST_PAYLOAD_SHA256}

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


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
    if limit is not None:
        check_non_negative_int(limit=limit)
    return _read_idx(pathlib.Path(path), limit, None)[0]


def _find(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _validate_idx(path: pathlib.Path, hash_name: str) -> str | None:
    return _read_idx(path, None, hash_name)[1]


def _locate(dataset: str, folder: pathlib.Path, download: bool) -> list[pathlib.Path]:
    missing = [stem for stem in _STEMS if _find(folder, stem) is None]
    if missing:
        if download:
            checksums = _DOWNLOAD_CHECKSUMS[dataset]
            files = [(f"{s}.gz", checksums[s]) for s in missing]
            failure = download_files(dataset, folder, files, _validate_idx)
        else:
            failure = "downloading was not attempted (download=False)"
        if failure is not None:
            still = [f"{s}.gz" for s in _STEMS if _find(folder, s) is None]
            raise DataNotFoundError(
                f"{DISPLAY_NAMES[dataset]} files missing from {folder}: "
                f"{', '.join(still)}; {failure}\n"
                f"Put these files in {folder} (gzipped, or decompressed without the "
                f"'.gz' suffix), or pass --data-dir (data_dir=...) or set "
                f"{DATA_ENV_VAR} to a folder holding all four files. "
                + where_looked(folder, dataset),
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
                f"{path} holds {DISPLAY_NAMES[other]}, not "
                f"{DISPLAY_NAMES[dataset]}: point data_dir / {DATA_ENV_VAR} at the "
                f"{DISPLAY_NAMES[dataset]} folder"
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


def read_mnist(
    dataset: str, folder: pathlib.Path, download: bool, limit: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(train images, train labels, test images, test labels)` of MNIST or
    Fashion-MNIST, uint8, images flat."""
    paths = _locate(dataset, folder, download)
    train_x, train_y = _read_pair(dataset, paths[0], paths[1], limit, 10)
    test_x, test_y = _read_pair(dataset, paths[2], paths[3], limit, 10)
    return train_x, train_y, test_x, test_y
