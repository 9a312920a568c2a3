"""One exception type per user-facing failure.

Every message names the file, the tensor and the fix, on one line, so the CLI can print it as is
and exit non-zero without a traceback.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable


class MergewiseError(Exception):
    """Base class of every error a user can cause (bad recipe, bad checkpoint, bad output path)."""


class RecipeError(MergewiseError):
    """The recipe is invalid: unknown key, wrong type, impossible value, unknown method."""


class CheckpointError(MergewiseError):
    """A checkpoint cannot be read: missing, not a checkpoint, corrupt, unsafe pickle."""


class ShapeMismatchError(MergewiseError):
    """Experts do not match the base: missing tensors, other shapes, other architecture."""


class NonFiniteError(MergewiseError):
    """A NaN or Inf was found in an input tensor or produced by a method."""


class OutputError(MergewiseError):
    """The output path exists (without --overwrite) or cannot be written."""


class ModulatorError(MergewiseError):
    """Per-task modulators (EMR) are missing, corrupt, or do not match the unified model/base."""


class UnknownTaskError(MergewiseError):
    """A task name that the modulators (or the merge's models) do not contain."""


class FeatureError(MergewiseError):
    """Calibration features cannot be captured or used: missing data or stats file, a stats file
    from another model, a layer whose statistics do not fit its tensor."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name when it has none),
    cut to ``limit`` characters: third-party errors become one readable clause of ours."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest of ``known`` to a mistyped ``key``, else ""."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def printable(text: str, limit: int = 120) -> str:
    """Text taken from an input file (a tensor name, a pickle's global), made safe for a one-line
    message: newlines, terminal escapes and other unprintable characters are shown escaped, and
    the text is cut to ``limit`` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit + 1])
    return out if len(out) <= limit else out[:limit - 3] + "..."


class _BoundedRepr(reprlib.Repr):
    """reprlib with bounded work on any value: huge ints are shown by their size (``repr`` of
    an int over 4300 digits raises), nesting and long containers are cut."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


_REPR = _BoundedRepr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 3, 6, 6, 4
_REPR.maxstring, _REPR.maxother = 80, 40


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` in at most ``limit`` characters, in time bounded whatever the value (an
    alias bomb, a 10 MB string): every user value echoed in an error goes through this."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__; only its type is safe to show
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else text[:limit - 3] + "..."


def quoted(name: str) -> str:
    """A name from a file, quoted for a one-line message."""
    return f"'{printable(name)}'"
