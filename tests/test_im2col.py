"""The CPU path for convolutions: `bfx.Im2colConv` and `bfx.BlockMaxPool` against
Equinox's own layers (`lax.conv_general_dilated`, `lax.reduce_window`) and their
VJPs in float64; `bfx.im2col_layers` / `bfx.xla_layers`; and whole training epochs
on both paths, for every rule, giving the same parameters.

(Every rule's gradients around convolutions of random strides, paddings, dilations
and groups on this path are also checked in `tests/test_layers.py`.)"""

import collections
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bioflax_eqx as bfx

from .helpers import tree_allclose


BATCH = 3


def _conv_configs(n: int, seed: int) -> list[dict]:
    """Random convolutions: 1-3 spatial axes, every padding mode and form."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        nd = int(rng.integers(1, 4))
        groups = int(rng.integers(1, 3))
        kernel = [int(rng.integers(1, 4 if nd < 3 else 3)) for _ in range(nd)]
        dilation = [int(rng.integers(1, 3)) for _ in range(nd)]
        mode = ("ZEROS", "REFLECT", "REPLICATE", "CIRCULAR")[i % 4]
        padding = [
            (int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(nd)
        ]
        if mode != "ZEROS":  # reflection needs padding below the input's size
            padding = [(min(lo, 1), min(hi, 1)) for lo, hi in padding]
        reach = [d * (k - 1) for k, d in zip(kernel, dilation)]
        out.append(
            dict(
                num_spatial_dims=nd,
                in_channels=groups * int(rng.integers(1, 3)),
                out_channels=groups * int(rng.integers(1, 3)),
                kernel_size=kernel,
                stride=[int(rng.integers(1, 3)) for _ in range(nd)],
                padding="SAME" if i % 5 == 4 else padding,
                dilation=dilation,
                groups=groups,
                use_bias=bool(rng.integers(2)),
                padding_mode=mode,
                spatial=[r + 2 + int(rng.integers(0, 3)) for r in reach],
            )
        )
    return out


CONVS = _conv_configs(16, 0)


@pytest.mark.parametrize("cfg", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_im2col_conv_is_the_convolution_and_its_vjps(cfg, getkey):
    cfg = dict(cfg)
    spatial = cfg.pop("spatial")
    conv = eqx.nn.Conv(**cfg, dtype=jnp.float64, key=getkey())
    lowered = bfx.Im2colConv(conv)
    assert lowered.weight is conv.weight and lowered.bias is conv.bias
    x = jax.random.normal(getkey(), (BATCH, cfg["in_channels"], *spatial), jnp.float64)

    @eqx.filter_jit
    def vjps(layer, x, key):
        y, pullback = jax.vjp(lambda m, x: jax.vmap(m)(x), layer, x)
        return y, pullback(jax.random.normal(key, y.shape, y.dtype))

    key = getkey()
    y, (grad_conv, grad_x) = vjps(conv, x, key)
    y_lowered, (grad_lowered, grad_x_lowered) = vjps(lowered, x, key)
    np.testing.assert_allclose(y_lowered, y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(grad_x_lowered, grad_x, rtol=1e-10, atol=1e-10)
    assert tree_allclose(grad_lowered.conv, grad_conv)  # weight and bias


@functools.partial(jax.jit, static_argnums=0)
def _vjps(f, x, w, key):
    y, pullback = jax.vjp(jax.vmap(f, in_axes=(0, None)), x, w)
    return y, pullback(jax.random.normal(key, y.shape, y.dtype))


def _five_by_five(in_channels: int, out_channels: int, pad: int, size: int) -> dict:
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[5, 5],
        stride=[1, 1],
        padding=[(pad, pad)] * 2,
        dilation=[1, 1],
        spatial=[size, size],
    )


# The first 8 random convolutions (strides, paddings, dilations; 1-3 spatial
# axes) without their groups, and LeNet-5's two (where `block=None` picks 4).
BLOCK_CASES = [(i, {**cfg, "groups": 1}) for i, cfg in enumerate(CONVS[:8])] + [
    ("lenet1", _five_by_five(1, 6, 2, 28)),
    ("lenet2", _five_by_five(6, 16, 0, 12)),
]


@pytest.mark.parametrize(
    "cfg", [c for _, c in BLOCK_CASES], ids=[f"conv{i}" for i, _ in BLOCK_CASES]
)
def test_blocks_of_outputs_are_the_convolution_and_its_vjps(cfg, getkey):
    """`block` neighbouring outputs per row of the product (a banded kernel matrix)
    give the convolution, its input gradient and its kernel gradient, for every
    block that divides the output's last axis."""
    padding = cfg["padding"]
    if padding == "SAME":
        reach = [d * (k - 1) + 1 for k, d in zip(cfg["kernel_size"], cfg["dilation"])]
        padding = jax.lax.padtype_to_pads(cfg["spatial"], reach, cfg["stride"], "SAME")
    x = jax.random.normal(
        getkey(), (BATCH, cfg["in_channels"], *cfg["spatial"]), jnp.float64
    )
    w = jax.random.normal(
        getkey(),
        (cfg["out_channels"], cfg["in_channels"], *cfg["kernel_size"]),
        jnp.float64,
    )

    def reference(xi, w):
        return jax.lax.conv_general_dilated(
            xi[None], w, cfg["stride"], padding, rhs_dilation=cfg["dilation"]
        )[0]

    key = getkey()
    y, (grad_x, grad_w) = _vjps(reference, x, w, key)
    width = y.shape[-1]
    blocks = [b for b in range(2, width + 1) if width % b == 0][:2]
    assert blocks or width == 1, "a case without a block to test"
    for block in [None, *blocks]:

        def blocked(xi, w):
            return bfx.conv_im2col(
                xi,
                w,
                stride=cfg["stride"],
                padding=padding,
                dilation=cfg["dilation"],
                groups=1,
                block=block,
            )

        y_b, (grad_x_b, grad_w_b) = _vjps(blocked, x, w, key)
        np.testing.assert_allclose(y_b, y, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(grad_x_b, grad_x, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(grad_w_b, grad_w, rtol=1e-10, atol=1e-10)


def test_lenets_convolutions_are_computed_in_blocks_of_four(getkey):
    """By default: the product of LeNet-5's first convolution (6 channels, 5×5,
    28 wide) has 4 × 6 columns, one of 3×3 kernels (ResNet-20's) 16."""

    def product_columns(out_channels, kernel, width):
        x = jnp.zeros((1, width + kernel - 1, width + kernel - 1))
        w = jnp.zeros((out_channels, 1, kernel, kernel))
        f = functools.partial(
            bfx.conv_im2col,
            stride=(1, 1),
            padding=((0, 0), (0, 0)),
            dilation=(1, 1),
            groups=1,
        )
        jaxpr = jax.make_jaxpr(f)(x, w)
        (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
        return dot.outvars[0].aval.shape[-1]

    assert product_columns(6, 5, 28) == 24
    assert product_columns(16, 5, 8) == 64
    assert product_columns(16, 5, 6) == 48  # 3 divides 6, 4 does not
    assert product_columns(16, 3, 32) == 16
    assert product_columns(32, 5, 32) == 32
    with pytest.raises(ValueError, match="divisor of the output's last axis"):
        bfx.conv_im2col(
            jnp.zeros((1, 10, 10)),
            jnp.zeros((2, 1, 3, 3)),
            stride=(1, 1),
            padding=((0, 0), (0, 0)),
            dilation=(1, 1),
            groups=1,
            block=3,
        )


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_block_max_pool_is_the_max_pool_ties_included(nd, size):
    pool = (eqx.nn.MaxPool1d, eqx.nn.MaxPool2d, eqx.nn.MaxPool3d)[nd - 1](size, size)
    assert bfx.BlockMaxPool.fits(pool)
    rng = np.random.default_rng(nd * 10 + size)
    # Small integers: many windows hold their maximum twice; spatial sizes that are
    # not multiples of the window leave a remainder that the pool drops.
    spatial = [int(rng.integers(size, 3 * size + 2)) for _ in range(nd)]
    x = jnp.asarray(rng.integers(0, 3, (BATCH, 2, *spatial)), jnp.float64)
    y, pullback = jax.vjp(jax.vmap(pool), x)
    y_block, pullback_block = jax.vjp(jax.vmap(bfx.BlockMaxPool(pool)), x)
    c = jnp.asarray(rng.standard_normal(y.shape))
    np.testing.assert_array_equal(y_block, y)
    # The gradient goes to the same element of each window (the first maximum).
    np.testing.assert_array_equal(pullback_block(c)[0], pullback(c)[0])


def test_overlapping_or_padded_pools_stay_as_they_are():
    for pool in (
        eqx.nn.MaxPool2d(3, 2),
        eqx.nn.MaxPool2d(2, 2, padding=1),
        eqx.nn.MaxPool2d(2, 2, use_ceil=True),
        eqx.nn.AvgPool2d(2, 2),
    ):
        assert not bfx.BlockMaxPool.fits(pool)
        assert bfx.im2col_layers(pool) == pool
    with pytest.raises(ValueError, match="stride equals its kernel size"):
        bfx.BlockMaxPool(eqx.nn.MaxPool2d(3, 2))  # pyright: ignore[reportArgumentType]


def _net(key, dtype=jnp.float64) -> eqx.nn.Sequential:
    """conv 3×5 (padding 1, 2), tanh, 2×2 max pool, conv 3×3, tanh, a 3×3 pool with
    stride 2 (overlapping: stays as it is), flatten, dense."""
    k1, k2, k3 = jax.random.split(key, 3)
    return eqx.nn.Sequential(
        [
            # 5 wide: computed in blocks of 2 outputs (`bfx.conv_im2col`).
            eqx.nn.Conv2d(1, 3, (3, 5), padding=(1, 2), dtype=dtype, key=k1),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Conv2d(3, 4, 3, dtype=dtype, key=k2),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.MaxPool2d(3, 2),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(4, 5, dtype=dtype, key=k3),
        ]
    )


def test_lowering_swaps_layers_inside_wrappers_and_undoes_exactly(getkey):
    model = bfx.convert(
        _net(getkey()), "fa", key=getkey(), error_features=5, input_shape=(1, 10, 10)
    )
    lowered = bfx.im2col_layers(model)
    kinds = [type(layer).__name__ for layer in lowered.layers]
    assert kinds[2] == "BlockMaxPool" and kinds[5] == "MaxPool2d"
    assert isinstance(lowered.layers[0].layer, bfx.Im2colConv)
    assert isinstance(lowered.layers[3].layer, bfx.Im2colConv)
    # The same arrays in the same order: gradients map back leaf for leaf.
    leaves = jax.tree_util.tree_leaves(model)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(lowered), leaves))
    assert bfx.im2col_layers(lowered) == lowered  # lowering twice changes nothing
    assert bfx.xla_layers(lowered) == model
    assert bfx.xla_layers(model) == model


def test_the_path_is_chosen_by_backend_and_model(getkey):
    conv_net, mlp = _net(getkey()), bfx.MLP(4, 2, 8, 1, rule="fa", key=getkey())
    assert bfx.choose_conv_path(conv_net, "cpu") == "im2col"
    assert bfx.choose_conv_path(bfx.convert(conv_net, "kp", key=getkey()), "cpu") == (
        "im2col"
    )
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert bfx.choose_conv_path(conv_net, backend) == "xla"
    assert bfx.choose_conv_path(mlp, "cpu") == "xla"
    assert bfx.choose_conv_path(conv_net) == "im2col"  # these tests run on CPU


def test_a_conv_wrapper_names_a_wrong_input_in_its_terms(getkey):
    conv = eqx.nn.Conv2d(3, 4, 3, key=getkey())
    for layer, name in ((bfx.FA(conv, key=getkey()), "FA"), (conv, "Conv2d")):
        lowered = bfx.im2col_layers(layer)
        with pytest.raises(
            ValueError, match=rf"{name} expects .*\(3, \.\.\., \.\.\.\)"
        ):
            lowered(jnp.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="batch with `jax.vmap`"):
        bfx.FA(conv, key=getkey())(jnp.ones((5, 3, 8, 8)))


RULE_CASES = ["bp", "fa", "kp", "wm", "dfa", "usf", "brsf", "frsf"]


@pytest.mark.parametrize("rule", RULE_CASES)
def test_an_epoch_is_the_same_on_both_paths(rule, getkey):
    model = bfx.convert(
        _net(getkey()), rule, key=getkey(), error_features=5, input_shape=(1, 10, 10)
    )
    optimizer = optax.sgd(0.1)
    if rule == "wm":
        # The mirror moves WM's feedback inside the epoch: it is trained, with a
        # zero update from the optimiser.
        params, static = eqx.partition(model, eqx.is_inexact_array)
        optimizer = bfx.freeze_feedback(optimizer)
    else:
        params, static = eqx.partition(model, bfx.trainable(model))
    x = jax.random.normal(getkey(), (12, 1, 10, 10), jnp.float64)
    y = jax.random.randint(getkey(), (12,), 0, 5)
    traces = collections.Counter()

    def loss_fn(model, xb, yb, key):
        traces[kind_of(model)] += 1
        logits = jax.vmap(lambda xi: model(xi, key=key))(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), None

    def kind_of(model):
        return type(model.layers[0].layer if rule != "bp" else model.layers[0])

    def mirror(model, key):
        return bfx.mirror(model, key, lr=0.1, batch_size=4)

    after_step = mirror if rule == "wm" else None

    def epoch(path):
        return bfx.train_epoch(
            params,
            static,
            optimizer.init(params),
            x,
            y,
            jax.random.key(3),
            optimizer=optimizer,
            loss_fn=loss_fn,
            batch_size=4,
            after_step=after_step,
            conv_path=path,
        )

    xla, im2col, auto = epoch("xla"), epoch("im2col"), epoch("auto")
    assert tree_allclose(im2col, xla, rtol=1e-9, atol=1e-12)
    assert tree_allclose(auto, im2col, rtol=0, atol=0)  # CPU: auto is im2col
    assert not tree_allclose(im2col[0], params)  # it trained
    assert traces[bfx.Im2colConv] == 2 and traces[eqx.nn.Conv2d] == 1
    epoch("auto")  # compiled once: no new trace
    assert traces[bfx.Im2colConv] == 2


def test_the_trainer_takes_the_path_from_its_config(tmp_path, mnist_dir):
    config = bfx.TrainConfig(
        rule="fa",
        model="lenet",
        data_dir=str(mnist_dir),
        limit=600,
        val_size=100,
        batch_size=50,
        epochs=1,
        metrics_batch=50,
        conv_path="xla",
    )
    xla = bfx.train(config, quiet=True)
    im2col = bfx.train(
        bfx.TrainConfig(**{**vars(config), "conv_path": "im2col"}), quiet=True
    )
    assert im2col.model.layers[0].layer.__class__ is eqx.nn.Conv2d  # not lowered
    assert tree_allclose(
        eqx.filter(im2col.model, eqx.is_array),
        eqx.filter(xla.model, eqx.is_array),
        rtol=1e-4,
        atol=1e-5,
    )
    for a, b in zip(im2col.history, xla.history):
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.01)
    with pytest.raises(bfx.ConfigError, match="conv_path"):
        bfx.TrainConfig(conv_path="fast")
