"""Pipeline stages: each reads a `PktConfig`, calls the library and writes artifacts.

One module per stage, kept thin; the CLI and `dvc.yaml` call these, never the library directly.
"""
