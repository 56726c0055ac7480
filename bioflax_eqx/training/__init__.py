"""The experiment harness: the configuration of a run, the compiled epoch loop,
runs with checkpoints and bit-identical resume, comparisons of rules, plots and the
`bioflax-eqx` command line. Everything public is also exported by `bioflax_eqx`
itself (`bfx.train`, `bfx.TrainConfig`, ...).

One job per module: `_config` (the configuration and its checks; `_fields`, the
machinery of its fields), `_epoch` (one compiled epoch, public), `_build` (a run's
data and initial model), `_mesh` (many devices), `_optimizer` (schedule, optimiser,
what it trains), `_losses`, `_compiled` (the trainer's compiled epoch and
evaluation), `_records` (a run's
files and summary), `_language` (a language model's corpus, evaluation and
records), `_checkpoint`, `_run_state` (a run between epochs: its fresh start and
its restore from a checkpoint), `_run` (`train`, `load_run`), `_sample` (text from a
trained language model), `_compare`, `_extras` (progress bar and plots when
installed), `_plots`, `_cli`."""

from ._checkpoint import CheckpointError as CheckpointError
from ._compare import compare as compare
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
from ._losses import (
    cross_entropy as cross_entropy,
    sigmoid_cross_entropy as sigmoid_cross_entropy,
    squared_error as squared_error,
)
from ._plots import training_curve as training_curve
from ._records import TrainResult as TrainResult
from ._run import (
    DivergedError as DivergedError,
    load_run as load_run,
    train as train,
)
from ._sample import sample as sample
