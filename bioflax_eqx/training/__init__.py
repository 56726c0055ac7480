"""The experiment harness: the configuration of a run, the compiled epoch loop,
runs with checkpoints and bit-identical resume, the trainer's networks, plots and
the `bioflax-eqx` command line. Everything public is also exported by
`bioflax_eqx` itself (`bfx.train`, `bfx.TrainConfig`, ...)."""

from ._checkpoint import CheckpointError as CheckpointError
from ._config import (
    DATASETS as DATASETS,
    MODELS as MODELS,
    ConfigError as ConfigError,
    TrainConfig as TrainConfig,
)
from ._epoch import (
    train_epoch as train_epoch,
    train_epoch_with_state as train_epoch_with_state,
)
from ._models import (
    ResidualBlock as ResidualBlock,
    lenet as lenet,
    resnet20 as resnet20,
    vgg as vgg,
)
from ._run import (
    DivergedError as DivergedError,
    TrainResult as TrainResult,
    compare as compare,
    load_run as load_run,
    train as train,
)
