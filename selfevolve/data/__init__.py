"""Data: where tasks and traces live.

`sources` reads tasks (the built-in suites, a user's file, a reasoning-gym family, the
trace store) into `Task`s with their splits; `arith` and `equations` are the tiny world's
seeded task families; `store` is the SQLite trace store (TraceStore); `traces` is the
`selfevolve traces` command over it.

May import: the core modules at the package's top (errors, types, files, ...). Nothing from
training, the agent, evaluation, serving or the commands (tests/test_layers.py)."""
