"""The public API: names, construction, conversion, DFA in hand-written models,
abstract/final classes (clear errors: test_errors.py)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import bioflax_eqx as bfx

from .helpers import layers_of, tree_allclose


WRAPPERS = [bfx.FA, bfx.KP, bfx.USF, bfx.FRSF, bfx.BRSF, bfx.WM]
RULE_OF = {
    "fa": bfx.FA,
    "kp": bfx.KP,
    "wm": bfx.WM,
    "usf": bfx.USF,
    "frsf": bfx.FRSF,
}

# The core API (the training, data and checkpoint names are tested in their files).
CORE_NAMES = {
    "AbstractFeedback",
    "AbstractRule",
    "FA",
    "KP",
    "USF",
    "BRSF",
    "FRSF",
    "WM",
    "mirror",
    "DFA",
    "DFAFeedback",
    "Sequential",
    "MLP",
    "RULES",
    "convert",
    "open_error_channel",
    "close_error_channel",
    "feedback_labels",
    "freeze_feedback",
    "tie_feedback",
    "decay_mask",
    "trainable",
    "angle",
    "weight_alignment",
    "gradient_alignment",
    "delta_alignment",
    "layer_deltas",
    "alignment_metrics",
}
# The old per-class dense layers are gone, with no aliases.
REMOVED_NAMES = {
    "FALinear",
    "KPLinear",
    "USFLinear",
    "FRSFLinear",
    "BRSFLinear",
    "DFALinear",
    "AbstractFeedbackLinear",
    "AbstractFeedbackModule",
    "feedback_matrix",
}


def _public_names() -> set[str]:
    return {name for name in vars(bfx) if not name.startswith("_")}


def test_public_names():
    public = _public_names()
    assert CORE_NAMES <= public, CORE_NAMES - public
    assert not REMOVED_NAMES & public
    assert bfx.RULES == ("bp", "fa", "kp", "wm", "dfa", "usf", "brsf", "frsf")
    for name in public:
        obj = getattr(bfx, name)
        if isinstance(obj, type) or callable(obj):
            assert (obj.__doc__ or "").strip(), f"bfx.{name} has no docstring"


def _is_abstract(cls: type) -> bool:
    """Whether Equinox refuses to build `cls` for something it leaves abstract."""
    return bool(
        getattr(cls, "__abstractmethods__", ())
        or getattr(cls, "__abstractvars__", ())
        or getattr(cls, "__abstractclassvars__", ())
    )


def test_abstract_base_and_final_rules(getkey):
    # The extension point is abstract: it cannot be built on its own.
    with pytest.raises(TypeError, match="abstract"):
        bfx.AbstractRule()  # pyright: ignore[reportAbstractUsage, reportCallIssue]
    for cls in (*WRAPPERS, bfx.DFA, bfx.DFAFeedback):
        assert issubclass(cls, bfx.AbstractFeedback)
        assert not _is_abstract(cls), cls
        # Final: every class above a rule is abstract (no rule builds on another).
        above = [b for b in cls.__mro__[1:] if issubclass(b, bfx.AbstractFeedback)]
        assert all(_is_abstract(b) for b in above), (cls, above)
    for cls in WRAPPERS:
        assert issubclass(cls, bfx.AbstractRule)
    # FA, KP and WM share their stored feedback; uSF and brSF their sign feedback.
    assert bfx.FA.__init__ is bfx.KP.__init__ is bfx.WM.__init__
    assert bfx.USF.__init__ is bfx.BRSF.__init__
    for cls in (bfx.DFA, bfx.DFAFeedback):
        assert not issubclass(cls, bfx.AbstractRule)
    # Only Kolen-Pollack's feedback learns from the loss (WM's learns by mirroring).
    assert [cls.trains_feedback for cls in WRAPPERS] == [False, True] + [False] * 4
    assert not bfx.DFA.trains_feedback and not bfx.DFAFeedback.trains_feedback

    # A subclass that leaves `feedback_weight` abstract cannot be built either.
    class Incomplete(bfx.AbstractRule):
        layer: eqx.Module
        feedback: jax.Array
        trains_feedback = False

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(eqx.nn.Linear(3, 2, key=getkey()), jnp.zeros((2, 3)))  # pyright: ignore[reportAbstractUsage, reportCallIssue]


class _WeightTransport(bfx.AbstractRule):
    """A new rule in a few lines: feedback = W, i.e. backprop."""

    layer: eqx.Module
    trains_feedback = False

    @property
    def feedback(self):
        return self.weight

    def feedback_weight(self, *, key=None):
        return self.weight


def test_a_new_rule_is_one_subclass(getkey):
    model = bfx.MLP(5, 3, 4, 2, rule="bp", activation=jnp.tanh, key=getkey())
    mine = eqx.tree_at(
        lambda m: m.layers,
        model,
        tuple(_WeightTransport(x) for x in model.layers),  # pyright: ignore[reportCallIssue]
    )
    x = jax.random.normal(getkey(), (6, 5))
    t = jax.random.normal(getkey(), (6, 3))

    def loss(model):
        return jnp.sum((jax.vmap(model)(x) - t) ** 2)

    grad = eqx.filter_jit(eqx.filter_grad(loss))
    g_mine, g_bp = grad(mine), grad(model)
    for a, b in zip(g_mine.layers, g_bp.layers):
        assert tree_allclose(a.layer, b)
    assert tree_allclose(bfx.convert(mine, "bp"), model)


@pytest.mark.parametrize("cls", WRAPPERS)
def test_forward_is_the_wrapped_layer(cls, getkey):
    linear = eqx.nn.Linear(5, 3, key=getkey())
    layer = cls(linear, key=getkey())
    assert layer.layer is linear
    x = jax.random.normal(getkey(), (5,))
    y = layer(x, key=getkey())
    assert tree_allclose(y, linear(x))
    assert tree_allclose(y, layer.weight @ x + layer.bias)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    # The feedback is stored in the weight's layout.
    assert layer.feedback.shape == layer.weight.shape == (3, 5)
    assert layer.feedback_weight(key=getkey()).shape == (3, 5)
    no_bias = cls(eqx.nn.Linear(5, 3, use_bias=False, key=getkey()), key=getkey())
    assert no_bias.bias is None
    assert tree_allclose(no_bias(x, key=getkey()), no_bias.weight @ x)


@pytest.mark.parametrize("cls", [*WRAPPERS, bfx.DFA])
def test_dtype_follows_the_wrapped_layer(cls, getkey):
    linear = eqx.nn.Linear(5, 3, dtype=jnp.float32, key=getkey())
    layer = (
        cls(linear, 3, key=getkey()) if cls is bfx.DFA else cls(linear, key=getkey())
    )
    assert layer.weight.dtype == jnp.float32
    assert layer.feedback.dtype == jnp.float32
    if isinstance(layer, bfx.AbstractRule):
        assert layer.feedback_weight(key=getkey()).dtype == jnp.float32
    if isinstance(layer, bfx.FRSF):
        assert layer.magnitude.dtype == jnp.float32
    x = jax.random.normal(getkey(), (4, 5), jnp.float32)
    key = getkey()

    def one(layer, xi):
        if isinstance(layer, bfx.DFA):
            channel = bfx.open_error_channel(xi, 3)
            y, channel = layer(xi, channel)[:2]
            return bfx.close_error_channel(y, channel)
        return layer(xi, key=key)

    def loss(layer, x):
        return jnp.sum(jax.vmap(lambda xi: one(layer, xi))(x) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(layer, x)
    x_bar = eqx.filter_jit(jax.grad(loss, argnums=1))(layer, x)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(grads)} == {
        jnp.dtype(jnp.float32)
    }
    assert x_bar.dtype == jnp.float32


def test_feedback_is_an_independent_draw_from_the_weight_distribution(getkey):
    layer = bfx.FA(eqx.nn.Linear(400, 300, key=getkey()), key=getkey())
    bound = 1 / 400**0.5
    assert float(jnp.max(jnp.abs(layer.feedback))) <= bound
    # U(-k, k) has standard deviation k/√3; the weight's draw is a different one.
    assert abs(float(jnp.std(layer.feedback)) - bound / 3**0.5) < 0.02 * bound
    assert not tree_allclose(layer.feedback, layer.weight)
    linear = eqx.nn.Linear(400, 300, key=getkey())
    scaled = bfx.FA(linear, feedback_scale=0.1, key=getkey())
    assert float(jnp.max(jnp.abs(scaled.feedback))) <= 0.1 * bound
    # The same key draws the same feedback, whatever the rule.
    key = getkey()
    assert tree_allclose(
        bfx.FA(linear, key=key).feedback, bfx.KP(linear, key=key).feedback
    )
    # The sign-symmetry scales: 1/√(3 fan_in) for uSF, 1/√fan_in for brSF.
    assert bfx.USF(linear).scale == pytest.approx(1 / (3 * 400) ** 0.5)
    assert bfx.USF(linear, feedback_scale=2.0).scale == pytest.approx(
        2 / (3 * 400) ** 0.5
    )
    assert bfx.BRSF(linear).scale == pytest.approx(bound)


def test_convert_keeps_weights_and_draws_feedback(getkey):
    model = eqx.nn.MLP(4, 3, 5, 2, key=getkey())
    # (brSF is left out: eqx.nn.MLP passes no key to its layers, and brSF needs one.)
    for rule, cls in RULE_OF.items():
        converted = bfx.convert(model, rule, key=getkey())
        for old, new in zip(model.layers, layers_of(converted)):
            assert type(new) is cls
            assert tree_allclose(new.layer, old)
        x = jax.random.normal(getkey(), (4,))
        assert tree_allclose(model(x), converted(x))
    back = bfx.convert(bfx.convert(model, "fa", key=getkey()), "bp")
    assert tree_allclose(back, model)
    # Converting a converted model unwraps first: never a wrapper around a wrapper.
    twice = bfx.convert(bfx.convert(model, "fa", key=getkey()), "kp", key=getkey())
    assert all(type(layer.layer) is eqx.nn.Linear for layer in layers_of(twice))


def test_convert_an_mlp_between_rules(getkey):
    model = bfx.MLP(4, 3, 5, 2, rule="fa", key=getkey())
    x = jax.random.normal(getkey(), (4,))
    for rule in bfx.RULES:
        converted = bfx.convert(model, rule, key=getkey(), error_features=3)
        assert converted.rule == rule
        assert tree_allclose(converted(x, key=getkey()), model(x))
        if rule == "bp":
            assert all(type(layer) is eqx.nn.Linear for layer in converted.layers)
        elif rule == "dfa":
            assert all(isinstance(layer, bfx.DFA) for layer in converted.layers)
            assert all(
                type(layer.layer) is eqx.nn.Linear for layer in layers_of(converted)
            )


class HandWrittenDFA(eqx.Module):
    """A user model: an Equinox MLP block, then a DFA layer, with a feedback point."""

    block: eqx.nn.MLP
    point: bfx.DFAFeedback
    head: bfx.DFA

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.block = eqx.nn.MLP(4, 6, 5, 1, activation=jnp.tanh, key=k1)
        self.point = bfx.DFAFeedback(6, 3, key=k2)
        self.head = bfx.DFA(eqx.nn.Linear(6, 3, key=k3), 3, key=k4)

    def __call__(self, x):
        channel = bfx.open_error_channel(x, 3)
        h, channel = self.point(jnp.tanh(self.block(x)), channel)
        # (Without a state, a DFA layer returns a pair; pyright sees either arity.)
        y, channel = self.head(h, channel)[:2]
        return bfx.close_error_channel(y, channel)


def test_dfa_feedback_point_in_a_hand_written_model(getkey):
    model = HandWrittenDFA(getkey())
    assert model.head.feedback.shape == (6, 3)
    assert model.point.feedback.shape == (6, 3)
    x = jax.random.normal(getkey(), (7, 4))
    t = jax.random.normal(getkey(), (7, 3))

    def loss(model):
        return 0.5 * jnp.sum((jax.vmap(model)(x) - t) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
    e = jax.vmap(model)(x) - t
    # The block's output receives B e, then ordinary backprop runs inside the block.
    h = jax.vmap(model.block)(x)
    h_bar = (1 - jnp.tanh(h) ** 2) * (e @ model.point.feedback.T)
    params, static = eqx.partition(model.block, eqx.is_array)
    _, block_vjp = jax.vjp(lambda p: jax.vmap(eqx.combine(p, static))(x), params)
    (expected_block,) = block_vjp(h_bar)
    assert tree_allclose(eqx.filter(grads.block, eqx.is_array), expected_block)
    h_out = jax.vmap(lambda xi: jnp.tanh(model.block(xi)))(x)
    assert tree_allclose(grads.head.weight, e.T @ h_out)
    assert tree_allclose(grads.head.bias, jnp.sum(e, axis=0))
    assert tree_allclose(grads.point.feedback, jnp.zeros_like(model.point.feedback))
    assert tree_allclose(grads.head.feedback, jnp.zeros_like(model.head.feedback))
