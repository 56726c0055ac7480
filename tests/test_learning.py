"""Every rule really learns a real task: a short run on a slice of MNIST."""

import math

import jax
import pytest

import bioflax_eqx as bfx


@pytest.mark.parametrize("rule", bfx.RULES)
def test_every_rule_learns_mnist(rule, mnist_dir):
    config = bfx.TrainConfig(
        rule=rule,
        dataset="mnist",
        data_dir=str(mnist_dir),
        limit=3000,
        val_size=500,
        width=64,
        lr=3e-3,
        depth=2,
        batch_size=50,
        epochs=3,
        metrics_batch=100,
    )
    # optax's Adam mixes a float with an int32 step count.
    with jax.numpy_dtype_promotion("standard"):
        result = bfx.train(config, quiet=True)
    losses = [epoch["train_loss"] for epoch in result.history]
    assert losses[-1] < losses[0] < math.log(10)  # below chance, and still falling
    final = result.history[-1]
    assert final["test_loss"] < 0.6 * math.log(10)
    assert final["test_acc"] > 0.8, final["test_acc"]
