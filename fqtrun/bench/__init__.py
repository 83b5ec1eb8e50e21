"""Benchmark models and the interleaved timing harness behind `fqtrun bench` (spec/performance.md).

settings.py (what to measure, quick mode), harness.py (interleaved timing, median ratios),
models.py (the models timed and their FQT / torchao copies), suite.py (the whole run -> result
dict), tables.py (that dict as rich tables).
"""
