"""mdpl.engine: Lightning training/evaluation engine (docs/methods.md §7-§9).

metrics (§8), losses (§7.5), optim (§7.3), schedule (§7.4), module (MDPLModule), trainer (build_trainer),
preparation (the preparation stage, with kmeans and topk).
Submodules are imported explicitly (e.g. `from mdpl.engine.module import MDPLModule`) to keep this import light.
"""
