"""Evaluation: what every evaluation reports and how runs are compared.

`evaluate` runs the loop over held-out tasks; `metrics` computes SCoRe's self-correction
metrics; `protocol` adds what a self-correction claim needs (intervals, the equal-budget
baseline, oracle labels, collapse); `compare` is the paired difference of two runs;
`report` draws a run's pictures; `seeds` aggregates a recipe's runs over seeds.

May import: the core modules, `data`, `training` and the agent (the loop, policies,
verifiers, feedback). Not the run machinery, serving or the commands (tests/test_layers.py)."""
