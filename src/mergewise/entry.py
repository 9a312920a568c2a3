"""The ``mergewise`` console script. It installs the signal handlers and imports the CLI inside
one ``try``, so Ctrl-C or SIGTERM while the CLI is still loading (typer, rich, later torch)
prints one line instead of a traceback, and log records (leftovers removed, an interrupted swap
repaired) reach stderr as ``note:`` lines."""

from __future__ import annotations

import logging
import sys


class _Note(logging.Handler):
    """A log record as one stderr line, ``note: ...`` unless it names its own kind."""

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(record.getMessage().split())
        if not text.startswith(("warning: ", "note: ")):
            text = f"note: {text}"
        sys.stderr.write(f"{text}\n")


def main() -> None:
    from . import interrupts

    interrupts.install()
    logger = logging.getLogger("mergewise")
    if not logger.handlers:
        logger.addHandler(_Note())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        from .cli import app

        app()
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except SystemExit as exc:
        # typer turns an interrupt outside a command's own handler into a silent exit 130
        cause = _unreported_interrupt(exc)
        if cause is None:
            raise
        _interrupted(cause)


def _interrupted(exc: BaseException) -> None:
    from . import interrupts

    sys.stderr.write(f"{interrupts.describe(exc)}: nothing was written\n")
    sys.exit(interrupts.exit_code(exc))


def _unreported_interrupt(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt behind an exit, unless a command already printed its line."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, KeyboardInterrupt):
            return None if getattr(link, "reported", False) else link
        link = link.__cause__ or link.__context__
    return None


if __name__ == "__main__":
    main()
