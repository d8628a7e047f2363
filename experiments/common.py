"""What every command-line entry point shares: one-line errors and warnings, exit code 2."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

from vi_seg_jax.errors import DataError

EXIT_BAD_INPUT = 2


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def run_cli(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> None:
    """Runs `main(argv)`; bad input ends the process with one line on stderr and exit code 2."""
    warnings.formatwarning = _one_line_warning
    try:
        status = main(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
