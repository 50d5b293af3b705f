"""A wheel from the wheelhouse (scripts/wheels.sh) installs with no Rust toolchain anywhere in
reach, and the quickstart reports what it blocks, exactly as from a source install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = os.environ.get("LOOPWATCH_WHEELHOUSE")
TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"

pytestmark = pytest.mark.skipif(
    not WHEELHOUSE, reason="no wheelhouse given: scripts/test.sh builds one and sets LOOPWATCH_WHEELHOUSE"
)


def path_without_rust() -> str:
    """PATH with every folder that holds a cargo, rustc or rustup taken out."""
    kept = [
        folder
        for folder in os.environ.get("PATH", "").split(os.pathsep)
        if folder and not any(Path(folder, tool).exists() for tool in ("cargo", "rustc", "rustup"))
    ]
    return os.pathsep.join(kept)


def test_a_wheel_installs_and_runs_the_quickstart_with_no_rust(tmp_path: Path) -> None:
    wheels = sorted(Path(WHEELHOUSE or "").glob(f"loopwatch-*-{TAG}-{TAG}-manylinux*.whl"))
    assert len(wheels) == 1, f"the wheelhouse should hold one {TAG} manylinux wheel: {wheels}"
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter, not this venv
    venv = tmp_path / "venv"
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CARGO", "RUSTUP", "MATURIN", "VIRTUAL_ENV"))
        },
        "PATH": os.pathsep.join([str(venv / "bin"), path_without_rust()]),
        # Were pip to build instead of install, maturin must not fetch a toolchain either.
        "MATURIN_NO_INSTALL_RUST": "1",
        "CARGO_HOME": str(tmp_path / "no-cargo"),
        "RUSTUP_HOME": str(tmp_path / "no-rustup"),
    }
    assert shutil.which("cargo", path=env["PATH"]) is None
    # --no-index and --only-binary: the wheel or nothing, never a build from source.
    install = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--only-binary",
            ":all:",
            str(wheels[0]),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    example = shutil.copy(ROOT / "examples" / "quickstart.py", tmp_path / "quickstart.py")
    done = subprocess.run(
        [str(venv / "bin" / "python"), example],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    headline = re.compile(
        r"loopwatch: time\.sleep blocked the event loop for \d+\.\d ms in task 'login-\d'"
        r" at \S*quickstart\.py:\d+ in __main__\.fetch_profile$",
        re.M,
    )
    assert headline.search(output), output
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import loopwatch._native as n; print(n.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.strip().startswith(str(venv)), where.stdout
