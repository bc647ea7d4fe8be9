"""`seeking`: its teacher extra (teacher.py) and its method (student.py)."""

from . import student, teacher  # noqa: F401  (registers the method and the extra)
