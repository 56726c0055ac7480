"""Many devices: the trainer's mesh, arrays placed on it, and which process writes."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._config import ConfigError, TrainConfig, check_batch_split


# The name of the one axis of the trainer's device mesh.
DATA_AXIS = "data"


def _check_local_devices(config: TrainConfig) -> None:
    local = jax.local_devices()
    if config.devices > len(local):
        simulate = (
            "; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{config.devices} simulates them"
            if local[0].platform == "cpu"
            else ""
        )
        raise ConfigError(
            "devices",
            f"asks for {config.devices} devices, but this process has "
            f"{len(local)} ({local[0].platform}){simulate}.",
        )


def make_mesh(config: TrainConfig) -> Mesh | None:
    """The mesh of `config.devices` local devices of every process, one axis
    (`DATA_AXIS`), or `None` for one device in one process (no sharding at all).
    Refuses a count this process does not have, and a batch that the devices of
    all processes do not divide."""
    _check_local_devices(config)
    processes = jax.process_count()
    if config.devices == 1 and processes == 1:
        return None
    total = config.devices * processes
    check_batch_split(
        config.batch_size,
        total,
        f"the {total} devices ({config.devices} in each of {processes} processes)",
    )
    # The same count from each process, in process order: every process builds the
    # same mesh.
    devices = []
    for process in range(processes):
        own = [d for d in jax.devices() if d.process_index == process]
        devices += own[: config.devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """The arrays of `tree` whole on every device of `mesh` (unchanged without one).

    Every process holds the same values (the same data set and model from the same
    seed, or the same checkpoint) and builds its own devices' copies from its own:
    nothing is sent between processes (`jax.device_put` would first check that
    they agree, by gathering every process's copy of the data set)."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, P())

    def place(x):
        if not eqx.is_array(x):
            return x
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x  # already there: the outputs of the last epoch
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = place(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree_util.tree_map(place, tree)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-host run)."""
    return jax.process_index() == 0
