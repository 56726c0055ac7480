"""The trainer's losses, per example (`jax.vmap` them over a batch), and the
accuracy."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
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


def loss_for(config: TrainConfig) -> Callable[[Array, Array], Array]:
    """The per-example loss of the configuration's task."""
    return cross_entropy if config.classification else squared_error


def hits(outputs: Array, labels: Array) -> Float[Array, " batch"]:
    """1 where the largest output is the label's, else 0, per example."""
    return (jnp.argmax(outputs, axis=-1) == labels).astype(jnp.float32)
