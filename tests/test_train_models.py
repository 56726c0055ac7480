"""The trainer's conv nets (biotorch's LeNet, ResNet-20, VGG), a model of one's own
with batch norm, and CIFAR-10 with augmentation done inside the step."""

import collections
import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bioflax_eqx as bfx
from bioflax_eqx import models
from bioflax_eqx.data import IMAGE_SHAPES
from bioflax_eqx.training import _checkpoint, _compiled

from .helpers import (
    SMALL,
    Killed,
    build,
    build_with_state,
    small,
    tree_allclose,
    without_times,
)


# ------------------------------------------------------------------ the conv nets


def _params(tree) -> int:
    return sum(
        x.size for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    )


def _plain(model):
    return bfx.convert(model, "bp")


def _conv(model: str, rule: str, dataset: str = "mnist", **changes) -> bfx.TrainConfig:
    fields = {**SMALL, "model": model, "rule": rule, "dataset": dataset, **changes}
    return bfx.TrainConfig(**fields)


def test_lenet_is_biotorchs():
    model, state = build_with_state(_conv("lenet", "bp"))
    assert state is None and isinstance(model, eqx.nn.Sequential)
    convs = [x for x in model.layers if isinstance(x, eqx.nn.Conv2d)]
    denses = [x for x in model.layers if isinstance(x, eqx.nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 6, (5, 5)),
        (6, 16, (5, 5)),
    ]
    assert convs[0].padding == ((2, 2), (2, 2))  # 28×28 images
    assert [(d.in_features, d.out_features) for d in denses] == [
        (400, 120),
        (120, 84),
        (84, 10),
    ]
    assert _params(model) == 61_706
    # CIFAR-10: biotorch's wider CIFAR LeNet, no padding, 5×5 features.
    cifar = models.lenet((3, 32, 32), 10, jax.nn.relu, key=jax.random.key(0))
    convs = [x for x in cifar.layers if isinstance(x, eqx.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 64)]
    assert convs[0].padding == ((0, 0), (0, 0))
    denses = [x for x in cifar.layers if isinstance(x, eqx.nn.Linear)]
    assert [(d.in_features, d.out_features) for d in denses] == [
        (64 * 5 * 5, 128),
        (128, 84),
        (84, 10),
    ]


def test_resnet20_has_he_et_als_size_and_one_dfa_point_per_block():
    config = _conv("resnet20", "bp")
    model, state = build_with_state(config)
    assert isinstance(state, eqx.nn.State)
    # The paper's 0.27M parameters (option A shortcuts, no conv biases).
    weights = eqx.filter(model, eqx.is_inexact_array)
    assert _params(weights) == 269_722 - 2 * 16 * 3 * 3  # one input channel, not 3
    blocks = [x for x in model.layers if isinstance(x, models.ResidualBlock)]
    assert len(blocks) == 9
    assert len(bfx.convert(model, "fa", key=jax.random.key(0)).layers) == 14
    dfa, state = build_with_state(_conv("resnet20", "dfa"))
    assert isinstance(dfa, bfx.Sequential)
    points = [x for x in dfa.layers if isinstance(x, bfx.DFA)]
    # The stem conv, every block, the output layer: one feedback point each.
    assert len(points) == 11
    assert sum(isinstance(p.layer, models.ResidualBlock) for p in points) == 9
    # Batch norms stay on backprop, outside any wrapper.
    assert isinstance(dfa.layers[1], eqx.nn.BatchNorm)

    # A batch through the DFA net, in training and in inference mode.
    x = jnp.ones((3, 1, 28, 28), jnp.float32)

    def forward(model, state):
        return jax.vmap(
            lambda xi, s: model(xi, s),
            axis_name=models.BATCH_AXIS,
            in_axes=(0, None),
            out_axes=(0, None),
        )(x, state)

    # Op by op: compiling ResNet-20 takes longer than running it on three images.
    with jax.numpy_dtype_promotion("standard"):
        y, new_state = forward(dfa, state)
        y_eval, _ = forward(eqx.nn.inference_mode(dfa), new_state)
    assert y.shape == y_eval.shape == (3, 10)
    assert not eqx.tree_equal(state, new_state)  # the running statistics moved


def test_resnet20_counts_cifar_parameters():
    model = models.resnet20((3, 32, 32), 10, jax.nn.relu, key=jax.random.key(0))
    model, _ = eqx.nn.make_with_state(lambda: model)()
    assert _params(eqx.filter(model, eqx.is_inexact_array)) == 269_722


def test_a_residual_block_hands_its_key_to_both_convolutions():
    # brSF draws its feedback magnitudes on every call, from the call's key: a block
    # that dropped its key could not train with it (ResNet-20 failed so).
    block = models.ResidualBlock(2, 4, 2, jax.nn.relu, key=jax.random.key(0))
    block, state = eqx.nn.make_with_state(lambda: block)()
    brsf = bfx.convert(block, "brsf", key=jax.random.key(1))
    assert isinstance(brsf.conv1, bfx.BRSF) and isinstance(brsf.conv2, bfx.BRSF)
    x = jax.random.normal(jax.random.key(2), (3, 2, 6, 6), jnp.float32)

    def input_grad(key):
        def loss(x):
            y, _ = jax.vmap(
                lambda xi, s: brsf(xi, s, key=key),
                axis_name=models.BATCH_AXIS,
                in_axes=(0, None),
                out_axes=(0, None),
            )(x, state)
            return jnp.sum(y**2)

        return jax.grad(loss)(x)

    with jax.numpy_dtype_promotion("standard"):
        first = input_grad(jax.random.key(3))
        again = input_grad(jax.random.key(3))
        other = input_grad(jax.random.key(4))
        with pytest.raises(ValueError, match="pass `key=`"):
            input_grad(None)
    assert eqx.tree_equal(first, again) and not tree_allclose(first, other)


@pytest.mark.parametrize("model", ["lenet", "vgg", "resnet20"])
def test_every_rule_of_a_conv_net_starts_from_the_same_weights(model):
    plain = _plain(build(_conv(model, "bp")))
    for rule in ("fa", "usf", "dfa"):
        converted = build(_conv(model, rule))
        # Leaves in the same order (DFA's container is a bfx.Sequential).
        leaves = jax.tree_util.tree_leaves(eqx.filter(_plain(converted), eqx.is_array))
        assert eqx.tree_equal(
            leaves, jax.tree_util.tree_leaves(eqx.filter(plain, eqx.is_array))
        ), (model, rule)


def test_lenet_trains_resumes_bit_identically_and_mirrors(tmp_path, mnist_dir):
    # WM: the mirror runs inside the epoch's scan for conv layers too.
    config = small(tmp_path / "whole", mnist_dir, model="lenet", rule="wm", epochs=2)
    whole = bfx.train(config, quiet=True)
    parts = dataclasses.replace(config, out=str(tmp_path / "parts"), epochs=1)
    bfx.train(parts, quiet=True)
    resumed = bfx.train(dataclasses.replace(parts, epochs=2), resume=True, quiet=True)
    assert (
        _checkpoint.read_header(tmp_path / "whole")[1]
        == _checkpoint.read_header(tmp_path / "parts")[1]
    )
    assert without_times(whole.history) == without_times(resumed.history)
    initial = build(config)
    before = [x for x in initial.layers if isinstance(x, bfx.WM)]
    after = [x for x in whole.model.layers if isinstance(x, bfx.WM)]
    assert len(after) == 5
    for a, b in zip(before, after):
        assert not tree_allclose(a.feedback, b.feedback)  # the mirror moved B
    assert set(whole.history[-1]) >= {f"weight_angle/{i}" for i in range(5)}
    # Alignment improves: the mirror pulls B towards W.
    first = bfx.weight_alignment(initial)
    final = whole.history[-1]
    assert final["weight_angle/0"] < float(first["weight_angle/0"])


# --------------------------------------------------------- a model of one's own


def _own_net(key, rule: str):
    """A small conv net with batch norm (over the trainer's axis "batch")."""
    k1, k2, k3 = jax.random.split(key, 3)
    net = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(1, 4, 3, stride=2, dtype=jnp.float32, key=k1),
            eqx.nn.BatchNorm(4, axis_name="batch", mode="batch", dtype=jnp.float32),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(4 * 13 * 13, 10, dtype=jnp.float32, key=k2),
        ]
    )
    return bfx.convert(net, rule, key=k3, error_features=10, input_shape=(1, 28, 28))


def test_a_model_of_ones_own_with_batch_norm_trains_and_resumes(tmp_path, mnist_dir):
    net = _own_net(jax.random.key(1), "fa")
    config = small(tmp_path / "whole", mnist_dir, model="custom", epochs=3)
    before = collections.Counter(_compiled.TRACE_COUNTS)
    whole = bfx.train(config, model=net, quiet=True)
    traced = _compiled.TRACE_COUNTS - before
    assert all(count == 1 for count in traced.values())
    assert isinstance(whole.state, eqx.nn.State)
    # Trained, feedback untouched, running statistics updated.
    assert not tree_allclose(whole.model.layers[0].weight, net.layers[0].weight)
    np.testing.assert_array_equal(
        whole.model.layers[4].feedback, net.layers[4].feedback
    )
    assert 0.3 < whole.history[-1]["test_acc"] <= 1.0
    assert set(whole.history[-1]) >= {"grad_angle/0", "grad_angle/1", "delta_angle/0"}

    def kill_after_epoch_1(record):
        if record["epoch"] == 1:
            raise Killed

    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    with pytest.raises(Killed):
        bfx.train(parts, model=net, quiet=True, callback=kill_after_epoch_1)
    resumed = bfx.train(parts, model=net, resume=True, quiet=True)
    assert _compiled.TRACE_COUNTS - before == traced  # no recompilation
    # Parameters, batch-norm state, optimiser state and RNG: the same bytes.
    assert (
        _checkpoint.read_header(tmp_path / "whole")[1]
        == _checkpoint.read_header(tmp_path / "parts")[1]
    )
    assert eqx.tree_equal(whole.state, resumed.state)
    assert without_times(whole.history) == without_times(resumed.history)
    loaded = bfx.load_run(tmp_path / "parts", model=net)
    assert eqx.tree_equal(loaded.model, resumed.model)
    assert eqx.tree_equal(loaded.state, resumed.state)


def test_a_model_of_ones_own_must_match_the_rule(tmp_path, mnist_dir):
    net = _own_net(jax.random.key(1), "kp")
    config = small(tmp_path / "run", mnist_dir, model="custom", epochs=1)
    with pytest.raises(bfx.ConfigError, match="`rule` is 'fa', but .* with 'kp'"):
        bfx.train(config, model=net, quiet=True)
    with pytest.raises(bfx.ConfigError, match="`model` 'custom' trains a model"):
        bfx.train(config, quiet=True)
    with pytest.raises(bfx.ConfigError, match="`model` must be 'custom'"):
        bfx.train(dataclasses.replace(config, model="mlp"), model=net, quiet=True)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ CIFAR-10


@pytest.fixture
def cifar_dir(tmp_path):
    from .test_cifar import FOLDER, _write_folder

    _write_folder(tmp_path / "cifar" / FOLDER)
    return tmp_path / "cifar"


def _cifar(tmp_path, cifar_dir, **changes) -> bfx.TrainConfig:
    # 17 training images (3 held out), 6 test images.
    fields = dict(
        model="lenet",
        dataset="cifar10",
        data_dir=str(cifar_dir),
        val_size=3,
        batch_size=7,
        metrics_batch=3,
        epochs=1,
        out=str(tmp_path),
    )
    return bfx.TrainConfig(**{**fields, **changes})


def test_cifar10_trains_with_seeded_augmentation(tmp_path, cifar_dir):
    runs = {
        name: bfx.train(_cifar(tmp_path / name, cifar_dir, **changes), quiet=True)
        for name, changes in [
            ("a", {}),
            ("b", {}),
            ("plain", dict(augment="none")),
        ]
    }
    assert without_times(runs["a"].history) == without_times(runs["b"].history)
    assert eqx.tree_equal(runs["a"].model, runs["b"].model)  # a pure function
    assert not eqx.tree_equal(runs["a"].model, runs["plain"].model)
    assert runs["a"].history[-1]["test_acc"] is not None


# CIFAR-10's default (4 pixels of padding, flips) and MNIST's 2-pixel shifts.
AUGMENT_CASES = [("cifar10", "shift-flip", 4), ("mnist", "shift", 2)]
AUGMENT_CASES += [("mnist", "shift-flip", 2)]


@pytest.mark.parametrize("dataset, augment, pad", AUGMENT_CASES)
def test_the_step_augments_exactly_as_augment_images(
    tmp_path, cifar_dir, mnist_dir, dataset, augment, pad
):
    if dataset == "cifar10":
        config = _cifar(tmp_path, cifar_dir, rule="bp", augment=augment)
    else:
        config = bfx.TrainConfig(
            model="lenet",
            rule="bp",
            data_dir=str(mnist_dir),
            augment=augment,
            limit=50,
            val_size=10,
            batch_size=8,
            epochs=1,
            out=str(tmp_path),
        )
    assert config.augment_pad == pad
    shape = IMAGE_SHAPES[dataset]
    model, state = build_with_state(config)
    setup = _compiled.make_setup(config, model, state)
    x = jax.random.uniform(jax.random.key(3), (4, math.prod(shape)), jnp.float32)
    y = jnp.arange(4, dtype=jnp.int32)
    key = jax.random.key(4)
    with jax.numpy_dtype_promotion("standard"):
        loss, _ = _compiled.step_loss(setup)(model, None, x, y, key)
        augment_key, model_key = jax.random.split(key)
        flip = augment == "shift-flip"
        images = bfx.augment_images(augment_key, x, shape, pad=pad, flip=flip)
        assert not tree_allclose(images, x)
        logits = jax.vmap(lambda xi: model(xi.reshape(shape), key=model_key))(images)
        expected = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(4), y])
        plain = dataclasses.replace(config, augment="none")
        plain_setup = _compiled.make_setup(plain, model, state)
        unaugmented, _ = _compiled.step_loss(plain_setup)(model, None, x, y, key)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert not np.isclose(loss, unaugmented)
