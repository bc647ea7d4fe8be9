"""pkt: cross-scale parametric knowledge transfer from a teacher LM to a smaller student.

The library holds reusable pieces (model loading, pinned assets, data location, config);
`stages/` orchestrates them and `pkt` (see `pkt --help`) is the command line over the stages.
"""

__version__ = "0.1.0"
