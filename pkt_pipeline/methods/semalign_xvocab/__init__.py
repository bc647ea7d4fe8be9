"""`semalign-xvocab`: SemAlign across tokenizers (pkt's own extension). student.py (the Method), config.py
(its settings), vocabulary.py (the shared-string vocabulary)."""

from ..registry import register
from .config import SemAlignXVocabConfig
from .student import SemAlignXVocab

register("semalign-xvocab", config=SemAlignXVocabConfig, method=SemAlignXVocab)
