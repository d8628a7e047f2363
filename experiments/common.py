"""What every command-line entry point shares: one-line errors and warnings, exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from vi_seg_jax.errors import DataError
from vi_seg_jax.ops.conv_tuning import check_settings as check_conv_settings
from vi_seg_jax.parallel import DistributedConfig

EXIT_BAD_INPUT = 2


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def enable_compile_cache() -> None:
    """JAX's persistent compilation cache under the project cache folder, unless the user
    set `JAX_COMPILATION_CACHE_DIR`: a second run of a command skips most compilation."""
    import jax

    from vi_seg_jax.data.cache import cache_root

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax"))
    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> None:
    """Runs `main(argv)`; bad input ends the process with one line on stderr and exit code 2."""
    warnings.formatwarning = _one_line_warning
    enable_compile_cache()
    try:
        check_conv_settings()
        status = main(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


class _DefaultOnceFormatter(argparse.HelpFormatter):
    """Appends a flag's default to its help unless the help already states one, or there is
    none to state (None, or an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def make_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m {module}`: `doc`'s first paragraph as its description, and
    each flag's default stated once in `--help`."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc.split("\n\n")[0],
        formatter_class=_DefaultOnceFormatter,
    )


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """`--devices` and the flags that join a multi-process (multi-host) run."""
    add = parser.add_argument
    add(
        "--devices",
        type=int,
        help="data-parallel devices (default: all of them; in training, all that divide "
        "--batch-size evenly)",
    )
    add(
        "--distributed",
        action="store_true",
        help="join a multi-process run detected by JAX (Cloud TPU pod slice, SLURM, Open MPI)",
    )
    add("--coordinator-address", metavar="HOST:PORT", help="process 0's address (multi-node)")
    add("--num-processes", type=int, help="processes in the multi-process run")
    add("--process-id", type=int, help="this process's index, 0 .. --num-processes - 1")


def distributed_config(args: argparse.Namespace) -> DistributedConfig:
    return DistributedConfig(
        auto=args.distributed,
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
