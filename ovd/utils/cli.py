"""Shared plumbing of the ``tools/`` scripts: logging set-up and one-line errors for bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from ovd.errors import OVDError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def close_progress_bars() -> None:
    """Close the progress bars still drawn, so that what is printed next starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main``; an :class:`OVDError` becomes one ``error: …`` line on stderr (on a new line, below
    any progress bar) and exit code 2, a diverged training (``FloatingPointError``: a NaN or infinite loss,
    whose message says what to change) one ``error: …`` line and exit code 3."""
    try:
        return int(main(argv) or 0)
    except OVDError as e:
        close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130
