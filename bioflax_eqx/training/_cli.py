"""The `bioflax-eqx` command line: `train` one rule, or `compare` several; on one
device, several (`--devices`), or several hosts (`--distributed`); `sample` text
from a trained language model."""

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import jax

from .._registry import RULES
from ..data import DataNotFoundError
from ..data._download import cache_dir
from ._checkpoint import CheckpointError, read_header
from ._compare import compare, format_table, summary_line
from ._config import ConfigError, TrainConfig, field_type
from ._mesh import is_primary
from ._records import CONFIG_NAME
from ._run import DivergedError, train
from ._sample import sample_run


_DEFAULTS = TrainConfig()
# Fields with options of their own in each command (`train --rule`, `--out`).
_OWN = ("rule", "out")


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "on", "1"):
        return True
    if text.lower() in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"invalid bool value: {text!r} (true or false)")


def _options() -> list[tuple[str, dataclasses.Field]]:
    """`(flag, field)` for every TrainConfig field with its own option, in the
    config's order; type, choices and help come from the field."""
    return [
        (_flag(f.name), f)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in _OWN
    ]


def _add_run_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    # Options default to "not given" so that --resume can tell what was asked for.
    for flag, field in _options():
        kind, _ = field_type(field.type)
        parser.add_argument(
            flag,
            dest=field.name,
            type=_bool if kind is bool else kind,
            choices=field.metadata.get("choices"),
            default=argparse.SUPPRESS,
            metavar="BOOL" if kind is bool else None,
            help=f"{field.metadata['help']} (default: {field.default})",
        )
    parser.add_argument(
        "--out",
        dest="out",
        default=argparse.SUPPRESS,
        help=f"output folder (default: {default_out})",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a run already in --out"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not keep compiled programs in $XDG_CACHE_HOME/bioflax_eqx/xla (kept "
        "there by default, unless $JAX_COMPILATION_CACHE_DIR names another folder)",
    )
    # How the processes of a multi-host run find each other: not part of the run's
    # configuration (a checkpoint resumes under any launch).
    launch = parser.add_argument_group(
        "multi-host runs",
        "Run the same command in every process (one per host, or per GPU); each "
        "uses --devices of its local devices, and process 0 writes --out.",
    )
    launch.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first; on SLURM, Open MPI and "
        "Cloud TPU it finds its settings itself, elsewhere give the three options "
        "below (which imply --distributed)",
    )
    launch.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        help="where process 0 serves the coordinator (default: "
        "$JAX_COORDINATOR_ADDRESS, or detected)",
    )
    launch.add_argument(
        "--num-processes", type=int, metavar="N", help="processes in the run"
    )
    launch.add_argument(
        "--process-id", type=int, metavar="I", help="this process, 0 to N - 1"
    )


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The main parser, and each command's (whose `error` names the command)."""
    parser = argparse.ArgumentParser(
        prog="bioflax-eqx",
        description=(
            "Train networks without weight transport (FA, KP, WM, DFA, sign "
            "symmetry): MLPs, LeNet, a small VGG and ResNet-20 on MNIST, "
            "Fashion-MNIST, CIFAR-10 or synthetic tasks."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_parser = commands.add_parser(
        "train",
        help="train one rule",
        description="Train one rule; writes config.json, metrics.jsonl, a "
        "checkpoint, summary.json and plots to --out.",
    )
    train_parser.add_argument(
        "--rule",
        dest="rule",
        choices=RULES,
        default=argparse.SUPPRESS,
        help=f"learning rule (default: {_DEFAULTS.rule})",
    )
    _add_run_options(train_parser, "runs/<dataset>-<rule>-seed<seed>")
    compare_parser = commands.add_parser(
        "compare",
        help="train several rules on the same task and seed",
        description="Train several rules on the same task and seed, each into "
        "--out/<rule>; print one table and write comparison.json and "
        "comparison.png.",
    )
    compare_parser.add_argument(
        "--rules",
        nargs="+",
        choices=RULES,
        default=list(RULES),
        metavar="RULE",
        help=f"rules to compare (default: all: {' '.join(RULES)})",
    )
    _add_run_options(compare_parser, "runs/compare-<dataset>-seed<seed>")
    sample_parser = commands.add_parser(
        "sample",
        help="generate text from a trained language model",
        description="Continue --prompt by --length characters drawn from the "
        "last checkpoint of a transformer's run (seeded: the same seed, the "
        "same text), and print it.",
    )
    sample_parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder")
    sample_parser.add_argument(
        "--prompt", default="\n", help="text to continue (default: a newline)"
    )
    sample_parser.add_argument(
        "--length", type=int, default=300, help="characters to add (default: 300)"
    )
    sample_parser.add_argument(
        "--seed", type=int, default=0, help="seed of the draws (default: 0)"
    )
    sample_parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="> 0; lower is more conservative (default: 1.0)",
    )
    return parser, {
        "train": train_parser,
        "compare": compare_parser,
        "sample": sample_parser,
    }


def _config(args: argparse.Namespace, default_out: str) -> TrainConfig:
    """The configuration asked for; with --resume, the saved one updated by the
    options given."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    if args.resume and "out" in given:
        saved = pathlib.Path(given["out"]) / CONFIG_NAME
        if args.command == "compare":
            # The comparison's own folder has no config; any rule's will do.
            candidates = sorted(pathlib.Path(given["out"]).glob(f"*/{CONFIG_NAME}"))
            saved = candidates[0] if candidates else saved
        if saved.is_file():
            fields = json.loads(saved.read_text())
            fields.pop("out", None)
            if args.command == "compare":
                fields.pop("rule", None)
            given = {**fields, **given}
    if "out" not in given:
        given["out"] = default_out.format(**{**_DEFAULTS.to_dict(), **given})
    return TrainConfig(**given)


def _kept(config: TrainConfig, command: str) -> str:
    """What an interrupted run left in `config.out`, for the message."""
    if config.out is None or not is_primary():
        return "nothing was written."
    out = pathlib.Path(config.out)
    folders = [out]
    if command == "compare":
        folders = sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []
    kept = []
    for folder in folders:
        try:
            header, _ = read_header(folder)
        except CheckpointError:
            continue
        kept.append(f"{folder} at epoch {header['epoch']}")
    if not kept:
        return (
            "no epoch had finished, so no checkpoint was written: the same command "
            "starts afresh."
        )
    return f"checkpoint kept: {', '.join(kept)} (--resume continues from there)."


def _initialize_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` with the options given (the others detected),
    if any of the multi-host options is; before JAX starts its backends."""
    settings = {
        "coordinator_address": args.coordinator_address,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    if args.distributed or any(v is not None for v in settings.values()):
        jax.distributed.initialize(**settings)


def compile_cache_dir(disabled: bool) -> pathlib.Path | None:
    """The folder where `train` and `compare` keep XLA's compiled programs: JAX's
    persistent compilation cache in the user's cache folder, so that a second run
    of the same programs skips XLA's compilation (on CPU most of a short run's
    time). `None` if `disabled` or if JAX was given a folder of its own."""
    own = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    if disabled or own:
        return None
    return cache_dir("xla")


def _use_compile_cache(folder: pathlib.Path | None) -> None:
    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", str(folder))
        # Every program is kept: JAX's default keeps those over 1 s, but a LeNet run
        # also compiles ~40 small ones (the weight draws among them), 1.6 s together.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _sample(args: argparse.Namespace) -> int:
    """Prints the text that `bioflax-eqx sample` asks for; returns the status."""
    try:
        text = sample_run(
            args.run_dir,
            args.prompt,
            args.length,
            seed=args.seed,
            temperature=args.temperature,
        )
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"bioflax-eqx: error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser, commands = _parsers()
    args = parser.parse_args(argv)
    sub = commands[args.command]
    if args.command == "sample":
        return _sample(args)
    default_out = (
        "runs/{dataset}-{rule}-seed{seed}"
        if args.command == "train"
        else "runs/compare-{dataset}-seed{seed}"
    )
    try:
        config = _config(args, default_out)
    except ConfigError as e:
        sub.error(f"argument {_flag(e.field)}: {e.reason}")
    except (ValueError, TypeError) as e:
        sub.error(str(e))
    _use_compile_cache(compile_cache_dir(args.no_compile_cache))
    try:
        _initialize_distributed(args)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"bioflax-eqx: error: --distributed: {e}", file=sys.stderr)
        return 1
    try:
        if args.command == "train":
            result = train(
                config, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet
            )
            if not args.quiet and is_primary():
                print(summary_line(result))
        else:
            results = compare(
                config,
                args.rules,
                resume=args.resume,
                overwrite=args.overwrite,
                quiet=args.quiet,
            )
            if is_primary():
                print(format_table(results))
            if config.out is not None and not args.quiet and is_primary():
                print(f"written to {config.out}")
    except ConfigError as e:
        sub.error(f"argument {_flag(e.field)}: {e.reason}")
    except (
        FileExistsError,
        CheckpointError,
        DataNotFoundError,
        DivergedError,
        ValueError,
    ) as e:
        print(f"bioflax-eqx: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"bioflax-eqx: interrupted; {_kept(config, args.command)}", file=sys.stderr
        )
        return 130
    return 0
