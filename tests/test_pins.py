"""The tests run on pinned dependencies: every package they, the benches and the build install has
a pin in constraints.txt for this interpreter, and what is installed here is what is pinned (a
release of a dependency cannot change a test run until the pins are upgraded on purpose)."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest needs tomli before 3.11: it is there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_here() -> dict[str, str]:
    """The pins that apply to this interpreter: package -> version."""
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(default_environment()):
            [spec] = requirement.specifier
            assert spec.operator == "==", line
            name = canonical(requirement.name)
            assert name not in pins, f"two pins apply to {name} here"
            pins[name] = spec.version
    return pins


def requirements(extra: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    found = []
    for text in extras[extra]:
        requirement = Requirement(text)
        if requirement.name == "loopwatch":
            for inner in sorted(requirement.extras):
                found += requirements(inner)
        elif requirement.marker is None or requirement.marker.evaluate(default_environment()):
            found.append(requirement)
    return found


@pytest.mark.parametrize("extra", ["test", "bench", "dev"])
def test_every_package_the_scripts_install_is_pinned(extra: str) -> None:
    if extra == "bench" and sys.version_info < (3, 11):
        pytest.skip("scripts/bench.sh runs on 3.11 and newer")
    pins = pins_here()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = [Requirement(text) for text in project["build-system"]["requires"]]
    missing = [r.name for r in [*requirements(extra), *build] if canonical(r.name) not in pins]
    assert missing == [], f"not pinned in constraints.txt (run scripts/update-pins.sh): {missing}"
    for requirement in [*requirements(extra), *build]:
        assert pins[canonical(requirement.name)] in requirement.specifier, (
            f"the pin of {requirement.name} does not satisfy pyproject.toml's {requirement}"
        )


def test_what_is_installed_here_is_what_is_pinned() -> None:
    pins = pins_here()
    installed = {
        canonical(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()
    }
    drifted = {
        name: (installed[name], version)
        for name, version in pins.items()
        if name in installed and installed[name] != version
    }
    assert drifted == {}, f"installed vs pinned; install through constraints.txt (scripts/lib.sh): {drifted}"


def test_every_tool_a_script_installs_by_name_is_pinned() -> None:
    # `pip install -q ruff mypy`, `... maturin ziglang auditwheel`: named in the scripts, not in
    # pyproject.toml, and pinned all the same (PIP_CONSTRAINT applies to them too).
    named = set()
    for script in (REPO / "scripts").glob("*.sh"):
        for line in script.read_text().splitlines():
            command = line.split("#", 1)[0]
            if "pip install" not in command:
                continue
            words = re.split(r"&&|\|\||;|>", command.split("pip install", 1)[1])[0].split()
            named |= {canonical(w) for w in words if re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", w)}
    assert {"ruff", "mypy", "maturin", "ziglang", "auditwheel"} <= named, named
    every_pin = {
        canonical(Requirement(line).name)
        for line in CONSTRAINTS.read_text().splitlines()
        if line and line[0] != "#"
    }
    assert sorted(named - every_pin) == []
