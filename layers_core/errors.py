"""One line of an exception, as every one-line error message of the library quotes it."""

from __future__ import annotations


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, Slurm before a kill): unwinds exactly like Ctrl-C (``app.main``
    raises it from its signal handler)."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first non-blank line of ``error``'s message (its class name if it has none), cut to
    ``limit`` characters with an ellipsis where given."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"
