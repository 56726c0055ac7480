"""Clear errors: the wrappers' arguments, feedback replaced by tree surgery, a
missing key, a batch where an example belongs, layers that are not linear in their
input, models with nothing to convert; one message style for every check."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

import bioflax_eqx as bfx


# Every wrapper that takes one layer (DFA's points take other arguments).
WRAPPERS = [bfx.FA, bfx.KP, bfx.USF, bfx.FRSF, bfx.BRSF, bfx.WM]


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
