"""What a packager relies on: one version, a license, declared imports, constraints that match the tested set."""

import ast
import configparser
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import bklit

ROOT = Path(__file__).resolve().parent.parent
BKLIT = os.path.join(os.path.dirname(sys.executable), "bklit")


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def constraints() -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_one_version_printed_by_bklit_version():
    """setup.cfg reads bklit.__version__; the installed metadata and ``bklit --version`` agree."""
    assert setup_cfg()["metadata"]["version"] == "attr: bklit.__version__"
    assert metadata.version("bklit") == bklit.__version__
    done = subprocess.run([BKLIT, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == f"bklit {bklit.__version__}\n"


def test_the_license_file_matches_setup_cfg():
    meta = setup_cfg()["metadata"]
    assert meta["license"] == "MIT" and meta["license_files"] == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text


def _third_party_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in ("bklit", "__future__")}


def _declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements if line.strip()}


def test_every_imported_distribution_is_declared():
    """Each third-party module bklit (or its twistd plugin) imports comes from a distribution it requires."""
    declared = _declared(setup_cfg()["options"]["install_requires"].splitlines())
    owners = metadata.packages_distributions()
    imported = _third_party_imports(ROOT / "bklit") | _third_party_imports(ROOT / "twisted" / "plugins")
    undeclared = {module: owners.get(module) for module in imported
                  if not {canonicalize_name(d) for d in owners.get(module, [])} & declared}
    assert undeclared == {}
    assert {"cryptography", "txaio", "zope-interface"} <= declared


def _closure(requirement: Requirement, seen: dict[str, str]) -> None:
    """Add the installed distributions that ``requirement`` needs, with their versions, to ``seen``."""
    name = canonicalize_name(requirement.name)
    dist = metadata.distribution(name)
    fresh = name not in seen
    seen[name] = dist.version
    for line in dist.requires or []:
        needed = Requirement(line)
        wanted = (not needed.marker or any(needed.marker.evaluate({"extra": extra})
                                           for extra in (requirement.extras or {""})))
        if wanted and (fresh or requirement.extras):
            _closure(needed, seen)


def test_constraints_pin_what_the_tests_run_with():
    """Every distribution bklit[test] needs is pinned in constraints.txt at the version installed here."""
    seen: dict[str, str] = {}
    _closure(Requirement("bklit[test]"), seen)
    del seen["bklit"]
    assert {"twisted", "txaio", "cryptography", "chdb", "trustme", "ua-parser-builtins"} <= set(seen)
    pins = constraints()
    assert {name: version for name, version in seen.items() if pins.get(name) != version} == {}
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["twisted"])
