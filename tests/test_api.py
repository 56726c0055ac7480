"""The public API: names, construction, validation, conversion, DFA in hand-written
models, abstract/final classes, and clear errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

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


def test_wrappers_validate_their_arguments(getkey):
    linear = eqx.nn.Linear(4, 3, key=getkey())
    for cls in WRAPPERS:
        name = cls.__name__
        # An array for a layer: refused by the annotation (under the tests' jaxtyping
        # hook) or, without it, by the wrapper's own check.
        with pytest.raises((TypeCheckError, ValueError), match="layer"):
            cls(jnp.zeros((3, 4)), key=getkey())  # pyright: ignore[reportArgumentType]
        with pytest.raises(ValueError, match=f"{name} wraps an Equinox layer"):
            cls(eqx.nn.Lambda(jnp.tanh), key=getkey())
        with pytest.raises(ValueError, match="`feedback_scale` must be a positive"):
            cls(linear, feedback_scale=0.0, key=getkey())
        with pytest.raises(ValueError, match="`feedback_scale` must be a positive"):
            cls(linear, feedback_scale=float("inf"), key=getkey())


@pytest.mark.parametrize("cls", [bfx.FA, bfx.KP])
def test_feedback_replaced_by_tree_surgery_is_checked_at_call_time(cls, getkey):
    # `eqx.tree_at` skips `__check_init__`; the call must still refuse bad feedback.
    layer = cls(eqx.nn.Linear(4, 3, key=getkey()), key=getkey())
    x = jnp.zeros(4)
    for bad in (jnp.zeros((4, 3)), jnp.zeros((4,)), jnp.zeros((1, 4))):
        wrong = eqx.tree_at(lambda m: m.feedback, layer, bad)
        with pytest.raises(
            ValueError, match=r"`feedback` must have the shape .*\(3, 4\)"
        ):
            wrong(x)
    wrong = eqx.tree_at(lambda m: m.feedback, layer, jnp.zeros((3, 4), jnp.float32))
    with pytest.raises(ValueError, match="`feedback` must have the weight's dtype"):
        wrong(x)


def test_frsf_magnitude_replaced_by_tree_surgery_is_checked_at_call_time(getkey):
    layer = bfx.FRSF(eqx.nn.Linear(4, 3, key=getkey()), key=getkey())
    wrong = eqx.tree_at(lambda m: m.magnitude, layer, jnp.ones((4,)))
    with pytest.raises(ValueError, match="`magnitude` must have the shape"):
        wrong(jnp.zeros(4))


def test_brsf_needs_a_key_at_every_call(getkey):
    layer = bfx.BRSF(eqx.nn.Linear(4, 3, key=getkey()))
    with pytest.raises(ValueError, match="BRSF draws new feedback .* pass `key=`"):
        layer(jnp.zeros(4))
    with pytest.raises(ValueError, match="pass `key=`"):
        layer.feedback_weight()
    model = bfx.MLP(4, 3, 5, 1, rule="brsf", key=getkey())
    with pytest.raises(ValueError, match="pass `key=`"):
        model(jnp.zeros(4))
    assert model(jnp.zeros(4), key=getkey()).shape == (3,)


@pytest.mark.parametrize("cls", WRAPPERS)
def test_a_batch_passed_to_a_dense_layer_is_a_clear_error(cls, getkey):
    layer = cls(eqx.nn.Linear(4, 3, key=getkey()), key=getkey())
    with pytest.raises(
        ValueError,
        match=rf"{cls.__name__} expects an input of shape \(4,\), got \(7, 4\)\. "
        r"Layers take one example; batch with `jax.vmap`\.",
    ):
        layer(jnp.zeros((7, 4)), key=getkey())
    with pytest.raises(
        ValueError, match=r"expects an input of shape \(4,\), got \(5,\)\.$"
    ):
        layer(jnp.zeros(5), key=getkey())


def test_errors_are_clear(getkey):
    with pytest.raises(ValueError, match="unknown rule 'sgd'"):
        bfx.MLP(4, 3, 5, 1, rule="sgd", key=getkey())
    with pytest.raises(ValueError, match="unknown rule 'sgd'"):
        bfx.convert(eqx.nn.Linear(2, 2, key=getkey()), "sgd")
    with pytest.raises(ValueError, match="`width_size` must be a positive integer"):
        bfx.MLP(4, 3, -1, 1, rule="fa", key=getkey())
    with pytest.raises(ValueError, match="`depth` must be a non-negative integer"):
        bfx.MLP(4, 3, 5, -1, rule="fa", key=getkey())
    with pytest.raises(ValueError, match="`feedback_scale` must be a positive"):
        bfx.MLP(4, 3, 5, 1, rule="kp", feedback_scale=0.0, key=getkey())
    linear = eqx.nn.Linear(4, 3, key=getkey())
    with pytest.raises(ValueError, match="`error_features` must be a positive integer"):
        bfx.DFA(linear, 0, key=getkey())
    with pytest.raises(ValueError, match="DFA needs `input_shape=`"):
        bfx.DFA(eqx.nn.Conv2d(1, 2, 3, key=getkey()), 3, key=getkey())
    dfa = bfx.DFA(linear, 2, key=getkey())
    with pytest.raises(ValueError, match="error channel of shape"):
        dfa(jnp.zeros(4), jnp.zeros(3))
    with pytest.raises(ValueError, match="batch with `jax.vmap`"):
        dfa(jnp.zeros((5, 4)), jnp.zeros(2))
    with pytest.raises(ValueError, match="needs `key=`"):
        bfx.convert(linear, "fa")
    with pytest.raises(ValueError, match="needs `error_features`"):
        bfx.convert(bfx.MLP(4, 3, 5, 1, rule="fa", key=getkey()), "dfa", key=getkey())
    with pytest.raises(ValueError, match="threads the error channel"):
        bfx.convert({"a": linear}, "dfa", key=getkey(), error_features=3)
    # Mismatched shapes between arguments are caught by the jaxtyping annotations.
    with pytest.raises(TypeCheckError, match="channel"):
        bfx.close_error_channel(jnp.zeros(3), jnp.zeros(2))


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda k: bfx.MLP(4, 3, 5, True, rule="fa", key=k),
            "`depth` must be a non-negative integer, got True.",
        ),
        (
            lambda k: bfx.DFAFeedback((3, -1), 2, key=k),
            "`shape[1]` must be a positive integer, got -1.",
        ),
        (
            lambda k: bfx.FA(
                eqx.nn.Linear(2, 2, key=k), feedback_scale=float("inf"), key=k
            ),
            "`feedback_scale` must be a positive finite number, got inf.",
        ),
        (
            lambda k: bfx.mirror(bfx.MLP(2, 2, 2, 0, rule="wm", key=k), k, decay=-1.0),
            "`decay` must be a non-negative finite number, got -1.0.",
        ),
        (
            lambda k: bfx.mirror(
                bfx.MLP(2, 2, 2, 0, rule="wm", key=k), k, batch_size=0
            ),
            "`batch_size` must be a positive integer, got 0.",
        ),
        (
            lambda k: bfx.sine(k, n_train=0, n_test=1),
            "`n_train` must be a positive integer, got 0.",
        ),
        (
            lambda k: bfx.teacher_student(
                k, n_train=2, n_test=1, in_size=2, out_size=1, width=3, depth=-1
            ),
            "`depth` must be a non-negative integer, got -1.",
        ),
        (
            lambda k: bfx.augment_images(k, jnp.zeros(4), (1, 2, 2), pad=-1),
            "`pad` must be a non-negative integer, got -1.",
        ),
        (
            lambda k: bfx.load_dataset("mnist", limit=0),
            "`limit` must be a positive integer, got 0.",
        ),
    ],
)
def test_argument_checks_share_one_message_style(call, message, getkey):
    with pytest.raises(ValueError) as info:
        call(getkey())
    assert str(info.value) == message


def test_the_rule_of_an_mlp_is_read_off_all_its_layers(getkey):
    fa = bfx.MLP(4, 3, 5, 1, rule="fa", key=getkey())
    assert fa.rule == "fa"
    assert bfx.MLP(4, 3, 5, 1, rule="dfa", key=getkey()).rule == "dfa"
    assert bfx.MLP(4, 3, 5, 1, rule="bp", key=getkey()).rule == "bp"
    # One layer swapped for another rule's: no single rule any more.
    kp = bfx.KP(fa.layers[1].layer, key=getkey())
    mixed = eqx.tree_at(lambda m: m.layers[1], fa, kp)
    assert mixed.rule is None


class _TanhLayer(eqx.Module):
    """A layer of one's own with a `weight`, but not linear in its input."""

    weight: jax.Array

    def __call__(self, x, *, key=None):
        return jnp.tanh(self.weight @ x)


@pytest.mark.parametrize("rule", [bfx.FA, bfx.KP, bfx.WM, bfx.FRSF, bfx.USF, bfx.BRSF])
def test_layers_not_linear_in_their_input_are_refused(rule, getkey):
    # Their input is known from the layer: refused as they are wrapped.
    with pytest.raises(ValueError, match="LayerNorm is not"):
        rule(eqx.nn.LayerNorm(4), key=getkey())
    with pytest.raises(ValueError, match="Embedding takes int32 input"):
        rule(eqx.nn.Embedding(5, 4, key=getkey()), key=getkey())
    # A layer of one's own says nothing of its input: refused at its first call.
    layer = rule(_TanhLayer(jnp.ones((3, 4))), key=getkey())
    with pytest.raises(ValueError, match="_TanhLayer is not"):
        layer(jnp.ones(4), key=getkey())
    # Affine layers of every kind pass, with or without bias.
    for linear in (
        eqx.nn.Linear("scalar", 3, key=getkey()),
        eqx.nn.Linear(4, 3, use_bias=False, key=getkey()),
        eqx.nn.Conv2d(2, 3, (3, 5), dilation=(1, 2), padding="SAME", key=getkey()),
        eqx.nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, key=getkey()),
    ):
        rule(linear, key=getkey())


@pytest.mark.parametrize("rule", bfx.RULES)
def test_convert_refuses_a_model_with_nothing_to_convert(rule, getkey):
    norm = [eqx.nn.LayerNorm(4), jnp.ones(3), "not a layer"]
    with pytest.raises(ValueError, match="convert found no layer to wrap in the list"):
        bfx.convert(norm, rule, key=getkey(), error_features=2)
