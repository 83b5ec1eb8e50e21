"""A documented experiment as data: its schema (spec.py) and the folder its runs and results live in (layout.py).

`fqtrun reproduce` (runs/reproduce.py) fills the folder; `fqtrun report` (report/experiment.py) reads it.
"""
