"""The character-level corpus reader: the contiguous split, the vocabulary of the
training split with one unknown symbol, reading a folder of `*.txt`, and epochs of
random windows (one pass, shifted targets, seeded, compiled once), and evaluation
windows that predict every character once."""

import pathlib

import jax
import numpy as np
import pytest

import bioflax_eqx as bfx


SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/shakespeare"


def _text() -> str:
    # 200 characters: the training split (the first 180) never sees "z" or "é".
    rng = np.random.default_rng(0)
    body = "".join(rng.choice(list("abc d\n"), 180))
    return body + "zzéab cdzé" + "abcabcé zz"


def test_split_and_vocabulary(tmp_path):
    text = _text()
    (tmp_path / "shakespeare.txt").write_text(text, encoding="utf-8")
    corpus = bfx.load_text("shakespeare", tmp_path)
    assert (corpus.train.shape, corpus.val.shape, corpus.test.shape) == (
        (180,),
        (10,),
        (10,),
    )
    assert corpus.name == "shakespeare"
    assert corpus.characters == "".join(sorted(set(text[:180])))
    assert corpus.vocab_size == len(set(text[:180])) + 1
    for split in (corpus.train, corpus.val, corpus.test):
        assert split.dtype == np.int32
    # Contiguous: the splits decode to the text, in order, unseen characters as the
    # unknown symbol (id 0).
    decoded = "".join(corpus.decode(s) for s in (corpus.train, corpus.val, corpus.test))
    assert decoded == text.replace("z", "\ufffd").replace("é", "\ufffd")
    assert corpus.decode(corpus.train) == text[:180]
    np.testing.assert_array_equal(
        np.asarray(corpus.val) == 0, [c in "zé" for c in text[180:190]]
    )
    ids = corpus.encode("abz")
    assert ids.tolist() == [
        corpus.characters.index("a") + 1,
        corpus.characters.index("b") + 1,
        0,
    ]
    # Other fractions: floor(fraction * n) each for val and test.
    other = bfx.load_text("shakespeare", tmp_path, val_fraction=0.1, test_fraction=0.15)
    assert (other.train.size, other.val.size, other.test.size) == (150, 20, 30)


def test_a_folder_of_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("world!" * 20, encoding="utf-8")
    (tmp_path / "a.txt").write_text("hello " * 20, encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    corpus = bfx.load_text("text", tmp_path)
    text = "hello " * 20 + "world!" * 20
    n_val = n_test = int(0.05 * len(text))
    assert corpus.train.size == len(text) - n_val - n_test
    decoded = "".join(corpus.decode(s) for s in (corpus.train, corpus.val, corpus.test))
    assert decoded == text  # every character of val and test occurs in train
    assert corpus.characters == " !dehlorw"


def test_missing_data_and_bad_arguments(tmp_path):
    with pytest.raises(bfx.DataNotFoundError, match="shakespeare.txt") as info:
        bfx.load_text("shakespeare", tmp_path)
    assert info.value.folder == tmp_path
    with pytest.raises(bfx.DataNotFoundError, match=r"\*\.txt"):
        bfx.load_text("text", tmp_path)
    with pytest.raises(ValueError, match="needs `data_dir`"):
        bfx.load_text("text")
    with pytest.raises(ValueError, match="unknown text dataset"):
        bfx.load_text("mnist", tmp_path)
    (tmp_path / "a.txt").write_text("abc", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2"):
        bfx.load_text("text", tmp_path)
    with pytest.raises(ValueError, match="`val_fraction` must be in"):
        bfx.load_text("text", tmp_path, val_fraction=0.0)


def test_epoch_windows(getkey):
    n, context, batch = 103, 4, 5
    tokens = jax.numpy.arange(n, dtype=np.int32)  # id = position: windows read off
    windows = (n - context) // context  # 24
    size_before = bfx.epoch_windows._cache_size()  # pyright: ignore[reportAttributeAccessIssue]
    key = getkey()
    inputs, targets = bfx.epoch_windows(key, tokens, context, batch)
    steps = windows // batch
    assert inputs.shape == targets.shape == (steps, batch, context)
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    # Each window is context + 1 consecutive characters: targets are inputs + 1.
    np.testing.assert_array_equal(targets, inputs + 1)
    np.testing.assert_array_equal(np.diff(inputs, axis=-1), 1)
    starts = inputs[..., 0].ravel()
    assert starts.max() + context + 1 <= n
    # One offset, windows a context apart, none repeated: one pass over the text.
    offsets = np.unique(starts % context)
    assert offsets.size == 1 and 0 <= offsets[0] < context
    assert np.unique(starts).size == steps * batch
    # Seeded: the same key gives the same epoch, another key another order.
    again, _ = bfx.epoch_windows(key, jax.numpy.asarray(tokens), context, batch)
    np.testing.assert_array_equal(again, inputs)
    other, _ = bfx.epoch_windows(getkey(), tokens, context, batch)
    assert not np.array_equal(other, inputs)
    # Compiled once for every key.
    assert bfx.epoch_windows._cache_size() == size_before + 1  # pyright: ignore[reportAttributeAccessIssue]
    with pytest.raises(ValueError, match="fewer than `batch_size`"):
        bfx.epoch_windows(key, tokens, context, 25)


@pytest.mark.parametrize("n", [5, 101, 103])
def test_eval_windows_predict_every_character_once(n):
    context = 4
    tokens = jax.numpy.arange(n, dtype=np.int32)
    inputs, targets, counted = bfx.eval_windows(tokens, context)
    windows = -(-(n - 1) // context)
    assert inputs.shape == targets.shape == counted.shape == (windows, context)
    np.testing.assert_array_equal(targets, np.asarray(inputs) + 1)
    # The counted targets are tokens[1:], each exactly once.
    np.testing.assert_array_equal(
        np.sort(np.asarray(targets)[np.asarray(counted)]), np.arange(1, n)
    )
    assert int(np.asarray(targets).max()) == n - 1
    with pytest.raises(ValueError, match="shorter than one window"):
        bfx.eval_windows(tokens[:context], context)


@pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason="no shared Shakespeare corpus")
def test_shakespeare():
    corpus = bfx.load_text("shakespeare", SHAKESPEARE)
    # 84 distinct characters (its README), all in the training split, + unknown.
    assert corpus.vocab_size == 85
    n = corpus.train.size + corpus.val.size + corpus.test.size
    assert n == 5_057_282
    assert corpus.decode(corpus.train[:25]) == "ALL'S WELL THAT ENDS WELL"
