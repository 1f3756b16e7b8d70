"""tools/offline_wheels.py: what a machine without a package index lacks is fetched, with the dependencies it lacks,
and nothing it has (its torch above all). The download itself is replaced by a writer of small wheels."""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_offline_wheels", ROOT / "tools" / "offline_wheels.py")
ow = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ow)

# what each fake wheel requires (the Requires-Dist lines of its METADATA)
INDEX = {
    "sacred": ["docopt-ng<1.0,>=0.9", "jsonpickle>=2.2.0", "munch<5.0,>=2.5", "wrapt<2.0,>=1.0",
               "GitPython", "colorama>=0.4 ; platform_system == 'Windows'"],
    "open-clip-torch": ["torch>=2.0", "ftfy", "regex", "pytest ; extra == 'test'"],
    "gitpython": ["gitdb<5,>=4.0.1", "typing-extensions>=3.10.0.2 ; python_version < '3.10'"],
    "gitdb": ["smmap<6,>=3.0.1"],
    "ftfy": ["wcwidth"],
}


def _write_wheel(dest: Path, name: str) -> Path:
    wheel = dest / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0",
                      *(f"Requires-Dist: {r}" for r in INDEX.get(name, []))])
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-1.0.dist-info/METADATA", meta + "\n")
    return wheel


def test_have_reads_freeze_output_and_bare_names() -> None:
    text = "torch==2.11.0+cu130\nPyYAML==6.0\n# a comment\nopen_clip_torch @ file:///x.whl\nscikit-learn\n\n"
    assert ow.read_have(text) == {"torch", "pyyaml", "open-clip-torch", "scikit-learn"}


def test_wheel_requires_applies_markers_of_the_target(tmp_path: Path) -> None:
    wheel = _write_wheel(tmp_path, "gitpython")
    assert [r.name for r in ow.wheel_requires(wheel, ow.target_environment("3.12"))] == ["gitdb"]
    assert [r.name for r in ow.wheel_requires(wheel, ow.target_environment("3.9"))] == ["gitdb", "typing-extensions"]


def test_fetch_takes_what_is_missing_and_its_missing_dependencies(tmp_path: Path, monkeypatch) -> None:
    asked = []

    def download(req: Requirement, dest: Path, python_version: str) -> Path:
        asked.append(str(req))
        return _write_wheel(dest, ow.canonicalize_name(req.name))

    monkeypatch.setattr(ow, "download", download)
    requirements = ow.read_requirements(ROOT.joinpath("requirements.txt").read_text())
    have = ow.read_have("torch\ntorchvision\nsetuptools\npytorch-lightning\ntransformers\ntimm\nsafetensors\n"
                        "pyarrow\nnumpy\npandas\neinops\ntorchmetrics\npillow\nmatplotlib\ntensorboard\ntqdm\nwandb\n"
                        "mlflow-skinny\npytest\npackaging\nwrapt\nregex\n")
    wheels = ow.fetch(requirements, have, tmp_path, "3.12")
    assert [w.name.split("-")[0] for w in wheels] == ["sacred", "open_clip_torch", "docopt_ng", "jsonpickle", "munch",
                                                     "gitpython", "ftfy", "gitdb", "wcwidth", "smmap"]
    assert asked[:2] == ["sacred==0.8.7", "open_clip_torch==3.3.0"]        # the lock's pins, then the ranges asked
    assert "docopt-ng<1.0,>=0.9" in asked
    assert not any(a.startswith(("torch", "colorama", "pytest", "typing")) for a in asked)


@pytest.mark.parametrize("missing", ["have", "requirements"])
def test_a_missing_input_file_is_one_error_line(tmp_path: Path, missing: str, capsys) -> None:
    files = {"have": tmp_path / "have.txt", "requirements": tmp_path / "req.txt"}
    for name, path in files.items():
        if name != missing:
            path.write_text("torch\n")
    code = ow.main(["--have", str(files["have"]), "--requirements", str(files["requirements"]), "--dest",
                    str(tmp_path / "w")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {files[missing]} is not a file"]
    assert not (tmp_path / "w").exists()
