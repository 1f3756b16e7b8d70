"""Experiments over many runs: the paper-reproduction matrix (``matrix``, ``tables``), its executor (``executor``),
the readers of run outputs (``results``), the reports (``summary``), cost estimates (``estimate``) and the
aggregation of evaluation sweeps (``aggregate``). ``scripts/reproduce.py`` and ``scripts/aggregate.py`` are
command-line shells over these modules."""
