#!/usr/bin/env python
"""Convert a raw dataset folder into the Arrow files used for training (docs/methods.md §1.1-1.2, DATA.md).

Example:
    python make_arrow.py --dataset mmimdb --root /data/raw/mmimdb --out /data/arrow/mmimdb

Every mistake in the input (raw layout, output folder, a ``--strict`` stop, a split without rows) is printed
as one line ``make_arrow.py: error: ...`` with exit status 2, like argparse's own usage errors; set
``MDPL_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mdpl.data.registry import dataset_spec
from mdpl.data.writers import SplitReport, StrictModeError, default_workers, make_arrow, writer_datasets
from mdpl.errors import EXIT_USER_ERROR, UserInputError, debug_enabled

PROG = "make_arrow.py"

ALIASES = {"hateful_memes": "hatememes"}  # the reference CLI's spelling
#: the dataset-specific flags; which dataset takes which is its spec's writer_options (mdpl/data/registry.py).
DATASET_FLAGS = ("val_fraction", "seed", "train_file", "dev_file", "test_file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write one Arrow IPC file per split (<dataset>_<split>.arrow) from a raw dataset folder. "
                    "Bad samples (unreadable image, missing/malformed label json, bad jsonl line, non-UTF-8 "
                    "text) are skipped and listed; files appear only when every split succeeded. "
                    "Raw layouts and sources: DATA.md.",
        epilog="example: python make_arrow.py --dataset hatememes --root RAW/hateful_memes --out ARROW/hatememes "
               "--dev-file dev_seen.jsonl --test-file test_seen.jsonl")
    p.add_argument("--dataset", required=True, choices=[*writer_datasets(), *ALIASES],
                   help="which dataset the raw folder holds")
    p.add_argument("--root", required=True, type=Path, metavar="RAW", help="raw dataset folder (layout in DATA.md)")
    p.add_argument("--out", required=True, type=Path, metavar="ARROW_DIR",
                   help="output folder for the .arrow files (use it as the config key data_root)")
    p.add_argument("--strict", action="store_true",
                   help="stop with an error (exit code 2, nothing written) at the first bad sample instead of "
                        "skipping it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace arrow files of this dataset already in --out (atomically, once every split is "
                        "written); without it such files are refused")
    p.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="re-encode images so the longer side is <= N pixels (default: keep the original bytes)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that decode (and with --max-side re-encode) the images; the files are the "
                        f"same for every N (default: the usable CPU cores, at most 8; here {default_workers()})")
    p.add_argument("--skipped-log", type=Path, default=None, metavar="FILE",
                   help="also write every skipped sample (reason, file) to FILE")
    p.add_argument("--no-progress", action="store_true", help="hide the per-split progress bars")
    food = p.add_argument_group("food101 (only used when text.json/split.json are derived from texts/*_titles.csv)")
    food.add_argument("--val-fraction", type=float, default=None, metavar="F",
                      help="share of the train CSV used as val (default 0.1)")
    food.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the train/val split (default 0)")
    memes = p.add_argument_group("hatememes (jsonl file per split, relative to the folder holding the jsonl files)")
    memes.add_argument("--train-file", default=None, metavar="FILE", help="default train.jsonl")
    memes.add_argument("--dev-file", default=None, metavar="FILE", help="default dev.jsonl (e.g. dev_seen.jsonl)")
    memes.add_argument("--test-file", default=None, metavar="FILE",
                       help="default test.jsonl (e.g. test_seen.jsonl; needs labels)")
    return p


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Writer keyword options; dataset-specific flags given for another dataset are an error."""
    opts = {"strict": args.strict, "max_side": args.max_side, "progress": not args.no_progress,
            "overwrite": args.overwrite, "workers": args.workers}
    own = dataset_spec(args.dataset).writer_options
    for name in DATASET_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in own:
            parser.error(f"--{name.replace('_', '-')} does not apply to --dataset {args.dataset}")
        opts[name] = value
    return opts


def _write_skipped_log(path: Path, reports: list[SplitReport]) -> None:
    lines = [f"{r.split}\t{reason}\t{where}\t{detail}" for r in reports for reason, where, detail in r.skipped]
    try:
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except OSError as err:
        raise UserInputError(f"--skipped-log {path}: cannot write it ({err.strerror or err}); the arrow files "
                             "were written") from None


def _error_line(err: UserInputError) -> str:
    """The one line printed for a user error (the strict stop says how to continue)."""
    message = str(err)
    if isinstance(err, StrictModeError):
        message += " (nothing written; drop --strict to skip bad samples)"
    return f"{PROG}: error: {message}"


def _convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[SplitReport]:
    """Run the writer and the skipped-sample log; user errors propagate as UserInputError."""
    reports = make_arrow(args.dataset, args.root, args.out, **_options(args, parser))
    if args.skipped_log is not None:
        _write_skipped_log(args.skipped_log, reports)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.dataset = ALIASES.get(args.dataset, args.dataset)
    if args.max_side is not None and args.max_side < 1:
        parser.error("--max-side must be a positive number of pixels")
    if args.workers is None:
        args.workers = default_workers()
    elif args.workers < 1:
        parser.error("--workers must be at least 1")
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a folder; point it at the raw {args.dataset} dataset (see DATA.md)")
    try:
        reports = _convert(args, parser)
    except UserInputError as err:
        if debug_enabled():
            raise
        print(_error_line(err), file=sys.stderr)
        return EXIT_USER_ERROR
    for r in reports:
        print(f"wrote {r.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
