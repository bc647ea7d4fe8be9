"""Evaluation of aligned students: benchmark loaders, scoring, and the sandbox for model-written code."""
