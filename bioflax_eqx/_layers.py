"""Finding a model's layers: which are linear, which carry a rule, and which rule."""

import equinox as eqx
import jax
from jaxtyping import PyTree

from ._dfa import DFA
from ._registry import WRAPPERS
from ._rules import AbstractFeedback, AbstractRule


# The layers every rule knows how to wrap: linear in their input, with a `weight`.
# `eqx.nn.Conv1d/2d/3d` and `ConvTranspose1d/2d/3d` are subclasses of these.
LINEAR_LAYERS = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)


def is_linear_layer(x: object) -> bool:
    return isinstance(x, LINEAR_LAYERS)


def is_node(x: object) -> bool:
    """A linear layer, or a wrapper around one (a DFA around a block is not: the
    block's layers are the nodes)."""
    if isinstance(x, DFA):
        return is_linear_layer(x.layer)
    return is_linear_layer(x) or isinstance(x, AbstractRule)


def linear_layers(tree: PyTree) -> list:
    """The linear layers of a model, wrapped or not, in pytree order (each wrapper
    counts as its layer; the layers inside a DFA-wrapped block count one by one)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_node)
    return [x for x in leaves if is_node(x)]


def _is_feedback(x: object) -> bool:
    return isinstance(x, AbstractFeedback)


def rule_of(model: PyTree) -> str | None:
    """The rule of a model, read off its feedback layers: `"bp"` without any,
    `"dfa"` with only DFA's, the rule's name when every wrapper is of that one
    class (rule classes are final), and `None` for a mix or a rule of your own."""
    leaves = jax.tree_util.tree_leaves(model, is_leaf=_is_feedback)
    kinds = {type(x) for x in leaves if _is_feedback(x)}
    if not kinds:
        return "bp"
    if not any(issubclass(kind, AbstractRule) for kind in kinds):
        return "dfa"
    names = [rule for rule, cls in WRAPPERS.items() if kinds == {cls}]
    return names[0] if names else None
