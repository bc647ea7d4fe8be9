"""The one message for a write that failed (a full disk, mostly), shared by the stages that resume."""

from __future__ import annotations


def write_failed(destination: str, error: OSError, intact: str) -> str:
    """What failed, what is safe (`intact`, a sentence), and how to go on."""
    return (f"writing to {destination} failed ({error}). {intact}; free space (or fix the error) and rerun the same "
            "command to resume.")
