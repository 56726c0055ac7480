"""Every rule around every kind of linear Equinox layer (dense, 1-3d convolutions,
transposed convolutions; random shapes, strides, paddings, dilations and groups),
against references written from the equations with `jax.lax.conv_general_dilated`,
for batches under `jax.vmap` and `eqx.filter_jit`, in float64.

For a layer `y = op(W, x) + b` and the cotangent `g = ∂L/∂y`, every rule keeps
backprop's `∂L/∂W = vjp_W op(·, x)(g)` and `∂L/∂b = Σ g`, and sends
`vjp_x op(B, ·)(g)` to the input; Kolen-Pollack's `B` also receives `∂L/∂W`.
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import bioflax_eqx as bfx


BATCH = 3
FEEDBACK_SCALE = 0.7
RULES = ("fa", "kp", "usf", "brsf", "frsf")
WRAPPERS = {"fa": bfx.FA, "kp": bfx.KP, "usf": bfx.USF, "brsf": bfx.BRSF}
WRAPPERS["frsf"] = bfx.FRSF
KINDS = ("linear", "conv1d", "conv2d", "conv3d", "convtranspose2d")


def _configs(kind: str, n: int, seed: int) -> list[dict]:
    """`n` random small layer configurations of one kind, from a seeded RNG."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if kind == "linear":
            out.append(
                dict(
                    in_features=int(rng.integers(1, 6)),
                    out_features=int(rng.integers(1, 6)),
                    use_bias=bool(rng.integers(2)),
                )
            )
            continue
        nd = 3 if kind == "conv3d" else 1 if kind == "conv1d" else 2
        groups = int(rng.integers(1, 3))
        max_kernel = 2 if nd == 3 else 3
        kernel = [int(rng.integers(1, max_kernel + 1)) for _ in range(nd)]
        stride = [int(rng.integers(1, 3)) for _ in range(nd)]
        dilation = [int(rng.integers(1, 3)) for _ in range(nd)]
        reach = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if kind == "convtranspose2d":
            # Padding within the kernel's reach keeps the transposed padding >= 0
            # and the output non-empty.
            lower = [int(rng.integers(0, r + 1)) for r in reach]
            padding = [
                (p, int(rng.integers(0, r - p + 1))) for p, r in zip(lower, reach)
            ]
            output_padding = [int(rng.integers(0, s)) for s in stride]
            spatial = [int(rng.integers(1, 5)) for _ in range(nd)]
        else:
            padding = [
                (int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(nd)
            ]
            output_padding = None
            spatial = [r + 1 + int(rng.integers(0, 4)) for r in reach]
        out.append(
            dict(
                num_spatial_dims=nd,
                in_channels=groups * int(rng.integers(1, 3)),
                out_channels=groups * int(rng.integers(1, 3)),
                kernel_size=tuple(kernel),
                stride=tuple(stride),
                padding=tuple(padding),
                output_padding=output_padding,
                dilation=tuple(dilation),
                groups=groups,
                use_bias=bool(rng.integers(2)),
                spatial=tuple(spatial),
            )
        )
    return out


CASES = [
    (kind, i, cfg)
    for seed, kind in enumerate(KINDS)
    for i, cfg in enumerate(_configs(kind, 3, seed))
]
# A 'SAME'-padded convolution too (the string goes to lax as it is).
CASES.append(
    (
        "conv2d",
        3,
        dict(
            num_spatial_dims=2,
            in_channels=2,
            out_channels=4,
            kernel_size=(3, 2),
            stride=(2, 1),
            padding="SAME",
            output_padding=None,
            dilation=(1, 2),
            groups=2,
            use_bias=True,
            spatial=(5, 6),
        ),
    )
)
CASE_IDS = [f"{kind}-{i}" for kind, i, _ in CASES]
# Each convolution also computed by slices and one `dot` (`bfx.im2col_layers`, the
# trainer's path on CPU): the same gradients.
PATH_CASES = [
    (kind, i, cfg, path)
    for kind, i, cfg in CASES
    for path in (
        ("xla", "im2col")
        if kind.startswith("conv") and "transpose" not in kind
        else ("xla",)
    )
]
PATH_IDS = [f"{kind}-{i}-{path}" for kind, i, _, path in PATH_CASES]
LOWER = {"xla": lambda model: model, "im2col": bfx.im2col_layers}


def _make_layer(kind: str, cfg: dict, key) -> tuple[Any, tuple[int, ...]]:
    """The Equinox layer and one example's input shape."""
    if kind == "linear":
        layer = eqx.nn.Linear(
            cfg["in_features"], cfg["out_features"], cfg["use_bias"], key=key
        )
        return layer, (cfg["in_features"],)
    common = dict(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        kernel_size=cfg["kernel_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        use_bias=cfg["use_bias"],
        key=key,
    )
    if kind == "convtranspose2d":
        layer = eqx.nn.ConvTranspose2d(output_padding=cfg["output_padding"], **common)
    else:
        cls = {"conv1d": eqx.nn.Conv1d, "conv2d": eqx.nn.Conv2d}
        cls["conv3d"] = eqx.nn.Conv3d
        layer = cls[kind](**common)
    return layer, (cfg["in_channels"], *cfg["spatial"])


def reference_op(kind: str, cfg: dict, x, w, b):
    """`op(w, x) + b` for a batch `x` (first axis), written from the equations:
    `x Wᵀ + b` for a dense layer; for a convolution the cross-correlation
    `lax.conv_general_dilated` with the layer's stride, padding, dilation and groups;
    for Equinox's transposed convolution the same kernel applied to the input dilated
    by the stride, with padding `d(k-1) - p` before and `d(k-1) - p + a` after
    (Dumoulin & Visin, relationship 14; `a` the output padding)."""
    if kind == "linear":
        y = x @ w.T
        return y if b is None else y + b.reshape(1, -1)
    nd = cfg["num_spatial_dims"]
    if kind == "convtranspose2d":
        padding = [
            (d * (k - 1) - p0, d * (k - 1) - p1 + a)
            for k, d, (p0, p1), a in zip(
                cfg["kernel_size"],
                cfg["dilation"],
                cfg["padding"],
                cfg["output_padding"],
            )
        ]
        y = lax.conv_general_dilated(
            x,
            w,
            window_strides=(1,) * nd,
            padding=padding,
            lhs_dilation=cfg["stride"],
            rhs_dilation=cfg["dilation"],
            feature_group_count=cfg["groups"],
        )
    else:
        y = lax.conv_general_dilated(
            x,
            w,
            window_strides=cfg["stride"],
            padding=cfg["padding"],
            rhs_dilation=cfg["dilation"],
            feature_group_count=cfg["groups"],
        )
    return y if b is None else y + b[None]


def _fan_in(w) -> int:
    return math.prod(w.shape[1:])


def reference_feedback(rule: str, wrapper, key) -> jax.Array:
    """`B` in the weight's layout, from the wrapper's fields and the equations."""
    w = wrapper.weight
    bound = FEEDBACK_SCALE / math.sqrt(_fan_in(w))
    if rule in ("fa", "kp"):
        return wrapper.feedback
    if rule == "usf":
        return FEEDBACK_SCALE / math.sqrt(3 * _fan_in(w)) * jnp.sign(w)
    if rule == "frsf":
        return jnp.abs(wrapper.magnitude) * jnp.sign(w)
    assert rule == "brsf"
    m = jax.random.uniform(key, w.shape, w.dtype, minval=-bound, maxval=bound)
    return jnp.abs(m) * jnp.sign(w)


@pytest.fixture
def rng() -> np.random.Generator:
    """Test data from NumPy: a `jax.random.normal` would cost a compilation."""
    return np.random.default_rng(1234)


def _inputs(kind, cfg, rng):
    """A batch `x` and a cotangent `c` of the output's shape."""

    def shapes(key):
        layer, in_shape = _make_layer(kind, cfg, key)
        x = jnp.zeros((BATCH, *in_shape))
        return x, reference_op(kind, cfg, x, layer.weight, layer.bias)

    x, y = jax.eval_shape(shapes, jax.random.key(0))
    return (
        jnp.asarray(rng.standard_normal(x.shape)),
        jnp.asarray(rng.standard_normal(y.shape)),
    )


def _reference(kind, cfg, x, w, b, c, feedback):
    """The forward pass, `(∂L/∂W, ∂L/∂b)` and, if `feedback` is an array of `W`'s
    shape, the input cotangent `vjp_x op(B, ·)(c)`, for `L = Σ c · y`."""
    y, weight_vjp = jax.vjp(lambda w_, b_: reference_op(kind, cfg, x, w_, b_), w, b)
    dw, db = weight_vjp(c)
    _, input_vjp = jax.vjp(lambda x_: reference_op(kind, cfg, x_, feedback, b), x)
    (dx,) = input_vjp(c)
    return y, dw, db, dx


def _close(a, b):
    return np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10
    )


def _check_layer_gradients(grad_model, b, dw, db):
    _close(grad_model.layer.weight, dw)
    if b is None:
        assert grad_model.layer.bias is None
    else:
        _close(grad_model.layer.bias, db)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("kind", "i", "cfg", "path"), PATH_CASES, ids=PATH_IDS)
def test_rule_gradients(rule, kind, i, cfg, path, getkey, rng):
    del i
    x, c = _inputs(kind, cfg, rng)

    # One compilation builds the layer, the wrapper and the data, and computes the
    # wrapped layer's gradients and the references (each eager op would compile).
    @eqx.filter_jit
    def run(key, x, c):
        k_layer, k_feedback, k_call = jax.random.split(key, 3)
        layer, _ = _make_layer(kind, cfg, k_layer)
        wrapper = WRAPPERS[rule](layer, feedback_scale=FEEDBACK_SCALE, key=k_feedback)
        lowered = LOWER[path](wrapper)
        assert isinstance(lowered.layer, bfx.Im2colConv) == (path == "im2col")

        def loss(model_and_x):
            model, x = model_and_x
            y = jax.vmap(lambda xi: model(xi, key=k_call))(x)
            return jnp.sum(c * y), y

        grads, y = eqx.filter_grad(loss, has_aux=True)((lowered, x))
        feedback = reference_feedback(rule, wrapper, k_call)
        w, b = layer.weight, layer.bias  # pyright: ignore
        return wrapper, y, grads, _reference(kind, cfg, x, w, b, c, feedback)

    wrapper, y, (grad_model, grad_x), (y_ref, dw, db, dx) = run(getkey(), x, c)
    assert isinstance(wrapper, WRAPPERS[rule])
    assert wrapper.feedback.shape == wrapper.weight.shape
    if rule in ("fa", "kp", "frsf"):
        bound = FEEDBACK_SCALE / math.sqrt(_fan_in(wrapper.weight))
        stored = wrapper.magnitude if rule == "frsf" else wrapper.feedback
        assert 0 < float(jnp.max(jnp.abs(stored))) <= bound
    assert y.shape == y_ref.shape
    _close(y, y_ref)
    _check_layer_gradients(grad_model, wrapper.bias, dw, db)
    _close(grad_x, dx)
    # Feedback gradients: KP's B receives ∂L/∂W, fixed feedback receives nothing.
    if rule == "kp":
        _close(grad_model.feedback, dw)
    elif rule == "fa":
        assert not np.any(np.asarray(grad_model.feedback))
    elif rule == "frsf":
        assert not np.any(np.asarray(grad_model.magnitude))
    n_arrays = 1 + (wrapper.bias is not None) + (rule in ("fa", "kp", "frsf"))
    assert len(jax.tree_util.tree_leaves(grad_model)) == n_arrays


@pytest.mark.parametrize(("kind", "i", "cfg", "path"), PATH_CASES, ids=PATH_IDS)
def test_dfa_around_any_layer(kind, i, cfg, path, getkey, rng):
    # A single DFA unit whose output is the network's: e = g, x̄ = B e (B of shape
    # (*input_shape, e)), and the weight gradients of backprop inside the unit.
    del i
    x, c = _inputs(kind, cfg, rng)
    n = math.prod(c.shape[1:])

    @eqx.filter_jit
    def run(key, x, c):
        k_layer, k_feedback = jax.random.split(key)
        layer, in_shape = _make_layer(kind, cfg, k_layer)
        dfa = bfx.DFA(
            layer,
            n,
            input_shape=None if kind == "linear" else in_shape,
            feedback_scale=FEEDBACK_SCALE,
            key=k_feedback,
        )
        lowered = LOWER[path](dfa)

        def loss(model_and_x):
            model, x = model_and_x

            def one(xi):
                channel = bfx.open_error_channel(xi, n)
                y, channel = model(xi, channel)
                return bfx.close_error_channel(jnp.ravel(y), channel)

            return jnp.sum(c.reshape(BATCH, n) * jax.vmap(one)(x))

        w, b = layer.weight, layer.bias  # pyright: ignore
        reference = _reference(kind, cfg, x, w, b, c, w)
        return dfa, eqx.filter_grad(loss)((lowered, x)), reference

    dfa, (grad_model, grad_x), (_, dw, db, _) = run(getkey(), x, c)
    assert dfa.feedback.shape == (*x.shape[1:], n)
    bound = FEEDBACK_SCALE / math.sqrt(math.prod(x.shape[1:]))
    assert 0 < float(jnp.max(jnp.abs(dfa.feedback))) <= bound
    e = np.asarray(c).reshape(BATCH, n)
    dx = np.einsum("...k,nk->n...", np.asarray(dfa.feedback), e)
    _check_layer_gradients(grad_model, dfa.bias, dw, db)
    _close(grad_x, dx)
    assert not np.any(np.asarray(grad_model.feedback))


# A small conv net: conv, relu, pool, conv, flatten, linear.
def _conv_net(key, *, in_channels=2, c1=3, c2=4, out=5, dtype=None):
    k1, k2, k3 = jax.random.split(key, 3)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(in_channels, c1, 3, padding=1, dtype=dtype, key=k1),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Conv2d(c1, c2, 2, stride=1, dtype=dtype, key=k2),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(c2 * 3 * 3, out, dtype=dtype, key=k3),
        ]
    )


def _mse_loss(model, x, t, key):
    y = jax.vmap(lambda xi: model(xi, key=key))(x)
    return 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))


def _linear_nodes(seq) -> list[Any]:
    return [seq.layers[i] for i in (0, 3, 5)]


def test_fa_with_b_equal_w_is_backprop(getkey, rng):
    net = _conv_net(getkey())
    x = jnp.asarray(rng.standard_normal((4, 2, 8, 8)))
    t = jnp.asarray(rng.standard_normal((4, 5)))
    fa = bfx.convert(net, "fa", key=getkey())
    for i in (0, 3, 5):
        fa = eqx.tree_at(lambda m: m.layers[i].feedback, fa, fa.layers[i].weight)
    grad = eqx.filter_jit(eqx.filter_grad(_mse_loss))
    g_bp = grad(net, x, t, None)
    g_fa = grad(fa, x, t, None)
    for bp_layer, fa_layer in zip(_linear_nodes(g_bp), _linear_nodes(g_fa)):
        assert isinstance(fa_layer, bfx.FA)
        np.testing.assert_array_equal(fa_layer.weight, bp_layer.weight)
        np.testing.assert_array_equal(fa_layer.bias, bp_layer.bias)
    # With B ≠ W, the first conv's gradient differs (it sees B's error).
    g_random = grad(bfx.convert(net, "fa", key=getkey()), x, t, None)
    assert not np.allclose(g_random.layers[0].layer.weight, g_bp.layers[0].weight)


def test_kp_decay_identity_for_conv_kernels(getkey, rng):
    # With SGD and the same L2 decay on W and B: W_t − B_t = (1 − ηλ)^t (W_0 − B_0).
    eta, lam, steps = 0.02, 1.0, 20
    model = bfx.convert(_conv_net(getkey()), "kp", key=getkey())
    params, static = eqx.partition(model, bfx.trainable(model))
    optimizer = optax.chain(
        optax.add_decayed_weights(lam, mask=bfx.decay_mask), optax.sgd(eta)
    )
    opt_state = optimizer.init(params)

    @eqx.filter_jit
    def step(params, opt_state, x, t):
        grads = eqx.filter_grad(
            lambda p: _mse_loss(eqx.combine(p, static), x, t, None)
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state

    diff0 = [np.asarray(u.weight - u.feedback) for u in _linear_nodes(model)]
    w0 = [np.asarray(u.weight) for u in _linear_nodes(model)]
    for _ in range(steps):
        x = jnp.asarray(rng.standard_normal((4, 2, 8, 8)))
        t = jnp.asarray(rng.standard_normal((4, 5)))
        params, opt_state = step(params, opt_state, x, t)
    trained = eqx.combine(params, static)
    factor = (1 - eta * lam) ** steps
    for unit, d0, w in zip(_linear_nodes(trained), diff0, w0):
        assert isinstance(unit, bfx.KP)
        assert not np.allclose(unit.weight, w)  # it did learn
        _close(unit.weight - unit.feedback, factor * d0)
