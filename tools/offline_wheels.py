#!/usr/bin/env python
"""The wheels an offline machine lacks: for a GPU machine that has its own PyTorch stack but no package index.

Given what that machine has installed (``--have``: its ``pip list --format=freeze``, or one package name a line),
this downloads, on a machine that reaches the index, the wheels of every pin of ``requirements.txt`` it lacks,
and the dependencies of those it lacks too (their ``Requires-Dist``, markers evaluated for the target Python and
platform), all for the target's Python version and platform, without dependencies of their own (so nothing it has,
its CUDA build of torch above all, is replaced). On the offline machine:

  python -m pip install --no-index --no-deps --target /tmp/site WHEELS/*.whl && export PYTHONPATH=/tmp/site

Examples:
  python tools/offline_wheels.py --have have.txt --dest wheels                    # Python 3.12, manylinux x86-64
  python tools/offline_wheels.py --have have.txt --dest wheels --skip wandb,mlflow-skinny --python-version 3.11
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "linux_x86_64")


def read_have(text: str) -> set[str]:
    """Canonical names of what the target has: ``pip list --format=freeze`` lines or bare names (``#`` comments)."""
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(canonicalize_name(re.split(r"[\s=<>!~@;\[]", line, maxsplit=1)[0]))
    return names


def read_requirements(text: str) -> list[Requirement]:
    """The requirements of a ``requirements.txt`` (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


def target_environment(python_version: str) -> dict[str, str]:
    """The marker environment of the target: Linux x86-64 CPython of ``python_version`` (e.g. "3.12")."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def wheel_requires(wheel: Path, env: dict[str, str]) -> list[Requirement]:
    """The ``Requires-Dist`` of a wheel that apply on the target (no extras asked for)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode("utf-8")
    needs = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        try:
            req = Requirement(line.split(":", 1)[1].strip())
        except InvalidRequirement:
            continue
        if req.marker is None or Marker(str(req.marker)).evaluate(env):
            needs.append(req)
    return needs


def download(req: Requirement, dest: Path, python_version: str) -> Path:
    """One wheel for the target, its dependencies left out; the path of the file pip wrote."""
    before = set(dest.glob("*.whl"))
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            python_version, "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)),
            "-d", str(dest), f"{req.name}{req.specifier}"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: no wheel of {req} for Python {python_version} on Linux x86-64: "
                         f"{(done.stderr.strip().splitlines() or ['pip failed'])[-1]}")
    new = set(dest.glob("*.whl")) - before
    name = canonicalize_name(req.name)
    return next(iter(new), None) or next(w for w in dest.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == name)


def fetch(requirements: list[Requirement], have: set[str], dest: Path, python_version: str) -> list[Path]:
    """Every requirement the target lacks, then, breadth first, every dependency of a fetched wheel it lacks."""
    env = target_environment(python_version)
    queue = [r for r in requirements if r.marker is None or r.marker.evaluate(env)]
    seen, wheels = set(have), []
    while queue:
        req = queue.pop(0)
        if canonicalize_name(req.name) in seen:
            continue
        seen.add(canonicalize_name(req.name))
        wheel = download(req, dest, python_version)
        print(f"{req.name}: {wheel.name}", file=sys.stderr, flush=True)
        wheels.append(wheel)
        queue += wheel_requires(wheel, env)
    return wheels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--have", type=Path, required=True, help="the target's `pip list --format=freeze` (or names)")
    parser.add_argument("--dest", type=Path, required=True, help="folder for the wheels")
    parser.add_argument("--requirements", type=Path, default=ROOT / "requirements.txt")
    parser.add_argument("--python-version", default="3.12", help="the target's Python, major.minor (default 3.12)")
    parser.add_argument("--skip", default="", help="comma list of requirements not to fetch (e.g. optional loggers)")
    args = parser.parse_args(argv)
    for path in (args.have, args.requirements):
        if not path.is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return 2
    have = read_have(args.have.read_text(encoding="utf-8")) | read_have(args.skip.replace(",", "\n"))
    args.dest.mkdir(parents=True, exist_ok=True)
    wheels = fetch(read_requirements(args.requirements.read_text(encoding="utf-8")), have, args.dest,
                   args.python_version)
    print(f"{len(wheels)} wheels in {args.dest}; on the target: python -m pip install --no-index --no-deps --target "
          f"/tmp/site {args.dest}/*.whl && export PYTHONPATH=/tmp/site")
    return 0


if __name__ == "__main__":
    sys.exit(main())
