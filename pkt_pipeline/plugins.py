"""Plug-ins through Python entry points: another installed package extends pkt by declaring one.

`[project.entry-points."pkt.methods"] mine = "my_pkg.module"` (likewise `pkt.tasks`): importing the
module registers what it defines. Each group is loaded once per process, on the first lookup of a
registry, so a plug-in costs nothing until a name is asked for.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points


@functools.cache
def load_entry_points(group: str) -> None:
    """Import every module declared in the entry-point `group` (once)."""
    for entry in entry_points(group=group):
        entry.load()
