"""Where a data set's files live, and fetching them from mirrors into that folder,
verified against checksums, with nothing partial ever left behind."""

import hashlib
import http.client
import logging
import os
import pathlib
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from typing import NamedTuple


_log = logging.getLogger(__name__)

DATA_ENV_VAR = "BIOFLAX_EQX_DATA"

MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}


# Copies that an operating-system package installs, read when no folder is named and
# the cache holds nothing (Debian's `dataset-fashion-mnist`).
SYSTEM_COPIES: dict[str, pathlib.Path] = {
    "fashion_mnist": pathlib.Path("/usr/share/datasets/fashion-mnist"),
}


class Checksum(NamedTuple):
    algorithm: str
    hexdigest: str
    # True: digest of the decompressed IDX bytes, which survives re-gzipping (the
    # mirrors' .gz files and the project's shared copies differ byte-wise).
    # False: digest of the file exactly as served.
    of_payload: bool


# Seconds to wait on a silent connection: an offline machine should fail fast.
_TIMEOUT_S = 10.0


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None, dataset: str
) -> pathlib.Path:
    """Finds the folder that holds (or will hold) a data set's files.

    **Arguments:**

    - `data_dir`: an explicit folder (e.g. from `--data-dir`); wins if given.
    - `dataset`: the data set's name, e.g. `"mnist"`; names the cache subfolder.

    **Returns:**

    In order of precedence: `data_dir`; else the folder in the environment
    variable `BIOFLAX_EQX_DATA`; else the cache,
    `$XDG_CACHE_HOME/bioflax_eqx/<dataset>` or `~/.cache/bioflax_eqx/<dataset>`,
    unless the cache holds nothing and the operating system has a copy (Fashion-MNIST:
    `/usr/share/datasets/fashion-mnist/`, from Debian's `dataset-fashion-mnist`),
    which is then used. An explicit folder or the environment variable names the
    folder holding the files themselves, not a parent. The folder is not created.
    """
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return pathlib.Path(env).expanduser()
    cache = cache_dir(dataset)
    system = SYSTEM_COPIES.get(dataset)
    if system is not None and _holds_files(system) and not _holds_files(cache):
        return system
    return cache


def _holds_files(folder: pathlib.Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.iterdir())


def where_looked(folder: pathlib.Path, dataset: str) -> str:
    """The places searched for `dataset`'s files, to end an error message with:
    `folder`, and the system's copy where the default search read it too."""
    system = SYSTEM_COPIES.get(dataset)
    if system is None or folder != cache_dir(dataset):
        return f"Looked in {folder} only."
    return f"Looked in {folder} (the cache) and in {system} (the system's copy)."


def cache_dir(dataset: str) -> pathlib.Path:
    """`$XDG_CACHE_HOME/bioflax_eqx/<dataset>`, or under `~/.cache`."""
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        cache = pathlib.Path(xdg)
    else:
        cache = pathlib.Path.home() / ".cache"
    return cache / "bioflax_eqx" / dataset


def file_digest(path: pathlib.Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fetch(
    url: str,
    dest: pathlib.Path,
    checksum: Checksum,
    validate: Callable[[pathlib.Path, str], str | None],
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


def download_files(
    dataset: str,
    folder: pathlib.Path,
    files: Sequence[tuple[str, Checksum]],
    validate: Callable[[pathlib.Path, str], str | None],
) -> str | None:
    """Downloads the missing files (names, as on the mirrors, with their
    checksums) into `folder`; returns why it failed, or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {folder}: {e}"
    for file_name, checksum in files:
        reasons = []
        for mirror in MIRRORS[dataset]:
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
