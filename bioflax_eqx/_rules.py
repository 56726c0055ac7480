"""The one table that maps rule names to layers."""

from collections.abc import Callable

import equinox as eqx
from jaxtyping import PRNGKeyArray

from ._dfa import DFALinear
from ._linear import (
    AbstractFeedbackLinear,
    BRSFLinear,
    FALinear,
    FRSFLinear,
    KPLinear,
    USFLinear,
)


RULES: tuple[str, ...] = ("bp", "fa", "kp", "dfa", "usf", "brsf", "frsf")

# Every concrete layer shares FALinear's signature (the abstract base has none).
_FEEDBACK_LINEAR: dict[str, Callable[..., AbstractFeedbackLinear]] = {
    "fa": FALinear,
    "kp": KPLinear,
    "usf": USFLinear,
    "brsf": BRSFLinear,
    "frsf": FRSFLinear,
}

DenseLayer = eqx.nn.Linear | AbstractFeedbackLinear | DFALinear


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}.")


def rule_of(layer: DenseLayer) -> str:
    """The rule name of a dense layer (layer classes are final, so the exact type)."""
    if isinstance(layer, DFALinear):
        return "dfa"
    rules: dict[object, str] = {cls: rule for rule, cls in _FEEDBACK_LINEAR.items()}
    return rules.get(type(layer), "bp")


def make_linear(
    rule: str,
    in_features: int,
    out_features: int,
    use_bias: bool,
    dtype,
    *,
    error_features: int | None,
    feedback_scale: float,
    key: PRNGKeyArray,
) -> DenseLayer:
    """A fresh dense layer of the given rule (`eqx.nn.Linear` for `"bp"`)."""
    check_rule(rule)
    if rule == "bp":
        return eqx.nn.Linear(in_features, out_features, use_bias, dtype, key=key)
    if rule == "dfa":
        if error_features is None:
            raise ValueError("rule 'dfa' needs `error_features` (the output size).")
        return DFALinear(
            in_features,
            out_features,
            error_features,
            use_bias,
            dtype,
            feedback_scale=feedback_scale,
            key=key,
        )
    return _FEEDBACK_LINEAR[rule](
        in_features,
        out_features,
        use_bias,
        dtype,
        feedback_scale=feedback_scale,
        key=key,
    )
