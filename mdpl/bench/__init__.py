"""The benchmark's measuring code (``scripts/bench.py`` is its command line): run configs and random-weight models
(``models``), synthetic batches (``batches``), FLOP counting (``flops``), the memory meter (``memory``), timed steps
and rows (``steps``), the input pipeline (``loader``) and the suite with its table (``suite``)."""
