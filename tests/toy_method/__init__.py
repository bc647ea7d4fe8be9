"""`toy`: cross-entropy on the supervised tokens with label smoothing, a whole method in one folder.

The README's "How to add a method" walks through this folder; tests/test_toy_method.py installs it as a
plug-in (the `pkt.methods` entry-point group) and trains it through `pkt align`.
"""

from pkt_pipeline.methods import register

from .config import ToyConfig
from .student import ToyCE

register("toy", config=ToyConfig, method=ToyCE)
