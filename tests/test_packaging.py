"""A non-editable install (a wheel) carries every dataset card, class-name file and config."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(REPO)], check=True, capture_output=True, text=True)
    (out / "build.log").write_text(done.stdout + done.stderr)
    return next(out.glob("ovseg_bench-*.whl"))


def test_build_is_quiet(wheel):
    """setuptools warns (about 440 lines) for every data folder missing from `packages`."""
    log = (wheel.parent / "build.log").read_text()
    assert "BuildBackendWarning" not in log and "is absent from the `packages` configuration" not in log


def test_every_data_folder_is_a_declared_package():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    for init in (REPO / "ovseg_bench").rglob("__init__.py"):  # every Python package of the source tree
        name = ".".join(init.parent.relative_to(REPO).parts)
        assert name in declared, f"pyproject.toml [tool.setuptools] packages lacks {name}"
    for package, folder in (("ovseg_bench.configs", "configs"), ("ovseg_bench.cards", "datasets")):
        for sub in (p for p in (REPO / folder).rglob("*") if p.is_dir() and p.name != "__pycache__"):
            name = ".".join([package, *sub.relative_to(REPO / folder).parts])
            assert name in declared, f"pyproject.toml [tool.setuptools] packages lacks {name}"


def _shipped(folder: str, suffixes: tuple[str, ...]) -> set[str]:
    root = REPO / folder
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in suffixes}


def test_wheel_contains_every_card_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    cards = {f"ovseg_bench/cards/{p}" for p in _shipped("datasets", (".yaml", ".txt", ".png", ".jpg", ".json"))}
    configs = {f"ovseg_bench/configs/{p}" for p in _shipped("configs", (".yaml", ".txt"))}
    assert cards and configs
    assert cards <= names, sorted(cards - names)[:5]
    assert configs <= names, sorted(configs - names)[:5]
    assert "ovseg_bench/reported/reported.yaml" in names


def test_installed_package_finds_cards_configs_and_demo(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "from ovseg_bench.resources import cards_dir, configs_dir\n"
        "from ovseg_bench.datasets.cards import card_names, load_card\n"
        "from ovseg_bench.datasets.listing import list_samples\n"
        "from ovseg_bench.engine.protocol import load_protocol, protocol_names\n"
        "from ovseg_bench.methods.clip_family import load_method_config\n"
        "from ovseg_bench.methods.prompts import load_templates\n"
        "import ovseg_bench\n"
        "assert str(cards_dir()).startswith(ovseg_bench.__path__[0]), cards_dir()\n"
        "for n in card_names():\n"
        "    c = load_card(n)\n"
        "    if c.track == 'semantic': [c.class_synonyms(s) + c.prediction_synonyms(s) for s in c.classnames]\n"
        "[load_protocol(p) for p in protocol_names()]\n"
        "[load_method_config(m) for m in ('clip', 'maskclip', 'sclip', 'clearclip', 'naclip')]\n"
        "[load_templates(t) for t in ('tcl9', 'imagenet80', 'maskclip85')]\n"
        "assert len(list_samples(load_card('demo'), '/nonexistent')) == load_card('demo').num_images\n"
        "from ovseg_bench.leaderboard import load_reported, default_reported_path\n"
        "assert str(default_reported_path()).startswith(ovseg_bench.__path__[0]); load_reported()\n"
        "print(len(card_names()))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 9
