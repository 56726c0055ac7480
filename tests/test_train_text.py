"""The trainer on text: a tiny Transformer on a small generated corpus, by
`bfx.train` and the command line; bits per character against a reference, resume,
`sample`, and the configuration's checks. And one real learning check on
Shakespeare."""

import collections
import math
import pathlib
import random
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx
from bioflax_eqx.training import _checkpoint, _compiled
from bioflax_eqx.training._cli import main

from .helpers import Killed, read_lines, without_times


_SHAKESPEARE = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare"
)
# 1 block of width 16, windows of 17 characters, 16 per step.
TINY: dict[str, Any] = dict(
    model="transformer",
    dataset="text",
    width=16,
    depth=1,
    heads=2,
    context=16,
    batch_size=16,
    metrics_batch=8,
    lr=3e-3,
    epochs=1,
)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
    """Two files of random words (about 10 000 characters): 9 000 to train on."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["the", "king", "queen", "love", "night", "sword", "crown", "lord"]
    for name in ("a.txt", "b.txt"):
        text = " ".join(rng.choice(words) for _ in range(1000))
        (folder / name).write_text(text + "\n", encoding="utf-8")
    return folder


def tiny(corpus_dir, out, **changes) -> bfx.TrainConfig:
    fields = {**TINY, "data_dir": str(corpus_dir), "out": str(out), **changes}
    return bfx.TrainConfig(**fields)


def _reference_bpc(model, tokens: np.ndarray, context: int) -> float:
    """Bits per character of `tokens[1:]` from the model's logits, each character
    predicted once: by the window of `context` starting at the nearest multiple of
    `context` before it (the last window moved back to end at the text's end)."""
    n, total = tokens.shape[0], 0.0
    for start in range(0, n - 1, context):
        begin = min(start, n - context - 1)
        window = jnp.asarray(tokens[begin : begin + context])
        logits = np.asarray(model(window), np.float64)
        log_p = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
        for i in range(start + 1, min(start + context, n - 1) + 1):
            total -= log_p[i - 1 - begin, tokens[i]]
    return total / (n - 1) / math.log(2)


@pytest.mark.parametrize("rule", ["bp", "dfa"])
def test_training_writes_bits_per_character_equal_to_a_reference(
    rule, corpus_dir, tmp_path
):
    result = bfx.train(tiny(corpus_dir, tmp_path, rule=rule), quiet=True)
    final = result.summary["final"]
    corpus = bfx.load_text("text", corpus_dir)
    assert result.characters == corpus.characters == "\n cdeghiklnoqrstuvw"
    assert result.summary["characters"] == corpus.characters
    for split in ("val", "test"):
        tokens = np.asarray(getattr(corpus, split))
        reference = _reference_bpc(result.model, tokens, 16)
        assert final[f"{split}_bpc"] == pytest.approx(reference, rel=1e-5)
        assert final[f"{split}_bpc"] == pytest.approx(
            final[f"{split}_loss"] / math.log(2)
        )
    # Below the uniform guess over the 20 ids (4.32 bits) after one epoch.
    assert final["test_bpc"] < math.log2(corpus.vocab_size)
    angle = final["block_angle/0"]
    assert angle == pytest.approx(final["delta_angle/5"])
    assert (angle < 1e-3) if rule == "bp" else (angle > 1.0)
    for name in ("metrics.jsonl", "summary.json", "checkpoint.eqx"):
        assert (tmp_path / name).exists()


def test_resume_is_bit_identical(corpus_dir, tmp_path):
    config = dict(rule="dfa", dfa_placement="micro", epochs=2)
    whole = bfx.train(tiny(corpus_dir, tmp_path / "whole", **config), quiet=True)
    before = collections.Counter(_compiled.TRACE_COUNTS)

    def kill_after_epoch_1(record):
        if record["epoch"] == 1:
            raise Killed

    parts_config = tiny(corpus_dir, tmp_path / "parts", **config)
    with pytest.raises(Killed):
        bfx.train(parts_config, quiet=True, callback=kill_after_epoch_1)
    resumed = bfx.train(parts_config, resume=True, quiet=True)
    assert _compiled.TRACE_COUNTS == before  # the programs of the first run
    _, whole_payload = _checkpoint.read_header(tmp_path / "whole")
    _, parts_payload = _checkpoint.read_header(tmp_path / "parts")
    assert whole_payload == parts_payload
    assert without_times(whole.history) == without_times(resumed.history)
    assert len(read_lines(tmp_path / "parts" / "metrics.jsonl")) == 2
    loaded = bfx.load_run(tmp_path / "parts")
    assert loaded.characters == whole.characters
    assert loaded.model.dfa_placement == "micro"


def test_a_resume_on_another_corpus_is_refused(corpus_dir, tmp_path):
    bfx.train(tiny(corpus_dir, tmp_path / "run"), quiet=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.txt").write_text("xyz " * 3000, encoding="utf-8")
    config = tiny(other, tmp_path / "run", epochs=2)
    with pytest.raises(bfx.CheckpointError, match="another vocabulary"):
        bfx.train(config, resume=True, quiet=True)


def test_command_line_trains_and_samples(corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = {**TINY, "rule": "dfa", "dfa_placement": "micro", "epochs": 1}
    args = ["train", "--data-dir", str(corpus_dir), "--out", str(out), "--quiet"]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    assert main(args) == 0
    final = bfx.load_run(out).summary["final"]
    assert {"val_bpc", "test_bpc", "block_angle/0"} <= set(final)

    def sample(*extra: str) -> str:
        capsys.readouterr()
        command = ["sample", str(out), "--prompt", "the ", "--length", "40"]
        assert main([*command, *extra]) == 0
        return capsys.readouterr().out

    first = sample("--seed", "0")
    assert first.startswith("the ") and len(first) == 4 + 40 + 1  # and a newline
    assert sample("--seed", "0") == first
    assert sample("--seed", "1") != first
    assert sample("--seed", "0", "--temperature", "0.5") != first


def test_sample_is_reproducible_and_windowed(getkey):
    characters = "abc"
    model = bfx.Transformer(4, context=8, width=8, depth=1, heads=2, key=getkey())
    key = getkey()
    # Longer than the context: the later characters see the last 8 only.
    text = bfx.sample(model, characters, "ab", 30, key=key)
    assert len(text) == 32 and text.startswith("ab")
    assert set(text[2:]) <= set(characters) | {"\ufffd"}
    assert bfx.sample(model, characters, "ab", 30, key=key) == text
    assert bfx.sample(model, characters, "ab", 30, key=getkey()) != text
    # Windowed: the 20th character depends on the 8 before it only.
    prefix = bfx.sample(model, characters, "ab", 20, key=key)
    assert text.startswith(prefix)
    with pytest.raises(ValueError, match="vocabulary of 3"):
        bfx.sample(model, "ab", "ab", 3, key=key)
    with pytest.raises(ValueError, match="at least one character"):
        bfx.sample(model, characters, "", 3, key=key)
    with pytest.raises(ValueError, match="temperature"):
        bfx.sample(model, characters, "a", 3, key=key, temperature=0.0)


def test_sample_refuses_a_run_that_is_not_a_language_model(tmp_path, mnist_dir):
    from .helpers import small

    bfx.train(small(tmp_path, mnist_dir, epochs=1, rule="bp"), quiet=True)
    assert main(["sample", str(tmp_path)]) == 1


@pytest.mark.parametrize(
    "changes, field, message",
    [
        (dict(model="mlp"), "model", "needs model transformer"),
        (dict(dataset="mnist"), "dataset", "needs a text data set"),
        (dict(data_dir=None), "data_dir", "is needed for dataset text"),
        (dict(heads=3), "heads", "must divide width"),
        (dict(schedule="cosine", epochs=2), "schedule", "must be constant"),
        (dict(warmup_epochs=1, epochs=2), "schedule", "must be constant"),
        (dict(loss="squared_error"), "loss", "must be cross_entropy"),
        (dict(context=0), "context", "positive integer"),
        (dict(dfa_placement="nano"), "dfa_placement", "must be one of"),
    ],
)
def test_bad_text_configurations_are_refused(changes, field, message):
    fields = {**TINY, "data_dir": "somewhere", **changes}
    with pytest.raises(bfx.ConfigError, match=message) as info:
        bfx.TrainConfig(**fields)
    assert info.value.field == field


def test_a_corpus_too_small_for_the_batch_is_refused(corpus_dir, tmp_path):
    config = tiny(corpus_dir, tmp_path, batch_size=4096)
    with pytest.raises(bfx.ConfigError, match="windows of 17 characters"):
        bfx.train(config, quiet=True)
    assert not (tmp_path / "config.json").exists()


def test_defaults_are_each_models_own():
    assert (bfx.TrainConfig().width, bfx.TrainConfig().depth) == (256, 2)
    config = bfx.TrainConfig(model="transformer", dataset="shakespeare")
    assert (config.width, config.depth, config.context, config.heads) == (
        128,
        4,
        128,
        4,
    )
    assert config.loss == "cross_entropy" and config.dfa_placement == "macro"


@pytest.mark.skipif(
    not (_SHAKESPEARE / "shakespeare.txt").exists(), reason="no Shakespeare"
)
@pytest.mark.parametrize("rule", ["bp", "dfa"])
def test_a_small_transformer_learns_shakespeare(rule, tmp_path):
    # The first 300 000 characters, one epoch of 280 steps, about 15 s: below the
    # 4.75 bits of the corpus's unigram distribution (bp reaches 3.36, dfa 4.29).
    text = (_SHAKESPEARE / "shakespeare.txt").read_text(encoding="utf-8")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "slice.txt").write_text(text[:300_000], encoding="utf-8")
    config = tiny(
        tmp_path / "data",
        tmp_path / "run",
        rule=rule,
        width=32,
        heads=4,
        context=32,
        batch_size=32,
        metrics_batch=16,
    )
    result = bfx.train(config, quiet=True)
    assert result.summary["final"]["val_bpc"] < 4.5
    assert result.characters is not None
    key = jax.random.key(0)
    text = bfx.sample(result.model, result.characters, "ROMEO:", 50, key=key)
    assert text.startswith("ROMEO:") and len(text) == 56
