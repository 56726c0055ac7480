"""A run between two epochs: the arrays its checkpoint holds, how a fresh run starts
and how a checkpoint restores one."""

import dataclasses
import pathlib
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._build import initial_model
from ._checkpoint import CheckpointError, load_state
from ._config import TrainConfig
from ._optimizer import optimizer, partition, tie_state, untied_state


@dataclasses.dataclass
class RunState:
    """A run between two epochs: what its checkpoint holds (the trained arrays,
    the model's state, the optimiser's state, the RNG; the history and time so
    far), and the rest of the model (`static`)."""

    params: PyTree
    static: PyTree
    state: Any
    opt_state: PyTree
    rng: PRNGKeyArray
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    characters: str | None = None  # a text data set's vocabulary

    @property
    def model(self) -> Any:
        return eqx.combine(self.params, self.static)

    def arrays(self) -> tuple[PyTree, PyTree, Array, Any]:
        """The arrays a checkpoint saves, in its order."""
        return self.params, self.opt_state, jax.random.key_data(self.rng), self.state


def fresh(
    config: TrainConfig,
    model_key: PRNGKeyArray,
    train_key: PRNGKeyArray,
    model: Any,
    state: Any,
    characters: str | None = None,
) -> RunState:
    """The run before its first epoch: the model built from `model_key` (or the
    custom `model` and `state`; a language model's output is the vocabulary of
    `characters` and the unknown symbol), the optimiser's initial state, and
    `train_key`."""
    vocab_size = None if characters is None else len(characters) + 1
    model, state = initial_model(config, model_key, model, state, vocab_size)
    params, static = partition(model)
    opt_state = optimizer(config).init(params)
    return RunState(params, static, state, opt_state, train_key, characters=characters)


def restore(
    config: TrainConfig, training: RunState, folder: pathlib.Path, payload: bytes
) -> RunState:
    """`training` (fresh, as the structure to load into) with the arrays of the
    checkpoint whose bytes are `payload`."""
    like = training.arrays()
    try:
        params, opt_state, rng_data, state = load_state(folder, payload, like)
    except CheckpointError:
        untied = untied_state(config, training.params)
        if untied is None:
            raise
        # Written before KP's feedback took its weight's update: the same run.
        like = (like[0], untied, *like[2:])
        params, opt_state, rng_data, state = load_state(folder, payload, like)
        opt_state = tie_state(opt_state, training.opt_state)
    rng = jax.random.wrap_key_data(rng_data)
    return dataclasses.replace(
        training, params=params, opt_state=opt_state, rng=rng, state=state
    )
