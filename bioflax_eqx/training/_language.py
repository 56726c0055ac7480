"""What a language model's run does differently: its corpus (read, and checked
against the configuration), its epochs of random windows, and its evaluation in
bits per character over whole splits, with the alignment of each block."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, PRNGKeyArray

from .._metrics import alignment_metrics
from ..data import TextCorpus, eval_windows, load_text
from ._compiled import TRACE_COUNTS, Setup, map_examples
from ._config import ConfigError, TrainConfig
from ._losses import cross_entropy, hits, token_cross_entropy
from ._mesh import replicated


LN2 = math.log(2.0)
# Linear maps per Transformer block, in pytree order: the attention's query, key,
# value and output projections, then the MLP's up and down projections.
_LINEAR_PER_BLOCK = 6


def load_corpus(config: TrainConfig) -> TextCorpus:
    """The configuration's corpus ([`bioflax_eqx.load_text`][]), checked to hold a
    batch of training windows and a window in each of the other splits."""
    corpus = load_text(config.dataset, config.data_dir)
    context = config.context
    windows = (corpus.train.shape[0] - context) // context
    if windows < config.batch_size:
        raise ConfigError(
            "batch_size",
            f"must be at most the {windows} windows of {context + 1} characters "
            f"that the training text holds, got {config.batch_size}.",
        )
    shortest = min(corpus.val.shape[0], corpus.test.shape[0])
    if shortest < context + 1:
        raise ConfigError(
            "context",
            f"must be less than the {shortest} characters of the validation and "
            f"test splits, got {context}.",
        )
    return corpus


def text_evaluation_data(
    config: TrainConfig, corpus: TextCorpus, key: PRNGKeyArray, mesh: Mesh | None
) -> tuple[list[str], list[tuple[Array, ...]], tuple[Array, Array], PRNGKeyArray]:
    """As `_evaluation_data` for images: the names and windows
    ([`bioflax_eqx.eval_windows`][]) of the validation and test splits, the
    alignment metrics' fixed batch (the first windows of the validation split)
    and their key, on the devices."""
    splits = {
        "val": eval_windows(corpus.val, config.context),
        "test": eval_windows(corpus.test, config.context),
    }
    arrays = [replicated(windows, mesh) for windows in splits.values()]
    inputs, targets, _ = splits["val"]
    fixed = (inputs[: config.metrics_batch], targets[: config.metrics_batch])
    fixed, key = replicated((fixed, key), mesh)
    return list(splits), arrays, fixed, key


@eqx.filter_jit
def evaluate_text(params, state, splits, fixed_x, fixed_y, key, static, setup: Setup):
    """The mean cross-entropy (nats) and accuracy of the next character over every
    character of each split that its windows count once, and the alignment metrics
    on the fixed batch of windows; as `evaluate` for images (`state` is `None`)."""
    TRACE_COUNTS["evaluate"] += 1
    del state  # the Transformer has none
    model = eqx.combine(params, static)
    results = []
    for windows in splits:

        def one(window):
            x, targets, counted = window
            logits = model(x, key=key)
            weight = counted.astype(logits.dtype)
            ce = jax.vmap(cross_entropy)(logits, targets)
            correct = hits(logits, targets).astype(logits.dtype)
            return jnp.stack([ce @ weight, correct @ weight, jnp.sum(weight)])

        sums = jnp.sum(map_examples(one, windows, setup.mesh), axis=0)
        results.append((sums[0] / sums[2], sums[1] / sums[2]))
    alignment = alignment_metrics(model, fixed_x, fixed_y, token_cross_entropy, key=key)
    return results, alignment


def text_record(record: dict[str, Any], depth: int) -> dict[str, Any]:
    """What an epoch's record adds for text: bits per character (the losses in
    base 2) and, per block `b`, `block_angle/b`, the angle between the rule's
    error at the block's output and backprop's: the error at its MLP's down
    projection, which the residual add passes on unchanged (where macro DFA's
    point injects `B e`)."""
    added: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        loss = record.get(f"{split}_loss")
        added[f"{split}_bpc"] = None if loss is None else loss / LN2
    for b in range(depth):
        index = _LINEAR_PER_BLOCK * b + _LINEAR_PER_BLOCK - 1
        added[f"block_angle/{b}"] = record.get(f"delta_angle/{index}")
    return added
