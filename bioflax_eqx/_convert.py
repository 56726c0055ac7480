from typing import TypeVar

import equinox as eqx
import jax
from jaxtyping import PRNGKeyArray

from ._dfa import DFALinear
from ._linear import AbstractFeedbackLinear
from ._rules import check_rule, make_linear


_Model = TypeVar("_Model")


def _is_dense(x) -> bool:
    return isinstance(x, eqx.nn.Linear | AbstractFeedbackLinear | DFALinear)


def convert(
    model: _Model,
    rule: str,
    *,
    key: PRNGKeyArray | None = None,
    feedback_scale: float = 1.0,
    error_features: int | None = None,
) -> _Model:
    """A copy of any Equinox model with every dense layer replaced by `rule`'s layer.

    Each `eqx.nn.Linear` (or feedback layer) keeps its weight and bias and gets a
    fresh feedback matrix; `rule="bp"` turns feedback layers back into
    `eqx.nn.Linear` with the same weights, which is how backprop's gradient at the
    same parameters is computed. Layers are found anywhere in the pytree.

    For `rule="dfa"` the layers become [`bioflax_eqx.DFALinear`][], whose call threads
    an error channel: the model's `__call__` must open, pass and close it, as
    [`bioflax_eqx.MLP`][] does; pass `error_features` (the model's output size).

    **Arguments:**

    - `model`: any pytree.
    - `rule`: one of `"bp" | "fa" | "kp" | "dfa" | "usf" | "brsf" | "frsf"`.
    - `key`: draws the new feedback matrices; needed unless `rule` is `"bp"` or `"usf"`.
    - `feedback_scale`: scale of the new feedback (see each layer).
    - `error_features`: the network output size, for `rule="dfa"` only.

    **Returns:**

    The converted model.
    """
    check_rule(rule)
    if key is None:
        if rule not in ("bp", "usf"):
            raise ValueError(f"converting to rule {rule!r} needs `key=`.")
        key = jax.random.key(0)  # only used for weights that are then replaced
    layers = [
        x for x in jax.tree_util.tree_leaves(model, is_leaf=_is_dense) if _is_dense(x)
    ]
    keys = iter(jax.random.split(key, max(len(layers), 1)))

    def _convert(x):
        if not _is_dense(x):
            return x
        if x.in_features == "scalar" or x.out_features == "scalar":
            raise ValueError("convert does not support `eqx.nn.Linear` with 'scalar'.")
        new = make_linear(
            rule,
            x.in_features,
            x.out_features,
            x.bias is not None,
            x.weight.dtype,
            error_features=error_features,
            feedback_scale=feedback_scale,
            key=next(keys),
        )
        return eqx.tree_at(
            lambda layer: (layer.weight, layer.bias),
            new,
            (x.weight, x.bias),
            is_leaf=lambda leaf: leaf is None,
        )

    return jax.tree_util.tree_map(_convert, model, is_leaf=_is_dense)
