"""Checks any batch source must pass, written against the `BatchSource` Protocol alone (no isinstance):
what the trainer may call, with the parameters it passes."""

from __future__ import annotations

import inspect

from pkt_pipeline.loader import Batch, BatchSource


def protocol_gaps(source: type, protocol: type = BatchSource) -> list[str]:
    """The Protocol's members `source` lacks or takes with other parameters (name and kind each)."""
    gaps = []
    for name, wanted in vars(protocol).items():
        if not inspect.isfunction(wanted) or name in ("__init__", "__subclasshook__"):
            continue
        have = getattr(source, name, None)
        if have is None:
            gaps.append(f"{source.__name__} lacks {name}")
            continue
        shape = [(p.name, p.kind) for p in inspect.signature(wanted).parameters.values()]
        if [(p.name, p.kind) for p in inspect.signature(have).parameters.values()] != shape:
            gaps.append(f"{source.__name__}.{name}{inspect.signature(have)} is not {name}{inspect.signature(wanted)}")
    return gaps


def drain(source: BatchSource, steps: int) -> tuple[list[Batch], list[Batch]]:
    """`steps` batches, then the same steps again from the position saved before them: what training and
    resuming do with a source, through the Protocol's members only."""
    with source:
        assert len(source) >= 1
        start = source.state_dict()
        first = list(source.batches(steps))
        source.load_state_dict(start)
        again = list(source.batches(steps))
    return first, again
