"""Every command the README, DATA.md and the documentation pages (docs/*.md) show still parses, so the docs cannot
drift from the code (docs/faithfulness.md, *The documentation*).

Commands are taken from shell code blocks and from inline code that starts with a program: `python run.py ...`,
`python make_arrow.py ...`, `python scripts/<name>.py ...`, `python -m mdpl...`, through `torchrun` / `srun`,
and `make <target>`. Shell variables set in the block (`ARGS="..."`, the first value of a `for` loop) are
expanded and `...` stands for "the rest as above", so it is dropped; an inline template with `<placeholder>`
words is not a command. Each is then checked without running it:

* `run.py ... with ...`: `run.py print_config with ...` in this process, through Sacred's own command line
  (named configs found, every key known, values parsed), plus the named-config order rule of run.py;
* `make_arrow.py`, `scripts/*.py`, `python -m mdpl...`: the script runs as `__main__` until its argparse parser
  has parsed the arguments, and stops there (`--help` counts as parsed);
* `make <target>`: the target is in the Makefile.

Python examples are compiled. The docs extra of pyproject.toml and docs/requirements.txt pin the same versions.
"""
from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "DATA.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
#: variables the docs use that a launcher sets (a SLURM array task id)
LAUNCHER_VARS = {"SLURM_ARRAY_TASK_ID": "1"}
#: how a command starts (a bare `make_arrow.py --out` in the prose names an option, not a command)
SHELL_PROGRAM = r"(?:python3?\s+(?:-m\s+mdpl\S*|\S+\.py)|torchrun|srun|make)"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
INLINE = re.compile(rf"`((?:\w+=\S+\s+)*{SHELL_PROGRAM}(?:\s[^`]*)?)`")
ASSIGNMENT = re.compile(r"^\w+=")
TEMPLATE = re.compile(r"<[^<>]+>")                   # `run.py with <task> <method> ...`: a template
FOR_LOOP = re.compile(r"^for\s+(\w+)\s+in\s+(.+?);\s*do\b(.*)$")


@dataclass(frozen=True)
class Command:
    """One command as the docs show it (`source`: file:line) and the argv it expands to."""
    argv: tuple[str, ...]
    source: str


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _expand(line: str, variables: dict[str, str], source: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name in variables:
            return variables[name]
        if name in LAUNCHER_VARS:
            return LAUNCHER_VARS[name]
        raise AssertionError(f"{source}: ${name} is set nowhere in its code block")
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, line)


def _tokens(line: str, variables: dict[str, str], source: str) -> list[list[str]]:
    """The commands of one shell line (split at &&, || and ;), each without its env prefix and without `...`."""
    commands, current = [], []
    for word in [*shlex.split(_expand(line, variables, source), comments=True), "&&"]:
        if word in ("&&", ";", "||"):
            while current and ASSIGNMENT.match(current[0]):   # NODE_RANK=0 python ...
                current = current[1:]
            if current:
                commands.append(current)
            current = []
        elif word != "...":
            current.append(word)
    return commands


def _logical_lines(body: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, text) of a block's lines, a line ending in a backslash joined with the next."""
    lines, pending, start = [], "", None
    for offset, raw in enumerate(body.split("\n")):
        start = first_line + offset if start is None else start
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append((start, (pending + raw).strip()))
        pending, start = "", None
    return lines


def _shell_block(body: str, path: Path, first_line: int) -> list[Command]:
    """Commands of a shell code block, with the variables set in the block expanded."""
    variables: dict[str, str] = {}
    commands = []
    for number, line in _logical_lines(body, first_line):
        source = f"{path.relative_to(ROOT)}:{number}"
        loop = FOR_LOOP.match(line)
        if loop:                                       # `for x in a b c; do cmd`: x = a
            variables[loop.group(1)] = shlex.split(loop.group(2))[0]
            line = loop.group(3).strip()
        if re.fullmatch(r"\w+=\S.*", line) and len(words := shlex.split(line, comments=True)) == 1:
            name, value = words[0].split("=", 1)       # ARGS="..."
            variables[name] = value
        elif re.match(rf"(?:\w+=\S+\s+)*{SHELL_PROGRAM}\b", line):
            commands += [Command(tuple(argv), source) for argv in _tokens(line, variables, source)]
    return commands


def doc_commands() -> list[Command]:
    """Every command of the docs, in order of appearance."""
    found = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        prose = text
        for block in FENCE.finditer(text):
            prose = prose.replace(block.group(0), "\n" * block.group(0).count("\n"))
            if block.group("lang") in SHELL_LANGS:
                body = "\n".join(line[len(block.group("indent")):] for line in block.group("body").splitlines())
                found += _shell_block(body, path, _line_of(text, block.start("body")))
        for span in INLINE.finditer(prose):
            source = f"{path.relative_to(ROOT)}:{_line_of(prose, span.start())}"
            commands = _tokens(" ".join(span.group(1).split()), {}, source)
            found += [Command(tuple(argv), source) for argv in commands
                      if len(argv) > 1 and not any(TEMPLATE.fullmatch(w) for w in argv)]   # `torchrun`: a name
    return found


def python_examples() -> list[tuple[str, str]]:
    """(source, code) of every ```python block."""
    examples = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            if block.group("lang") == "python":
                body = "\n".join(line[len(block.group("indent")):] for line in block.group("body").splitlines())
                examples.append((f"{path.relative_to(ROOT)}:{_line_of(text, block.start())}", body))
    return examples


def _program(argv: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(program, its arguments): 'run.py', 'make_arrow.py', 'scripts/x.py', '-m mdpl.x' or 'make'."""
    argv = list(argv)
    if argv[0] == "srun":                              # srun [options] python ...
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
    if argv[0] == "torchrun":                          # torchrun [options] script.py args
        argv = argv[next(i for i, w in enumerate(argv) if w.endswith(".py")):]
    if argv[0] in ("python", "python3"):
        argv = argv[1:]
        if argv[0] == "-m":
            return f"-m {argv[1]}", tuple(argv[2:])
    return argv[0], tuple(argv[1:])


COMMANDS = doc_commands()
BY_ARGV: dict[tuple[str, tuple[str, ...]], list[str]] = {}
for _command in COMMANDS:
    BY_ARGV.setdefault(_program(_command.argv), []).append(_command.source)
RUN_COMMANDS = sorted(k for k in BY_ARGV if k[0] == "run.py")
SCRIPT_COMMANDS = sorted(k for k in BY_ARGV if k[0] not in ("run.py", "make"))
MAKE_COMMANDS = sorted(k for k in BY_ARGV if k[0] == "make")


def _ids(keys) -> list[str]:
    return [f"{BY_ARGV[k][0]}" for k in keys]


def test_the_docs_show_commands_of_every_kind() -> None:
    """The extraction finds the commands: an extractor that found nothing would pass every check below."""
    programs = {program for program, _ in BY_ARGV}
    assert {"run.py", "make_arrow.py", "scripts/reproduce.py", "scripts/bench.py", "scripts/aggregate.py",
            "scripts/bench_make_arrow.py", "-m mdpl.data.synthetic", "make"} <= programs
    assert len(RUN_COMMANDS) >= 15 and len(SCRIPT_COMMANDS) >= 15
    readme = {s.split(":")[0] for sources in BY_ARGV.values() for s in sources}
    assert {"README.md", "DATA.md", "docs/training.md", "docs/reproducing.md", "docs/scale-out.md"} <= readme
    # a multi-line command, a variable of its block and a torchrun launch are read whole
    assert any("num_nodes=2" in a and "task_finetune_mmimdb" in a for _, a in RUN_COMMANDS)
    assert any("--cells" in a and "1/54" in a for _, a in SCRIPT_COMMANDS)


@pytest.mark.parametrize("key", RUN_COMMANDS, ids=_ids(RUN_COMMANDS))
def test_run_command_parses(key, capsys) -> None:
    """`run.py <args>` resolves as `run.py print_config <args>`: named configs exist, every key is known."""
    import run   # noqa: F401  (run.py's Sacred settings: no output capture)
    from config import check_named_configs, ex

    _, args = key
    args = list(args)
    assert "with" in args, f"{BY_ARGV[key][0]}: a run.py command names its configs after `with`"
    command = args[:args.index("with")] or ["print_config"]
    assert command in (["print_config"], ["print_config", "-u"]), f"{BY_ARGV[key][0]}: unexpected command {command}"
    updates = args[args.index("with") + 1:]
    check_named_configs([u for u in updates if "=" not in u])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ex.run_commandline(["run.py", "print_config", "with", *updates])
        except SystemExit as stop:
            pytest.fail(f"{', '.join(BY_ARGV[key])}: `run.py print_config with {' '.join(updates)}` "
                        f"failed ({stop.code}): {capsys.readouterr().err.strip()[-800:]}")
    assert "prompt_method" in capsys.readouterr().out


class _Parsed(Exception):
    """Raised right after a script's parser has parsed its arguments: nothing of the script runs."""


@pytest.mark.parametrize("key", SCRIPT_COMMANDS, ids=_ids(SCRIPT_COMMANDS))
def test_script_command_parses(key, monkeypatch, capsys) -> None:
    """The script's own argparse parser accepts the arguments (its main stops right after parsing)."""
    program, args = key
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    where = ", ".join(BY_ARGV[key])
    if program.startswith("-m "):
        monkeypatch.setattr(sys, "argv", [program[3:], *args])
        run = lambda: runpy.run_module(program[3:], run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        script = ROOT / program
        assert script.is_file(), f"{where}: {program} does not exist"
        monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])   # as `python <script>` puts it first
        monkeypatch.setattr(sys, "argv", [str(script), *args])
        run = lambda: runpy.run_path(str(script), run_name="__main__")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run()
        except _Parsed:
            return
        except SystemExit as stop:
            if stop.code in (0, None) and "--help" in args:
                return
            pytest.fail(f"{where}: `{program} {' '.join(args)}` does not parse: {capsys.readouterr().err.strip()}")
    pytest.fail(f"{where}: `{program}` returned without parsing arguments with argparse")


@pytest.mark.parametrize("key", MAKE_COMMANDS, ids=_ids(MAKE_COMMANDS))
def test_make_target_exists(key) -> None:
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))
    missing = [t for t in key[1] if not t.startswith("-") and t not in targets]
    assert missing == [], f"{', '.join(BY_ARGV[key])}: no Makefile target {missing}"


@pytest.mark.parametrize(("source", "code"), python_examples(), ids=[s for s, _ in python_examples()])
def test_python_example_compiles(source, code) -> None:
    compile(code, source, "exec")


def test_docs_extra_matches_the_docs_lock() -> None:
    """`pip install -e .[docs]` and `make docs` (docs/requirements.txt) install the same documentation tools."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    lock = {}
    for line in (ROOT / "docs" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version
    for requirement in extra:
        name, version = requirement.split("==")
        assert lock.get(name.split("[")[0].lower()) == version, f"docs extra {requirement} vs docs/requirements.txt"
    assert {"mkdocs", "mkdocs-material", "mkdocstrings", "mkdocstrings-python"} <= set(lock)
