#!/usr/bin/env python
"""The GPU check: one command, under 8 minutes on one H100/H200-class GPU, writing ``gpu_check.json`` and
``gpu_check.md`` (the README's GPU table) into ``--out``. The plan and its steps: ``mdpl/bench/gpu_check.py``.

Examples:
  python scripts/gpu_check.py --device cuda --out gpu_check --refs REFS_DIR   # the GPU run (references beside)
  python scripts/gpu_check.py --device cpu --tiny --out /tmp/gpu_check_dry    # the same code path, tiny sizes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mdpl.bench.gpu_check import BUDGET_S, MIN_STEP_S, ORDER as STEPS, gpu_check  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json / gpu_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (the check) | cpu (with --tiny: the dry run)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and few steps (the CPU dry run)")
    parser.add_argument("--refs", type=Path, help="folder of reference checkouts (tests/fixtures/README.md); "
                                                  "without it the reference step is left out")
    parser.add_argument("--only", help=f"comma list of steps to run ({', '.join(STEPS)})")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"seconds for the whole check (default {BUDGET_S}); steps run in the order above, each "
                             f"gets at most what is left, and one that would get under {MIN_STEP_S} s is skipped")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        print("error: --budget-s must be positive", file=sys.stderr)
        return 2
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    if only and set(only) - set(STEPS):
        print(f"error: unknown step(s) {', '.join(sorted(set(only) - set(STEPS)))}; choose from {', '.join(STEPS)}",
              file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available (the CPU dry run: --device cpu --tiny)",
                  file=sys.stderr)
            return 2
    result = gpu_check(args.out, args.device, args.tiny, args.refs, only, args.budget_s)
    failed = [n for n, s in result["steps"].items() if s.result["status"] != "ok"]
    if failed:
        print(f"error: step(s) {', '.join(failed)} did not finish; see {args.out / 'gpu_check.json'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
