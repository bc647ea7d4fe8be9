"""Transfer across tokenizers: the student's own tokenization of a cached example, aligned with the teacher's.

    alignment.py  align_spans: two tokenizations of one conversation -> aligned token pairs and chunks (pure numpy)
    sources.py    content_spans (where each message's content lies in a render), align_example, align_cache

A cross-tokenizer method declares `Method.cross_tokenizer = True`; `pkt align` then accepts a student with
another vocabulary, builds `align_cache(cache, student_tokenizer)` once and the loader adds each batch's
`Batch.student` (`loader.StudentTokens`): the student's token ids and masks, and per example the aligned
pairs and chunks. Same-vocabulary methods never see any of it.
"""

from .alignment import Alignment, align_spans, content_cuts
from .sources import AlignedExample, align_cache, align_example, content_spans

__all__ = ["AlignedExample", "Alignment", "align_cache", "align_example", "align_spans", "content_cuts",
           "content_spans"]
