"""Regenerate every reference fixture under tests/fixtures/ (one fresh process per generator).

    python tools/parity/make_all.py --refs REFS_DIR --tf4-python PYTHON [--check]

REFS_DIR holds the checkouts of the references at their pinned commits (tools/parity/common.py lists them; a
missing or moved checkout is reported with the ``git clone`` / ``git checkout`` lines to run). Each generator runs in
its own process, so the references' generic package names (``vilt``, ``src``, ``clip``) never meet. Generators
marked ``TF4`` (MoRA: its vendored CLIP fails on transformers 5, MoRA-D16; AOEPT: AOEPT-D13, and its clustering
needs scikit-learn) run under ``--tf4-python``, an interpreter with transformers 4.x, scikit-learn and this project's
other packages; the others under this one.
``--check`` writes into a temporary folder and compares byte for byte with the committed files instead.
"""
from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REFERENCES, CheckoutError, fixtures_dir, verify_checkout

HERE = Path(__file__).resolve().parent
TF4 = "tf4"
"""Marks a generator that needs transformers 4.x (run with ``--tf4-python``)."""
# (script, extra arguments, files it writes[, TF4])
GENERATORS = (
    ("make_map.py", [], [f"ref_map_{t}_{c}.pt" for t in ("input", "attention") for c in "AB"]),
    ("make_memprompt.py", [], [f"ref_memprompt_{c}.pt" for c in "AB"]),
    ("make_dcp.py", [], ["ref_dcp_tiny.pt"]),
    ("make_scp.py", [], [f"ref_scp_{c}.pt" for c in "AB"]),
    ("make_mora.py", [], [f"ref_mora_{c}.pt" for c in "AB"], TF4),
    ("make_msps.py", [], [f"ref_msps_{c}.pt" for c in "AB"]),
    ("make_ragpt.py", [], [f"ref_ragpt_{c}.pt" for c in "AB"]),
    ("make_aoept.py", [], [f"ref_aoept_{c}.pt" for c in "AB"], TF4),
    ("make_aoept_prototypes.py", [], [f"ref_aoept_prototypes_{c}.pt" for c in "AB"], TF4),
    ("make_aoept_vilt.py", [], [f"ref_aoept_vilt_{c}.pt" for c in "AB"], TF4),
    *((("make_reference_checkpoints.py", ["--method", m], [f"ref_ckpt_{m}.pt"]) for m in ("map", "memprompt", "dcp"))),
)


def tf4_problem(python: Path | None) -> str:
    """Why `python` cannot run the TF4 generators ("" when it can: it runs and imports transformers 4.x)."""
    if python is None:
        return "error: --tf4-python PYTHON is required: make_mora.py needs an interpreter with transformers 4.x"
    probe = [str(python), "-c", "import transformers; print(transformers.__version__)"]
    sklearn = [str(python), "-c", "import sklearn"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True)
    except OSError as err:
        return f"error: --tf4-python {python} cannot run ({err})"
    version = done.stdout.strip()
    if done.returncode != 0 or not version.startswith("4."):
        found = f"transformers {version}" if done.returncode == 0 else "no importable transformers"
        return f"error: --tf4-python {python} has {found}; it needs transformers 4.x (4.57.1 tested)"
    if subprocess.run(sklearn, capture_output=True).returncode != 0:
        return f"error: --tf4-python {python} has no scikit-learn; make_aoept_prototypes.py needs it (the reference " \
               f"clusters with it)"
    return ""


def interpreter(entry: tuple, tf4_python: Path | None) -> str:
    """The Python that runs generator `entry`."""
    return str(tf4_python) if entry[3:] == (TF4,) else sys.executable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", required=True, type=Path, help="folder holding the reference checkouts")
    parser.add_argument("--tf4-python", type=Path, default=None,
                        help="interpreter with transformers 4.x for the generators that need it (make_mora.py)")
    parser.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare")
    args = parser.parse_args(argv)
    needs_tf4 = any(entry[3:] == (TF4,) for entry in GENERATORS)
    problems = [tf4_problem(args.tf4_python)] if needs_tf4 else []
    problems = [p for p in problems if p]
    for key in REFERENCES:
        try:
            verify_checkout(args.refs, key)
        except CheckoutError as err:
            problems.append(str(err))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if args.check else fixtures_dir()
        for entry in GENERATORS:
            script, extra = entry[0], entry[1]
            cmd = [interpreter(entry, args.tf4_python), str(HERE / script), "--refs", str(args.refs), "--out", str(out),
                   *extra]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"error: {' '.join(cmd[1:])} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            print(done.stdout.strip().splitlines()[-1] if len(extra) else done.stdout.strip())
        if args.check:
            names = [name for entry in GENERATORS for name in entry[2]]
            differ = [n for n in names if not filecmp.cmp(out / n, fixtures_dir() / n, shallow=False)]
            if differ:
                print(f"error: regenerated files differ from tests/fixtures/: {', '.join(differ)}", file=sys.stderr)
                return 1
            print(f"all {len(names)} fixtures regenerated byte for byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
