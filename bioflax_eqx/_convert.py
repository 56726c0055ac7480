import abc
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from ._dfa import DFA, Sequential
from ._layers import is_linear_layer, linear_layers
from ._mlp import MLP
from ._registry import WRAPPERS, check_rule
from ._rules import AbstractRule


_Model = TypeVar("_Model")


class AbstractDFAModel(eqx.Module):
    """A model that places its own DFA feedback points and threads the error channel
    in its `__call__` (e.g. [`bioflax_eqx.Transformer`][]).

    [`bioflax_eqx.convert`][] calls `with_dfa(None)` on it before converting it to
    any rule, so that no point is left to cut the chain, and `with_dfa(placement,
    key=..., feedback_scale=...)` to convert it to `"dfa"`.
    """

    @abc.abstractmethod
    def with_dfa(
        self,
        placement: str | None,
        *,
        key: PRNGKeyArray | None = None,
        feedback_scale: float = 1.0,
    ) -> "AbstractDFAModel":
        """This model with fresh DFA points at `placement` (a name the model
        defines), or with none for `placement=None`; every other parameter kept."""


def _is_wrapper(x: object) -> bool:
    return isinstance(x, AbstractRule | DFA)


def unwrap(model: _Model) -> _Model:
    """`model` with every rule wrapper replaced by the layer (or block) it wraps."""
    return jax.tree_util.tree_map(
        lambda x: unwrap(x.layer) if _is_wrapper(x) else x, model, is_leaf=_is_wrapper
    )


def _keys(key: PRNGKeyArray) -> Callable[[], PRNGKeyArray]:
    state = [key]

    def next_key():
        state[0], k = jax.random.split(state[0])
        return k

    return next_key


def _wrap(model: Any, rule: str, next_key, feedback_scale: float) -> Any:
    wrapper = WRAPPERS[rule]

    def wrap(x):
        if not is_linear_layer(x):
            return x
        return wrapper(x, feedback_scale=feedback_scale, key=next_key())

    return jax.tree_util.tree_map(wrap, model, is_leaf=is_linear_layer)


def _has_layers(x: object) -> bool:
    leaves = jax.tree_util.tree_leaves(x, is_leaf=is_linear_layer)
    return any(is_linear_layer(leaf) for leaf in leaves)


def _output_shape(layer: Any, shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    """One example's output shape, by tracing `layer` (no compute)."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    if isinstance(layer, eqx.nn.StatefulLayer) and layer.is_stateful():
        state = eqx.nn.State(layer)
        axis_name = getattr(layer, "axis_name", None)

        def call(xs):
            return jax.vmap(lambda xi: layer(xi, state)[0], axis_name=axis_name)(xs)

        return jax.eval_shape(call, jax.ShapeDtypeStruct((2, *shape), dtype)).shape[1:]
    return jax.eval_shape(lambda xi: layer(xi), x).shape


def _dfa_layers(
    layers: Sequence[Any],
    shape: tuple[int, ...] | None,
    dtype,
    error_features: int,
    next_key,
    feedback_scale: float,
) -> tuple[list[Any], tuple[int, ...] | None]:
    out = []
    for layer in layers:
        if isinstance(layer, eqx.nn.Sequential | Sequential):
            inner, shape = _dfa_layers(
                layer.layers, shape, dtype, error_features, next_key, feedback_scale
            )
            out.append(Sequential(inner))
            continue
        if _has_layers(layer):
            dense = isinstance(layer, eqx.nn.Linear)
            if shape is None and not dense:
                raise ValueError(
                    "converting to DFA needs `input_shape=` (one example's input "
                    "shape) to size the feedback of a "
                    f"{type(layer).__name__}, whose input size is not part of the "
                    "layer."
                )
            out.append(
                DFA(
                    layer,
                    error_features,
                    input_shape=None if dense else shape,
                    feedback_scale=feedback_scale,
                    key=next_key(),
                )
            )
        else:
            out.append(layer)
        if isinstance(layer, eqx.nn.Linear) and layer.out_features != "scalar":
            shape = (layer.out_features,)
        elif shape is not None:
            shape = _output_shape(layer, shape, dtype)
    return out, shape


def _to_dfa(
    model: Any,
    error_features: int,
    input_shape: Sequence[int] | None,
    next_key,
    feedback_scale: float,
) -> Any:
    shape = None if input_shape is None else tuple(input_shape)
    # Shapes are traced with inputs of the parameters' dtype.
    arrays = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    dtype = arrays[0].dtype if arrays else jax.dtypes.canonicalize_dtype(float)
    if isinstance(model, eqx.nn.Sequential | Sequential):
        layers, _ = _dfa_layers(
            model.layers, shape, dtype, error_features, next_key, feedback_scale
        )
        return Sequential(layers)
    if isinstance(model, eqx.nn.MLP | MLP):
        if isinstance(model, eqx.nn.MLP):
            model = MLP.from_eqx(model)
        layers = tuple(
            DFA(layer, error_features, feedback_scale=feedback_scale, key=next_key())
            for layer in model.layers  # pyright: ignore[reportAttributeAccessIssue]
        )
        return eqx.tree_at(lambda m: m.layers, model, layers)
    if _has_layers(model):
        raise ValueError(
            "convert(..., 'dfa') threads the error channel through an "
            "`eqx.nn.Sequential`, `bfx.Sequential`, `eqx.nn.MLP` or `bfx.MLP`, not "
            f"through a {type(model).__name__}: in a model of your own, wrap layers "
            "or blocks in `bfx.DFA` and thread the channel in its `__call__` (see "
            "the guide), or build the model from `bfx.Sequential`."
        )
    return model


def convert(
    model: _Model,
    rule: str,
    *,
    key: PRNGKeyArray | None = None,
    feedback_scale: float = 1.0,
    error_features: int | None = None,
    input_shape: Sequence[int] | None = None,
    placement: str | None = None,
) -> _Model:
    """A copy of any Equinox model with every linear layer trained by `rule`.

    Every `eqx.nn.Linear`, `eqx.nn.Conv*` and `eqx.nn.ConvTranspose*` anywhere in the
    pytree (inside `eqx.nn.Sequential`, lists, dicts, custom modules, the four
    projections of `eqx.nn.MultiheadAttention`) is wrapped in the rule's class
    ([`bioflax_eqx.FA`][], [`bioflax_eqx.KP`][], ...) with fresh feedback; weights
    and biases are kept, and norms, pooling, dropout and embeddings stay on
    backprop. A model that already uses a rule is unwrapped first, and
    `rule="bp"` returns the plain Equinox layers, bit for bit, which is how
    backprop's gradient at the same parameters is computed.

    For `rule="dfa"` the model must thread the error channel: an `eqx.nn.Sequential`
    becomes a [`bioflax_eqx.Sequential`][] whose linear layers, and blocks holding
    linear layers (Launay et al.'s macro placement), are wrapped in
    [`bioflax_eqx.DFA`][]; an `eqx.nn.MLP` becomes a [`bioflax_eqx.MLP`][]. Pass
    `error_features` (the output size) and, if the model has convolutions,
    `input_shape`. A [`bioflax_eqx.AbstractDFAModel`][] (the
    [`bioflax_eqx.Transformer`][]) places its own points: pass `placement` instead.

    **Arguments:**

    - `model`: any pytree.
    - `rule`: one of [`bioflax_eqx.RULES`][].
    - `key`: draws the new feedback; needed unless `rule` is `"bp"` or `"usf"`.
    - `feedback_scale`: scale of the new feedback (see each rule).
    - `error_features`: the network output size, for `rule="dfa"` only.
    - `input_shape`: one example's input shape, for `rule="dfa"` on models whose
        first layers are not dense (it sizes each layer's feedback).
    - `placement`: for `rule="dfa"` on an [`bioflax_eqx.AbstractDFAModel`][]
        only: where its points go (`"macro"` or `"micro"` for the Transformer).

    **Returns:**

    The converted model. A model without any linear layer, wrapped or not, is
    refused with a `ValueError`.
    """
    check_rule(rule)
    if not linear_layers(model):
        # Most likely the wrong object: returning it unchanged would hide that.
        raise ValueError(
            f"convert found no layer to wrap in the {type(model).__name__} passed: "
            "no `eqx.nn.Linear`, `eqx.nn.Conv*` or `eqx.nn.ConvTranspose*`, "
            "wrapped or not."
        )
    if key is None:
        if rule not in ("bp", "usf"):
            raise ValueError(f"converting to rule {rule!r} needs `key=`.")
        key = jax.random.key(0)  # unused: these rules draw nothing
    if placement is not None and rule != "dfa":
        raise ValueError(f"`placement=` is for rule 'dfa', not {rule!r}.")
    plain: Any = unwrap(model)
    if isinstance(plain, AbstractDFAModel):
        plain = plain.with_dfa(None)
        if rule == "dfa":
            if placement is None:
                raise ValueError(
                    f"converting a {type(plain).__name__} to 'dfa' needs "
                    "`placement=` (where its feedback points go)."
                )
            return plain.with_dfa(placement, key=key, feedback_scale=feedback_scale)
    elif placement is not None:
        raise ValueError(
            "`placement=` is for models that place their own DFA points "
            f"(`bfx.AbstractDFAModel`), not a {type(model).__name__}."
        )
    if rule == "bp":
        return plain
    next_key = _keys(key)
    if rule == "dfa":
        if error_features is None:
            raise ValueError("rule 'dfa' needs `error_features` (the output size).")
        return _to_dfa(plain, error_features, input_shape, next_key, feedback_scale)
    return _wrap(plain, rule, next_key, feedback_scale)
