"""Checkpoints that survive a kill at any moment.

A checkpoint is one file: a magic line, a JSON header line (configuration, epoch,
metrics history, and the length and SHA-256 of the payload) and the payload, the
model, optimiser state and RNG key written by `eqx.tree_serialise_leaves`. It is
written to a temporary file in the same folder and renamed over the old one, so the
folder always holds the last complete checkpoint; the checksum catches a file that
was cut short or altered anyway.

The arrays are gathered to the host before they are written: a checkpoint holds
plain NumPy arrays, whatever devices (or how many) they were on, and the run that
loads it places them on its own.
"""

import hashlib
import io
import json
import os
import pathlib
import secrets
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree


CHECKPOINT_NAME = "checkpoint.eqx"
_MAGIC = b"bioflax_eqx checkpoint v1\n"


class CheckpointError(Exception):
    """A checkpoint is missing, truncated, corrupt, or belongs to another run."""


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the new one,
    never a part (temporary file in the same folder, flushed, then renamed)."""
    # Not tempfile.mkstemp: its files are private (0600); this one gets the
    # permissions of any new file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(folder: pathlib.Path, header: dict[str, Any], state: PyTree):
    """Writes `header` and the arrays of `state` (gathered to the host; replicated
    ones from this process's own copy) atomically to the folder."""
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, jax.device_get(state))
    payload = buffer.getvalue()
    header = {
        **header,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    line = json.dumps(header, allow_nan=False).encode() + b"\n"
    atomic_write(folder / CHECKPOINT_NAME, _MAGIC + line + payload)


def _corrupt(path: pathlib.Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupt ({why}); it cannot be resumed. "
        "Start the run again with --overwrite (overwrite=True)."
    )


def read_header(folder: pathlib.Path) -> tuple[dict[str, Any], bytes]:
    """The header of the folder's checkpoint and the raw payload, checked whole."""
    path = folder / CHECKPOINT_NAME
    if not folder.is_dir():
        raise CheckpointError(f"cannot resume: the folder {folder} does not exist.")
    if not path.is_file():
        raise CheckpointError(
            f"cannot resume: {folder} holds no checkpoint ({CHECKPOINT_NAME}); start "
            "a fresh run instead."
        )
    data = path.read_bytes()
    if not data.startswith(_MAGIC):
        raise _corrupt(path, "not a bioflax_eqx checkpoint")
    end = data.find(b"\n", len(_MAGIC))
    if end < 0:
        raise _corrupt(path, "the header is cut short")
    try:
        header = json.loads(data[len(_MAGIC) : end])
    except ValueError as e:
        raise _corrupt(path, f"unreadable header: {e}") from e
    payload = data[end + 1 :]
    if not isinstance(header, dict) or "payload_bytes" not in header:
        raise _corrupt(path, "the header lacks the payload's size")
    if len(payload) != header["payload_bytes"]:
        raise _corrupt(
            path,
            f"{len(payload)} bytes of data where {header['payload_bytes']} were "
            "written",
        )
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise _corrupt(path, "the data does not match its checksum")
    return header, payload


def load_state(folder: pathlib.Path, payload: bytes, like: PyTree) -> PyTree:
    """The arrays of a checkpoint's payload, in the structure of `like`, checked to
    have `like`'s shapes and dtypes; on the default device (the trainer then places
    them on its devices)."""
    path = folder / CHECKPOINT_NAME
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(payload), like)
    except (ValueError, EOFError, OSError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    except RuntimeError as e:  # Equinox: an array of another shape or dtype
        raise CheckpointError(
            f"checkpoint {path} does not fit this configuration ({e}); it belongs "
            "to another model."
        ) from e
    for got, want in zip(
        jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(like)
    ):
        got_type = (np.shape(got), np.asarray(got).dtype)
        want_type = (np.shape(want), np.asarray(want).dtype)
        if got_type != want_type:
            raise CheckpointError(
                f"checkpoint {path} holds an array of shape and dtype {got_type} "
                f"where this configuration has {want_type}; it belongs to another "
                "model."
            )
    return state
