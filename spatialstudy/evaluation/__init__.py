"""Evaluation layer: one harness for the baselines and every method, above the models layer, below methods.

    eval         the harness and its CLI (`python -m spatialstudy.evaluation.eval --help`)
    predictions  prediction files: append-only rows, shards, locking, reading back

Answer extraction and scoring (spatialstudy.scoring) sit at the top level, shared with pretraining's held-out check.
Imports from spatialstudy.data, spatialstudy.models and the shared top-level modules; never from methods
(tests/test_imports.py).
"""
