"""The runner's infrastructure: the stage contract and runner (`stage`), the registry, sharded Dask
execution with skip-completed, logging, progress and fault injection (`common`).

This package is left out of every stage's code version, by package: nothing here may decide what a stage
computes (text rules, statistics, model logic, plots live in library modules beside the stages, which are
fingerprinted like any code a stage calls; `tests/test_architecture.py` checks both)."""
