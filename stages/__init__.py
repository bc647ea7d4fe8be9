"""Pipeline stages: each reads its settings, calls the library and writes artifacts.

One module per stage, kept thin; the CLI and `dvc.yaml` call these, never the library directly.
Every stage has one entry point of one shape, which `cli.run_stage` calls:

    def run(config: PktConfig, progress: bool = True, echo: Callable[[str], None] = print) -> dict

- `config` holds every input of the run, CLI flags included (the CLI turns them into config values,
  e.g. `pkt eval MODEL` sets `eval.model`), so a run is reproduced from its config alone. `report`,
  which reads only result folders, takes its own frozen `ReportConfig` in that place (depending on
  `config.py` would rerun it for any config change).
- `progress`: show progress bars (off for logs and tests).
- `echo`: where one-line messages for people go (`click.echo` from the CLI; `print` by default;
  a list's `append` in tests).
- returns a JSON-able summary of what was done (also what the CLI prints from); the stage writes its
  own artifacts. User errors raise pkt's own exceptions (`ConfigError`, `CacheError`, ...) with a
  message naming the file or key; the CLI prints it as one line (`pkt -v` adds the traceback).
"""
