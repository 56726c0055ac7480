"""The rules by name: `"bp"`, `"dfa"` and the wrappers' names, as
[`bioflax_eqx.convert`][], [`bioflax_eqx.MLP`][] and the trainer take them."""

from collections.abc import Callable

from ._rules import FA, KP, WM, AbstractRule
from ._sign import BRSF, FRSF, USF


RULES: tuple[str, ...] = ("bp", "fa", "kp", "wm", "dfa", "usf", "brsf", "frsf")


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}.")


# Every rule but backprop and DFA wraps a layer alike.
WRAPPERS: dict[str, Callable[..., AbstractRule]] = {
    "fa": FA,
    "kp": KP,
    "wm": WM,
    "usf": USF,
    "brsf": BRSF,
    "frsf": FRSF,
}
