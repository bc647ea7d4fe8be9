"""`kd`: see student.py."""

from . import student  # noqa: F401  (registers the method)
