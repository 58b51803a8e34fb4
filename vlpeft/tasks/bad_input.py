"""Bad-input handling shared by every task loader.

A loader meets bad input when an image file is missing or cannot be decoded, a record lacks a field or has
the wrong type, a label/answer is outside the allowed set, a split holds no records, or a sequence exceeds the
maximum length where it cannot be cut (e.g. inside its image placeholders). The
:class:`BadInputPolicy` decides what happens:

- ``on_error="raise"`` (default): raise :class:`BadInputError` whose message names the file and the record.
- ``on_error="skip"``: leave the item out, count it under its reason, and keep the first few messages so that
  :meth:`BadInputPolicy.report` can say exactly what was skipped. Nothing is dropped without being counted.
- ``on_error="warn"``: skip and count as ``"skip"`` does, and also log one warning (naming the item) the first time
  each reason occurs, so a run's log shows each kind of bad input as soon as it is met.

The config key ``task.bad_input`` (``raise``, ``skip`` or ``warn``) selects the policy of a ``vlpeft`` run; the
error raised under ``"raise"`` names that key as the way to skip such items.

One policy object may be shared by several datasets; its counts then cover all of them.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

BadInputMode = Literal["raise", "skip", "warn"]
#: The allowed ``on_error`` values (the values of the config key ``task.bad_input``).
BAD_INPUT_MODES: tuple[str, ...] = ("raise", "skip", "warn")
#: Appended to every error raised under ``on_error="raise"``: how to skip such items instead.
SKIP_HINT = "set task.bad_input: skip (or warn) in the config to skip and count such items"

logger = logging.getLogger(__name__)

#: Every reason a loader may report. Counting under any other name is a programming error.
BAD_INPUT_REASONS: tuple[str, ...] = (
    "missing_image",
    "corrupt_image",
    "malformed_record",
    "unknown_label",
    "answer_not_in_vocab",
    "empty_split",
    "too_long",
)


class BadInputError(ValueError):
    """Raised for bad input; ``reason`` is one of :data:`BAD_INPUT_REASONS`."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BadInputPolicy:
    """Raise on bad input, or (opt-in) skip it while counting every skip per reason.

    Args:
        on_error: ``"raise"``, ``"skip"`` or ``"warn"`` (skip, count, and log a warning at the first item of each
            reason).
        keep_examples: how many messages to keep per reason for :meth:`report`.
    """

    def __init__(self, on_error: BadInputMode = "raise", keep_examples: int = 3) -> None:
        if on_error not in BAD_INPUT_MODES:
            raise ValueError(f"on_error must be one of {list(BAD_INPUT_MODES)}, got {on_error!r}")
        if keep_examples < 0:
            raise ValueError(f"keep_examples must be >= 0, got {keep_examples}")
        self.on_error = on_error
        self.keep_examples = keep_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    @property
    def skipping(self) -> bool:
        """Whether bad items are left out (``"skip"`` and ``"warn"``) rather than raised."""
        return self.on_error != "raise"

    @property
    def total(self) -> int:
        """Number of items skipped so far, over all reasons."""
        return sum(self.counts.values())

    def handle(self, reason: str, message: str) -> None:
        """Raise :class:`BadInputError`, or count one skipped item under ``reason``."""
        if reason not in BAD_INPUT_REASONS:
            raise ValueError(f"unknown bad-input reason {reason!r}; expected one of {BAD_INPUT_REASONS}")
        if self.on_error == "raise":
            raise BadInputError(f"{message} ({SKIP_HINT})", reason)
        if self.on_error == "warn" and not self.counts.get(reason):
            logger.warning("bad input (%s), skipped and counted (task.bad_input: warn): %s", reason, message)
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.keep_examples:
            kept.append(message)

    def report(self) -> str:
        """Human-readable summary: total skipped, exact count per reason, and example messages."""
        if not self.counts:
            return "bad input: nothing skipped"
        lines = [f"bad input: skipped {self.total} item(s)"]
        for reason in BAD_INPUT_REASONS:
            n = self.counts.get(reason, 0)
            if n:
                lines.append(f"  {reason}: {n}")
                lines.extend(f"    e.g. {m}" for m in self.examples.get(reason, []))
        return "\n".join(lines)

    def log_report(self) -> None:
        """Log :meth:`report` as a warning when anything was skipped."""
        if self.counts:
            logger.warning(self.report())

    def __repr__(self) -> str:
        return f"BadInputPolicy(on_error={self.on_error!r}, skipped={dict(self.counts)})"
