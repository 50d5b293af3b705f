#!/usr/bin/env bash
# Everything that must pass before a change lands: the Rust core (format, lints, tests), then the
# wheelhouse (manylinux wheels and the sdist), then the extension built and tested on each
# CPython 3.9–3.15 present (3.14 and 3.15 in a Debian sid root, made once), then the reliability
# suite (third-party suites with and without loopwatch), then Python lint and stub checks.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh  # the pins
started=$SECONDS

echo "=== Rust: format, clippy, core tests"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The binding compiles other code for other versions (`#[cfg(Py_3_x)]`): lint it as built for the
# oldest and the newest CPython too, each in a build directory of its own (3.15 below, in its root).
for minor in 3.9 3.13; do
  python=$(find_python "$minor")
  [ -z "$python" ] || PYO3_PYTHON=$python CARGO_TARGET_DIR=target/clippy-$minor \
    cargo clippy -p loopwatch-py --all-targets --quiet -- -D warnings
done
cargo test -p loopwatch-core --quiet
# The criterion benches, each run once: they assert what they measure (hot path taken, episodes made).
cargo test -p loopwatch-core --benches --quiet

if [ "${CI:-}" = "true" ]; then
  export REQUIRE="${REQUIRE:-3.11 3.12 3.13 3.14 3.15}"
fi

echo "=== CPython 3.14 and 3.15: the Debian sid root (made once, then reused)"
if ! command -v debootstrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # A fresh machine may have no package lists yet: read them once if the install finds nothing.
  apt-get install -y -q debootstrap >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; }
fi
# Without it (no debootstrap, not root) 3.14 and 3.15 are skipped, and said so; CI requires them.
scripts/sid.sh make || echo "no Debian sid root: CPython 3.14 and 3.15 are not tested"
if scripts/sid.sh has 3.15; then
  scripts/sid.sh run env PYO3_PYTHON=python3.15 CARGO_TARGET_DIR=target/sid/clippy-3.15 \
    cargo clippy -p loopwatch-py --all-targets --quiet -- -D warnings
fi

echo "=== Wheels: one manylinux wheel per interpreter, and the sdist"
scripts/wheels.sh
# tests/test_wheel.py installs the wheel of its interpreter into a venv with no Rust in reach.
export LOOPWATCH_WHEELHOUSE=$PWD/target/wheelhouse

echo "=== Python: build and test on each interpreter"
scripts/matrix.sh

echo "=== Reliability: third-party suites, test by test, with and without loopwatch"
scripts/reliability.sh

echo "=== Python: lint and type stubs"
newest=$(ls -d .venvs/3.* 2>/dev/null | sort -V | tail -n 1)
"$newest/bin/python" -m pip install -q ruff mypy  # pinned: scripts/lib.sh
"$newest/bin/python" -m ruff check python tests examples benches reliability
"$newest/bin/python" -m ruff format --check python tests examples benches reliability
"$newest/bin/python" -m mypy.stubtest loopwatch._native
"$newest/bin/python" -m mypy
echo "All checks passed in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s."
