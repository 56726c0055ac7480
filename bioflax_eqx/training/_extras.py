"""The trainer's optional extras (the `train` extra: tqdm's progress bar and
matplotlib's plots): used when installed, else skipped with one notice."""

import importlib.util
import sys

from ._config import TrainConfig


def _available(module: str) -> bool:
    # `sys.modules[name] = None` (how the tests hide a package) means "not there".
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_NOTICES: set[str] = set()


def _notice(message: str) -> None:
    """Prints `message` to stderr once per process."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"bioflax-eqx: {message}", file=sys.stderr)


def plots_available() -> bool:
    if _available("matplotlib"):
        return True
    _notice(
        "plots skipped: matplotlib is not installed (pip install 'bioflax_eqx[train]')."
    )
    return False


class _NoBar:
    """Stands in for a tqdm bar when tqdm is not installed or `quiet` is set."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        del n

    def set_postfix(self, postfix: dict[str, str], refresh: bool = True) -> None:
        del postfix, refresh


def progress(config: TrainConfig, initial: int, quiet: bool):
    """A progress bar over the run's epochs, from epoch `initial`."""
    if quiet:
        return _NoBar()
    if not _available("tqdm"):
        _notice(
            "no progress bar: tqdm is not installed (pip install 'bioflax_eqx[train]')."
        )
        return _NoBar()
    # Imported here: tqdm is an optional dependency (the `train` extra). Plain text
    # bars, also in notebooks (tqdm.auto warns there without ipywidgets).
    from tqdm import tqdm

    return tqdm(
        total=config.epochs,
        initial=initial,
        desc=f"{config.rule} {config.model} {config.dataset}",
        unit="epoch",
        dynamic_ncols=True,
    )
