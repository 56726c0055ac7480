"""`bfx.convert` on nested models: which leaves it wraps, bit-identical forward passes,
bit-for-bit round trips through backprop, and conversion to DFA of the models that can
thread the error channel (with gradients against DFA's equations, written by hand)."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bioflax_eqx as bfx


BATCH = 4
RULES = ("fa", "kp", "usf", "brsf", "frsf")
WRAPPERS = {"fa": bfx.FA, "kp": bfx.KP, "usf": bfx.USF, "brsf": bfx.BRSF}
WRAPPERS["frsf"] = bfx.FRSF
SEQ, DIM = 16, 4  # the conv features (4 channels of 4 x 4) as a sequence


class Attention(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm

    def __init__(self, *, key):
        self.attn = eqx.nn.MultiheadAttention(2, DIM, key=key)
        self.norm = eqx.nn.LayerNorm(DIM)

    def __call__(self, s, *, key=None):
        return jax.vmap(self.norm)(s + self.attn(s, s, s))


class Net(eqx.Module):
    features: eqx.nn.Sequential
    bn: eqx.nn.BatchNorm
    up: eqx.nn.ConvTranspose2d
    emb: eqx.nn.Embedding
    attention: Attention | None
    blocks: list
    heads: dict
    drop: eqx.nn.Dropout

    def __init__(self, *, attention: bool, key):
        keys = iter(jax.random.split(key, 10))
        self.features = eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(2, 4, 3, padding=1, key=next(keys)),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.MaxPool2d(2, 2),
                eqx.nn.Conv2d(4, DIM, 1, key=next(keys)),
            ]
        )
        self.bn = eqx.nn.BatchNorm(DIM, axis_name="batch", mode="batch")
        self.up = eqx.nn.ConvTranspose2d(DIM, DIM, 3, padding=1, key=next(keys))
        self.emb = eqx.nn.Embedding(5, DIM, key=next(keys))
        self.attention = Attention(key=next(keys)) if attention else None
        self.blocks = [
            eqx.nn.Linear(DIM, 6, key=next(keys)),
            eqx.nn.Linear(6, DIM, key=next(keys)),
        ]
        self.heads = {
            "a": eqx.nn.Linear(DIM, 3, key=next(keys)),
            "b": eqx.nn.Linear(DIM, 3, use_bias=False, key=next(keys)),
        }
        self.drop = eqx.nn.Dropout(0.5, inference=True)

    def __call__(self, x, token, state, *, key=None):
        if key is None:
            keys, block_keys = [None] * 6, [None, None]
        else:
            keys = list(jax.random.split(key, 6))
            block_keys = list(jax.random.split(keys[2]))
        h = self.features(x, key=keys[0])
        h, state = self.bn(h, state)
        h = self.up(h, key=keys[1])  # pyright: ignore[reportCallIssue]
        s = h.reshape(DIM, SEQ).T + self.emb(token).reshape(1, DIM)
        if self.attention is not None:
            s = self.attention(s)
        v = jnp.mean(s, axis=0)
        for layer, k in zip(self.blocks, block_keys):
            v = jnp.tanh(layer(v, key=k))
        v = self.drop(v)
        a = self.heads["a"](v, key=keys[3])  # pyright: ignore[reportCallIssue]
        b = self.heads["b"](v, key=keys[4])  # pyright: ignore[reportCallIssue]
        return a + b, state


def _n_linear(attention: bool) -> int:
    # 2 convs + 1 transposed conv + 2 in the list + 2 in the dict (+ 4 projections)
    return 7 + 4 * attention


@eqx.filter_jit
def _run(model, x, tokens, key=None):
    state = eqx.nn.State(model)
    return jax.vmap(lambda xi, ti: model(xi, ti, state, key=key)[0], axis_name="batch")(
        x, tokens
    )


@pytest.fixture
def rng() -> np.random.Generator:
    """Test data from NumPy: a `jax.random.normal` would cost a compilation."""
    return np.random.default_rng(1234)


def _data(rng):
    x = jnp.asarray(rng.standard_normal((BATCH, 2, 8, 8)))
    return x, jnp.asarray(rng.integers(0, 5, BATCH), jnp.int32)


def _linear_types(model) -> list[type]:
    return [type(layer) for layer in _linear_leaves(model)]


def _linear_leaves(model) -> list:
    def is_leaf(x):
        return isinstance(x, eqx.nn.Linear | eqx.nn.Conv | eqx.nn.ConvTranspose)

    leaves = jax.tree_util.tree_leaves(model, is_leaf=is_leaf)
    return [x for x in leaves if is_leaf(x)]


def _wrappers(model) -> list:
    def is_leaf(x):
        return isinstance(x, bfx.AbstractFeedback)

    leaves = jax.tree_util.tree_leaves(model, is_leaf=is_leaf)
    return [x for x in leaves if is_leaf(x)]


def _bit_equal(a, b) -> bool:
    """Same treedef and every leaf equal: arrays bit for bit, others by `==`."""
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False

    def equal(x, y):
        if eqx.is_array(x):
            return (
                x.dtype == y.dtype
                and x.shape == y.shape
                and bool(
                    (jax.random.key_data(x) == jax.random.key_data(y)).all()
                    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                    else (x == y).all()
                )
            )
        return x == y

    return jax.tree_util.tree_all(jax.tree_util.tree_map(equal, a, b))


@pytest.mark.parametrize("rule", RULES)
def test_convert_wraps_every_linear_layer_and_nothing_else(rule, getkey, rng):
    attention = rule != "brsf"  # brSF needs a key, which MultiheadAttention drops
    net = Net(attention=attention, key=getkey())
    converted = bfx.convert(net, rule, key=getkey())
    wrappers = _wrappers(converted)
    assert len(wrappers) == _n_linear(attention)
    assert all(type(w) is WRAPPERS[rule] for w in wrappers)
    # Each wrapper holds the original layer, untouched.
    assert [type(w.layer) for w in wrappers] == _linear_types(net)
    for w, layer in zip(wrappers, _linear_leaves(net)):
        assert _bit_equal(w.layer, layer)
    # Nothing else is wrapped: the norms, embedding, dropout and pooling stay.
    assert type(converted.bn) is eqx.nn.BatchNorm
    assert type(converted.emb) is eqx.nn.Embedding
    assert type(converted.drop) is eqx.nn.Dropout
    assert type(converted.features.layers[2]) is eqx.nn.MaxPool2d
    assert type(converted.features.layers[1]) is eqx.nn.Lambda
    for name in ("bn", "emb", "drop"):
        assert _bit_equal(getattr(converted, name), getattr(net, name))
    if attention:
        assert converted.attention is not None
        assert type(converted.attention.norm) is eqx.nn.LayerNorm
        projections = [
            converted.attention.attn.query_proj,
            converted.attention.attn.key_proj,
            converted.attention.attn.value_proj,
            converted.attention.attn.output_proj,
        ]
        assert all(type(p) is WRAPPERS[rule] for p in projections)
    assert isinstance(converted.blocks, list) and isinstance(converted.heads, dict)
    # The forward pass is bit-identical.
    x, tokens = _data(rng)
    key = getkey()
    np.testing.assert_array_equal(
        _run(converted, x, tokens, key), _run(net, x, tokens, key)
    )


@pytest.mark.parametrize("rule", RULES)
def test_round_trip_through_bp_is_bit_for_bit(rule, getkey):
    net = Net(attention=True, key=getkey())
    back = bfx.convert(bfx.convert(net, rule, key=getkey()), "bp")
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(net)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(
            lambda a, b: bool((a == b).all()) if eqx.is_array(a) else a == b,
            back,
            net,
        )
    )
    assert _bit_equal(back, net)
    assert _wrappers(back) == []
    # "bp" of a plain model is the model itself.
    assert _bit_equal(bfx.convert(net, "bp"), net)


@pytest.mark.parametrize(
    ("first", "second"),
    [("fa", "kp"), ("kp", "usf"), ("usf", "frsf"), ("frsf", "brsf"), ("brsf", "fa")],
)
def test_reconverting_keeps_the_weights(first, second, getkey):
    net = Net(attention=True, key=getkey())
    twice = bfx.convert(bfx.convert(net, first, key=getkey()), second, key=getkey())
    wrappers = _wrappers(twice)
    assert len(wrappers) == _n_linear(True)
    assert all(type(w) is WRAPPERS[second] for w in wrappers)
    for w, layer in zip(wrappers, _linear_leaves(net)):
        assert _bit_equal(w.layer, layer)  # no wrapper inside a wrapper
    assert _bit_equal(bfx.convert(twice, "bp"), net)


def test_reconverting_a_dfa_model_keeps_the_weights(getkey):
    mlp = eqx.nn.MLP(5, 3, 7, 2, key=getkey())
    dfa = bfx.convert(mlp, "dfa", key=getkey(), error_features=3)
    # (typed Any: convert is annotated as returning its input's type, but an
    # eqx.nn.MLP converted to DFA becomes a bfx.MLP)
    fa: Any = bfx.convert(dfa, "fa", key=getkey())
    assert isinstance(fa, bfx.MLP) and fa.rule == "fa"
    assert [type(x) for x in fa.layers] == [bfx.FA] * 3
    for w, layer in zip(fa.layers, mlp.layers):
        assert _bit_equal(w.layer, layer)


# DFA: the hand-written equations. L = Σ_batch ½‖y − t‖², so e = y − t; every DFA
# unit's input receives B e, and inside each unit ordinary backprop runs.


def _dense_dfa_reference(ws, bs, feedback, x, t, activation_prime, activation):
    """`(dW, db)` per layer of a DFA MLP (feedback[l] of shape (in_l, error))."""
    hs, pre = [x], []
    for i, (w, b) in enumerate(zip(ws, bs)):
        a = hs[-1] @ w.T + b
        pre.append(a)
        hs.append(a if i == len(ws) - 1 else activation(a))
    e = hs[-1] - t
    grads = []
    for i in range(len(ws)):
        if i == len(ws) - 1:
            g = e
        else:
            g = activation_prime(pre[i]) * (e @ feedback[i + 1].T)
        grads.append((g.T @ hs[i], g.sum(0)))
    return grads


def _mse(model, x, t):
    y = jax.vmap(model)(x)
    return 0.5 * jnp.sum((y - t) ** 2)


def _tanh_prime(a):
    return 1 - np.tanh(a) ** 2


def _check_dense_dfa(units, x, t, grad_units):
    ws = [np.asarray(u.weight) for u in units]
    bs = [np.asarray(u.bias) for u in units]
    feedback = [np.asarray(u.feedback) for u in units]
    reference = _dense_dfa_reference(
        ws, bs, feedback, np.asarray(x), np.asarray(t), _tanh_prime, np.tanh
    )
    for g, (dw, db) in zip(grad_units, reference):
        np.testing.assert_allclose(g.layer.weight, dw, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(g.layer.bias, db, rtol=1e-10, atol=1e-10)
        assert not np.any(np.asarray(g.feedback))


def _dense_data(rng, n_in=5, n_out=3):
    return (
        jnp.asarray(rng.standard_normal((BATCH, n_in))),
        jnp.asarray(rng.standard_normal((BATCH, n_out))),
    )


def test_dfa_of_a_dense_sequential(getkey, rng):
    keys = jax.random.split(getkey(), 3)
    seq = eqx.nn.Sequential(
        [
            eqx.nn.Linear(5, 7, key=keys[0]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(7, 6, key=keys[1]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(6, 3, key=keys[2]),
        ]
    )
    dfa = bfx.convert(seq, "dfa", key=getkey(), error_features=3)
    assert isinstance(dfa, bfx.Sequential)
    assert [type(x) for x in dfa.layers] == [bfx.DFA, eqx.nn.Lambda] * 2 + [bfx.DFA]
    assert [x.feedback.shape for x in dfa.layers[::2]] == [(5, 3), (7, 3), (6, 3)]
    x, t = _dense_data(rng)
    np.testing.assert_array_equal(jax.vmap(dfa)(x), jax.vmap(seq)(x))
    grads = eqx.filter_jit(eqx.filter_grad(_mse))(dfa, x, t)
    _check_dense_dfa(dfa.layers[::2], x, t, grads.layers[::2])


@pytest.mark.parametrize("source", ["eqx", "bfx"])
def test_dfa_of_an_mlp(source, getkey, rng):
    if source == "eqx":
        mlp = eqx.nn.MLP(5, 3, 7, 2, activation=jnp.tanh, key=getkey())
    else:
        mlp = bfx.MLP(5, 3, 7, 2, rule="bp", activation=jnp.tanh, key=getkey())
    dfa = bfx.convert(mlp, "dfa", key=getkey(), error_features=3)
    assert isinstance(dfa, bfx.MLP) and dfa.rule == "dfa"
    assert [type(x) for x in dfa.layers] == [bfx.DFA] * 3
    x, t = _dense_data(rng)
    np.testing.assert_array_equal(jax.vmap(dfa)(x), jax.vmap(mlp)(x))
    grads = eqx.filter_jit(eqx.filter_grad(_mse))(dfa, x, t)
    _check_dense_dfa(dfa.layers, x, t, grads.layers)


def _conv(x, w, b, padding):
    """One example's `Conv2d` with stride 1, from the equations."""
    return lax.conv_general_dilated(x[None], w, (1, 1), padding)[0] + b


def _pool(h):
    """`MaxPool2d(2, 2)` of one example."""
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2), (1, 2, 2), "VALID")


def conv_sequential(key) -> eqx.nn.Sequential:
    """(2, 8, 8) → conv (3, 8, 8) → relu, pool (3, 4, 4) → conv (4, 2, 2) → relu,
    flatten (16) → linear (3)."""
    k1, k2, k3 = jax.random.split(key, 3)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(2, 3, 3, padding=1, key=k1),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.MaxPool2d(2, 2),
            eqx.nn.Conv2d(3, 4, 3, key=k2),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(16, 3, key=k3),
        ]
    )


def conv_dfa_reference(params, feedback, x, t):
    """DFA's gradients of the conv net above, per example, from the equations.

    `params` = ((W1, b1), (W2, b2), (W3, b3)) and `feedback` = (B2, B3), the points
    at the second conv's and the linear layer's inputs (the first's is the data).
    """
    (w1, b1), (w2, b2), (w3, b3) = params
    b2_feedback, b3_feedback = feedback
    # The forward pass.
    a1 = _conv(x, w1, b1, ((1, 1), (1, 1)))
    p1 = _pool(jax.nn.relu(a1))
    a2 = _conv(p1, w2, b2, "VALID")
    h2 = jnp.ravel(jax.nn.relu(a2))
    y = w3 @ h2 + b3
    e = y - t
    # The last layer: g = e.
    dw3, db3 = jnp.outer(e, h2), e
    # The second conv: its unit's output (the linear input) receives B3 e.
    _, vjp2 = jax.vjp(
        lambda w, b: jnp.ravel(jax.nn.relu(_conv(p1, w, b, "VALID"))), w2, b2
    )
    dw2, db2 = vjp2(b3_feedback @ e)
    # The first conv: its unit's output (the second conv's input) receives B2 e.
    _, vjp1 = jax.vjp(
        lambda w, b: _pool(jax.nn.relu(_conv(x, w, b, ((1, 1), (1, 1))))), w1, b1
    )
    dw1, db1 = vjp1(jnp.tensordot(b2_feedback, e, axes=1))
    return (dw1, db1), (dw2, db2), (dw3, db3)


def check_conv_dfa(units, grad_units, x, t):
    """`units`: the three DFA units (conv, conv, linear) of a conv net as above."""
    params = tuple((u.weight, u.bias) for u in units)
    feedback = (units[1].feedback, units[2].feedback)
    per_example = jax.vmap(conv_dfa_reference, in_axes=(None, None, 0, 0))
    reference = per_example(params, feedback, x, t)
    for g, (dw, db) in zip(grad_units, reference):
        np.testing.assert_allclose(g.layer.weight, dw.sum(0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(g.layer.bias, db.sum(0), rtol=1e-10, atol=1e-10)
        assert not np.any(np.asarray(g.feedback))


def test_dfa_of_a_conv_sequential(getkey, rng):
    seq = conv_sequential(getkey())
    dfa = bfx.convert(seq, "dfa", key=getkey(), error_features=3, input_shape=(2, 8, 8))
    assert isinstance(dfa, bfx.Sequential)
    units = [dfa.layers[i] for i in (0, 3, 6)]
    assert all(isinstance(u, bfx.DFA) for u in units)
    assert [type(u.layer) for u in units] == [eqx.nn.Conv2d] * 2 + [eqx.nn.Linear]
    assert [u.feedback.shape for u in units] == [(2, 8, 8, 3), (3, 4, 4, 3), (16, 3)]
    assert [type(dfa.layers[i]) for i in (1, 2, 4, 5)] == [
        eqx.nn.Lambda,
        eqx.nn.MaxPool2d,
        eqx.nn.Lambda,
        eqx.nn.Lambda,
    ]
    x = jnp.asarray(rng.standard_normal((BATCH, 2, 8, 8)))
    t = jnp.asarray(rng.standard_normal((BATCH, 3)))
    np.testing.assert_array_equal(jax.vmap(dfa)(x), jax.vmap(seq)(x))
    grads = eqx.filter_jit(eqx.filter_grad(_mse))(dfa, x, t)
    check_conv_dfa(units, [grads.layers[i] for i in (0, 3, 6)], x, t)


def test_dfa_of_a_custom_module_is_a_clear_error(getkey):
    net = Net(attention=True, key=getkey())
    with pytest.raises(ValueError, match="threads the error channel through an"):
        bfx.convert(net, "dfa", key=getkey(), error_features=3)


def test_dfa_of_a_conv_sequential_needs_input_shape(getkey):
    seq = conv_sequential(getkey())
    with pytest.raises(ValueError, match="needs `input_shape=`"):
        bfx.convert(seq, "dfa", key=getkey(), error_features=3)


def test_dfa_needs_error_features(getkey):
    with pytest.raises(ValueError, match="error_features"):
        bfx.convert(conv_sequential(getkey()), "dfa", key=getkey())


def test_brsf_inside_multihead_attention_needs_a_key(getkey):
    # MultiheadAttention calls its projections without a key: brSF cannot draw.
    model = bfx.convert(Attention(key=getkey()), "brsf", key=getkey())
    s = jnp.ones((BATCH, SEQ, DIM))
    with pytest.raises(ValueError, match="BRSF draws new feedback magnitudes on every"):
        jax.vmap(lambda si: model(si, key=jax.random.key(0)))(s)
