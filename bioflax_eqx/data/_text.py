"""Character-level text corpora: reading, a contiguous split, a vocabulary from the
training text, and epochs of random windows on device."""

import functools
import math
import os
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from .._checks import check_positive_int
from ._dataset import DataNotFoundError


TEXT_DATASETS: tuple[str, ...] = ("shakespeare", "text")
# From the project root, as the README of the shared data folder says.
SHAKESPEARE_DIR = pathlib.Path("../shared/data/shakespeare")
SHAKESPEARE_FILE = "shakespeare.txt"
# How `decode` spells the unknown symbol (id 0).
UNKNOWN = "\ufffd"


class TextCorpus(eqx.Module):
    """A character corpus cut into contiguous `train`, `val` and `test` splits of
    token ids (`int32`), with the vocabulary of the training split.

    Id 0 is the unknown symbol, which every character absent from the training
    split maps to; id `i + 1` is `characters[i]` (the training split's distinct
    characters, sorted). A pytree whose leaves are the three arrays.
    """

    train: Int[Array, " n_train"]
    val: Int[Array, " n_val"]
    test: Int[Array, " n_test"]
    characters: str = eqx.field(static=True)
    name: str = eqx.field(static=True)

    @property
    def vocab_size(self) -> int:
        """The number of ids: the training characters and the unknown symbol."""
        return len(self.characters) + 1

    def encode(self, text: str) -> Int[Array, " n"]:
        """`text` as ids; characters outside the vocabulary become 0 (unknown)."""
        return jnp.asarray(_encode(_code_points(text), _vocabulary(self.characters)))

    def decode(self, ids: Int[Array, " n"] | np.ndarray) -> str:
        """The text of `ids`, the unknown symbol written as U+FFFD."""
        table = np.array([UNKNOWN, *self.characters])
        return "".join(table[np.asarray(ids)].tolist())


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


def _vocabulary(characters: str) -> np.ndarray:
    return _code_points(characters)


def _encode(codes: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Ids of `codes` in the sorted `vocabulary`, shifted by one; 0 if absent."""
    if vocabulary.size == 0:
        return np.zeros(codes.shape, np.int32)
    index = np.minimum(np.searchsorted(vocabulary, codes), vocabulary.size - 1)
    known = vocabulary[index] == codes
    return np.where(known, index + 1, 0).astype(np.int32)


def _read(dataset: str, folder: pathlib.Path) -> str:
    if dataset == "shakespeare":
        files = [folder / SHAKESPEARE_FILE]
        missing = [f.name for f in files if not f.is_file()]
    else:
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        missing = [] if files else ["*.txt"]
    if missing:
        raise DataNotFoundError(
            f"the {dataset!r} corpus needs {', '.join(missing)} in {folder}; pass "
            "the folder that holds it (`data_dir`, `--data-dir`).",
            missing,
            folder,
        )
    return "".join(f.read_text(encoding="utf-8") for f in files)


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, ...]:
    """`(n_train, n_val, n_test)`: `val` and `test` take `floor(fraction · n)`
    characters each, `train` the rest, before them."""
    n_val, n_test = math.floor(val_fraction * n), math.floor(test_fraction * n)
    return n - n_val - n_test, n_val, n_test


def load_text(
    dataset: str = "shakespeare",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> TextCorpus:
    """Reads a character corpus and splits it, contiguously, into train / val / test.

    **Arguments:**

    - `dataset`: `"shakespeare"` reads `shakespeare.txt` from `data_dir` (default
        `../shared/data/shakespeare`, relative to the working folder); `"text"`
        reads every `*.txt` file in `data_dir` (needed), sorted by name and
        concatenated.
    - `data_dir`: the folder holding the file(s).
    - `val_fraction`, `test_fraction`: the validation and test splits take
        `floor(fraction · n)` characters each, in this order after the training
        split, which takes the rest (90 / 5 / 5 % by default).

    **Returns:**

    A [`bioflax_eqx.TextCorpus`][]; its vocabulary holds the characters of the
    training split, plus the unknown symbol (id 0) for any other.

    **Raises:**

    [`bioflax_eqx.DataNotFoundError`][] if the file(s) are missing, `ValueError` for
    an unknown `dataset` or a split too small to hold one window.
    """
    if dataset not in TEXT_DATASETS:
        raise ValueError(
            f"unknown text dataset {dataset!r}; expected one of "
            f"{', '.join(TEXT_DATASETS)}."
        )
    if data_dir is None:
        if dataset == "text":
            raise ValueError("dataset 'text' needs `data_dir` (a folder of *.txt).")
        data_dir = SHAKESPEARE_DIR
    for name, fraction in (
        ("val_fraction", val_fraction),
        ("test_fraction", test_fraction),
    ):
        if not 0 < fraction < 0.5:
            raise ValueError(f"`{name}` must be in (0, 0.5), got {fraction!r}.")
    codes = _code_points(_read(dataset, pathlib.Path(data_dir).expanduser()))
    sizes = split_sizes(codes.size, val_fraction, test_fraction)
    if min(sizes) < 2:
        raise ValueError(
            f"the corpus of {codes.size} characters splits into {sizes} "
            "(train, val, test): every split needs at least 2."
        )
    n_train, n_val, _ = sizes
    characters = np.unique(codes[:n_train])
    ids = _encode(codes, characters)
    return TextCorpus(
        train=jnp.asarray(ids[:n_train]),
        val=jnp.asarray(ids[n_train : n_train + n_val]),
        test=jnp.asarray(ids[n_train + n_val :]),
        characters=characters.astype("<u4").tobytes().decode("utf-32-le"),
        name=dataset,
    )


@functools.partial(jax.jit, static_argnames=("context", "batch_size"))
def epoch_windows(
    key: PRNGKeyArray, tokens: Int[Array, " n"], context: int, batch_size: int
) -> tuple[Int[Array, "steps batch context"], Int[Array, "steps batch context"]]:
    """One epoch of a text as minibatches of random windows, on device.

    The text is cut, from a random offset in `[0, context)`, into
    `(n - context) // context` windows of `context + 1` characters, each starting
    where the previous one's inputs end, so every character in the covered span is
    predicted once; the windows are shuffled and cut into `batch_size` (the last
    `windows % batch_size` dropped). Compiled with `jax.jit` (`context` and
    `batch_size` static): the same shapes for every key.

    **Arguments:**

    - `key`: decides the offset and the order.
    - `tokens`: the text's ids (e.g. `corpus.train`).
    - `context`: the model's sequence length.
    - `batch_size`: windows per step.

    **Returns:**

    `(inputs, targets)`, both of shape `(steps, batch_size, context)`: each window's
    first `context` ids and its last `context` ids (the next character at every
    position).
    """
    check_positive_int(context=context, batch_size=batch_size)
    windows = (tokens.shape[0] - context) // context
    if windows < batch_size:
        raise ValueError(
            f"a text of {tokens.shape[0]} ids holds {max(windows, 0)} windows of "
            f"{context + 1}, fewer than `batch_size` = {batch_size}."
        )
    steps = windows // batch_size
    k_offset, k_order = jax.random.split(key)
    offset = jax.random.randint(k_offset, (), 0, context)
    order = jax.random.permutation(k_order, windows)[: steps * batch_size]
    starts = offset + context * order
    window = jnp.take(tokens, starts[:, None] + jnp.arange(context + 1)[None, :])
    window = window.reshape(steps, batch_size, context + 1)
    return window[..., :-1], window[..., 1:]


@functools.partial(jax.jit, static_argnames="context")
def eval_windows(
    tokens: Int[Array, " n"], context: int
) -> tuple[
    Int[Array, "windows context"],
    Int[Array, "windows context"],
    Bool[Array, "windows context"],
]:
    """A whole text as windows that predict each of its characters once, for
    evaluation (bits per character over a split).

    Windows of `context + 1` characters start at `0, context, 2·context, ...`; the
    last one ends at the text's end, and `counted` marks, in it, only the
    positions that no earlier window predicts. So the targets where `counted` is
    true are `tokens[1:]`, each once: the mean cross-entropy over them, divided by
    `ln 2`, is the text's bits per character.

    **Arguments:**

    - `tokens`: the text's ids (e.g. `corpus.test`), at least `context + 1`.
    - `context`: the model's sequence length.

    **Returns:**

    `(inputs, targets, counted)`, each of shape `(windows, context)`.
    """
    check_positive_int(context=context)
    n = tokens.shape[0]
    if n < context + 1:
        raise ValueError(
            f"a text of {n} ids is shorter than one window of {context + 1}."
        )
    windows = -(-(n - 1) // context)  # ceil: the last window ends at the text's end
    starts = jnp.minimum(context * jnp.arange(windows), n - context - 1)
    window = jnp.take(tokens, starts[:, None] + jnp.arange(context + 1)[None, :])
    # Position j of window i predicts character starts[i] + j + 1; the last window
    # overlaps the one before it, whose predictions end at `context · (windows - 1)`.
    predicted = starts[:, None] + jnp.arange(1, context + 1)[None, :]
    first_new = context * jnp.arange(windows)[:, None] + 1
    return window[:, :-1], window[:, 1:], predicted >= first_new
