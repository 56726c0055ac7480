"""The trainer's losses, per example (`jax.vmap` them over a batch), and the
accuracy."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from ._config import TrainConfig


def cross_entropy(
    logits: Float[Array, " classes"], label: Int[Array, ""]
) -> Float[Array, ""]:
    """The softmax cross-entropy of one example: the trainer's classification loss.

    **Arguments:**

    - `logits`: the model's outputs, one per class.
    - `label`: the index of the true class.

    **Returns:**

    `logsumexp(logits) - logits[label]`, a scalar.
    """
    return jax.nn.logsumexp(logits) - logits[label]


def sigmoid_cross_entropy(
    logits: Float[Array, " classes"], label: Int[Array, ""]
) -> Float[Array, ""]:
    """The sigmoid binary cross-entropy of every output unit against the one-hot
    label, summed over the units: Akrout et al. (2019)'s loss, whose output error
    is `sigmoid(logits) - onehot(label)` (no softmax).

    **Arguments:**

    - `logits`: the model's outputs (before the sigmoid), one per class.
    - `label`: the index of the true class.

    **Returns:**

    The sum over the units of their binary cross-entropies, a scalar.
    """
    target = jax.nn.one_hot(label, logits.shape[-1], dtype=logits.dtype)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, target))


def squared_error(
    output: Float[Array, " outputs"], target: Float[Array, " outputs"]
) -> Float[Array, ""]:
    """The mean squared error of one example: the trainer's regression loss.

    **Arguments:**

    - `output`: the model's outputs.
    - `target`: the targets, of the same shape.

    **Returns:**

    The mean over the outputs of `(output - target)²`, a scalar.
    """
    return jnp.mean(jnp.square(output - target))


def token_cross_entropy(
    logits: Float[Array, "seq classes"], targets: Int[Array, " seq"]
) -> Float[Array, ""]:
    """The mean over a sequence's positions of each next token's softmax
    cross-entropy (in nats): the trainer's loss for a language model."""
    return jnp.mean(jax.vmap(cross_entropy)(logits, targets))


LOSS_FUNCTIONS: dict[str, Callable[[Array, Array], Array]] = {
    "cross_entropy": cross_entropy,
    "sigmoid_cross_entropy": sigmoid_cross_entropy,
    "squared_error": squared_error,
}


def loss_for(config: TrainConfig) -> Callable[[Array, Array], Array]:
    """The configuration's per-example loss (per sequence, for text)."""
    if config.text:
        return token_cross_entropy
    return LOSS_FUNCTIONS[config.loss]


def hits(outputs: Array, labels: Array) -> Float[Array, " *batch"]:
    """1 where the largest output is the label's, else 0, per example (and
    position, for text)."""
    return (jnp.argmax(outputs, axis=-1) == labels).astype(jnp.float32)
