"""PyTorch's side of `cli.py`: what `bioflax-eqx train --model lenet --epochs 1` does,
as a PyTorch script of its own, so that its process (Python, imports, reading
MNIST, the epoch, evaluation) is timed as the library's command is.

    python -m benchmarks._torch_cli --rule fa --data-dir DIR

Reads the four MNIST IDX files (`.gz` or not), holds out `--val-size` random
training images for validation, trains `_torch.lenet(rule)` one shuffled epoch
(Adam, `--batch-size`, dropping the last partial batch as the library does), then
evaluates validation and test (no gradients, batches of 1000). Prints one JSON line:
its training and evaluation seconds and the accuracies. It imports no JAX.
"""

import argparse
import gzip
import json
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from . import _torch


EVAL_BATCH = 1000


def read_idx(folder: pathlib.Path, stem: str, limit: int | None) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's images or labels), its first `limit`
    entries. Not `bfx.read_idx`: importing the library imports JAX, whose start-up
    would then be timed as part of PyTorch's process."""
    path = folder / f"{stem}.gz"
    data = gzip.open(path).read() if path.is_file() else (folder / stem).read_bytes()
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", ndim, offset=4).astype(int)
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return array[:limit]


def images(folder: pathlib.Path, split: str, limit: int | None):
    x = read_idx(folder, f"{split}-images-idx3-ubyte", limit)
    y = read_idx(folder, f"{split}-labels-idx1-ubyte", limit)
    return (x.astype(np.float32) / 255).reshape(-1, 1, 28, 28), y.astype(np.int64)


def evaluate(model, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean loss and accuracy over a split, in batches."""
    import torch  # pyright: ignore[reportMissingImports]
    from torch.nn import functional as F  # pyright: ignore[reportMissingImports]

    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), EVAL_BATCH):
            xb = torch.from_numpy(x[i : i + EVAL_BATCH])
            yb = torch.from_numpy(y[i : i + EVAL_BATCH])
            logits = model(xb)
            loss += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(1) == yb).sum())
    return loss / len(x), correct / len(x)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="`bioflax-eqx train --model lenet --epochs 1` in PyTorch."
    )
    parser.add_argument("--rule", choices=("bp", "fa"), required=True)
    parser.add_argument("--data-dir", type=pathlib.Path, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    threads = _torch.info()  # every core, as in the other benchmarks
    train_x, train_y = images(args.data_dir, "train", args.limit)
    test_x, test_y = images(args.data_dir, "t10k", args.limit)
    order = np.random.default_rng(0).permutation(len(train_x))
    val, train = order[: args.val_size], order[args.val_size :]
    val_x, val_y = train_x[val], train_y[val]
    train_x, train_y = train_x[train], train_y[train]
    model = _torch.lenet(args.rule)

    t0 = time.perf_counter()
    _torch.case(model, train_x, train_y, args.batch_size).epoch()
    t1 = time.perf_counter()
    val_loss, val_acc = evaluate(model, val_x, val_y)
    test_loss, test_acc = evaluate(model, test_x, test_y)
    t2 = time.perf_counter()
    record = {
        "train_time_s": t1 - t0,
        "eval_time_s": t2 - t1,
        "n_train": len(train_x),
        "val_acc": val_acc,
        "test_acc": test_acc,
        "test_loss": test_loss,
        **threads,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
