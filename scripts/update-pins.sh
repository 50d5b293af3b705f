#!/usr/bin/env bash
# Writes constraints.txt anew: the newest versions that install today of everything the tests, the
# benches, the lint step, the reliability suite and the wheel build install (with what they pull
# in), and of the build backend, resolved
# on each CPython present, one pin per package and interpreter range. scripts/matrix.sh,
# scripts/bench.sh and CI install through it, so a new release of a dependency changes nothing
# until this is run, the result tested, and committed as a change of its own.
#   scripts/update-pins.sh            test set on 3.9-3.15, bench on 3.11-3.15 (3.14 and 3.15 in
#                                     scripts/sid.sh's root, when it is made), reliability on 3.12,
#                                     3.13 and 3.15,
#                                     lint and the wheel tools on the newest of 3.9-3.13
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
source scripts/lib.sh

# Inside the project, so that the sid root (which has the project mounted) sees it too.
mkdir -p target
work=$(mktemp -d "$root/target/update-pins.XXXXXX")
trap 'rm -rf "$work"' EXIT
newest=""
for minor in 3.9 3.10 3.11 3.12 3.13; do
  [ -n "$(find_python "$minor")" ] && newest=$minor
done
[ -n "$newest" ] || { echo "no CPython 3.9-3.13 found" >&2; exit 1; }
helper=$(find_python "$newest")

# The requirement sets, read from pyproject.toml: what `pip install .[test]` and `.[bench]` pull
# in besides loopwatch itself, and the build backend pip installs to build it.
"$helper" - "$work" <<'EOF'
import pathlib, sys, tomllib
work = pathlib.Path(sys.argv[1])
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())
extras = project["project"]["optional-dependencies"]
build = project["build-system"]["requires"]
def own(requirements):  # `loopwatch[test]` inside another extra: its requirements instead
    for line in requirements:
        if line.startswith("loopwatch["):
            yield from own(extras[line[len("loopwatch["):-1]])
        else:
            yield line
(work / "test.txt").write_text("\n".join([*own(extras["test"]), *build]) + "\n")
(work / "bench.txt").write_text("\n".join([*own(extras["bench"]), *build]) + "\n")
(work / "lint.txt").write_text("\n".join(["ruff", "mypy"]) + "\n")
(work / "wheels.txt").write_text("\n".join(["maturin", "ziglang", "auditwheel"]) + "\n")
(work / "reliability.txt").write_text(pathlib.Path("reliability/requirements.txt").read_text())
EOF

freeze() {  # freeze SET MINOR: the newest versions of SET that install on MINOR
  local set=$1 minor=$2 venv="$work/venv-$1-$2"
  "$(find_python "$minor")" -m venv "$venv"
  PIP_CONSTRAINT= PIP_BUILD_CONSTRAINT= "$venv/bin/python" -m pip install -q --upgrade pip
  PIP_CONSTRAINT= PIP_BUILD_CONSTRAINT= "$venv/bin/python" -m pip install -q -r "$work/$set.txt"
  {
    "$venv/bin/python" -m pip freeze --all
  } > "$work/freeze-$set-$minor.txt"
  echo "resolved $set on $minor"
}
freeze_in_sid() {  # the same, in the sid root
  local set=$1 minor=$2 venv="$work/venv-$1-$2"
  PIP_CONSTRAINT= PIP_BUILD_CONSTRAINT= scripts/sid.sh run sh -c \
    "python$minor -m venv '$venv' && '$venv/bin/python' -m pip install -q --upgrade pip &&
     '$venv/bin/python' -m pip install -q -r '$work/$set.txt' &&
     '$venv/bin/python' -m pip freeze --all > '$work/freeze-$set-$minor.txt'"
  echo "resolved $set on $minor (Debian sid root)"
}
for minor in 3.9 3.10 3.11 3.12 3.13; do
  [ -n "$(find_python "$minor")" ] || { echo "SKIPPED $minor: not installed on this machine"; continue; }
  freeze test "$minor"
  case $minor in 3.11|3.12|3.13) freeze bench "$minor" ;; esac
  case $minor in 3.12|3.13) freeze reliability "$minor" ;; esac
done
for minor in 3.14 3.15; do
  if [ -n "$(find_python "$minor")" ]; then
    freeze test "$minor"
    freeze bench "$minor"
  elif scripts/sid.sh has "$minor"; then
    freeze_in_sid test "$minor"
    freeze_in_sid bench "$minor"
    # The reliability suite runs on 3.12 and the newest interpreter present.
    [ "$minor" = 3.15 ] && freeze_in_sid reliability "$minor"
  else
    echo "SKIPPED $minor: not installed on this machine (nor in scripts/sid.sh's root)"
  fi
done
freeze lint "$newest"
freeze wheels "$newest"

"$helper" - "$work" > constraints.txt <<'EOF'
import collections, pathlib, re, sys
work = pathlib.Path(sys.argv[1])
order = ["3.9", "3.10", "3.11", "3.12", "3.13", "3.14", "3.15"]
# package -> minor -> version; the test set wins where two sets resolved differently.
pins = collections.defaultdict(dict)
for set_name in ("wheels", "lint", "reliability", "bench", "test"):
    for path in sorted(work.glob(f"freeze-{set_name}-*.txt")):
        minor = path.stem.rsplit("-", 1)[1]
        for line in path.read_text().splitlines():
            name, _, version = line.partition("==")
            name = re.sub(r"[-_.]+", "-", name).lower()
            if version and name not in ("setuptools", "wheel"):  # what venv seeds, not what we install
                pins[name][minor] = version
present = [m for m in order if any(m in by_minor for by_minor in pins.values())]
print("# Generated by scripts/update-pins.sh: what the tests, benches and lint install, pinned.")
print("# Used by scripts/matrix.sh, scripts/bench.sh and CI through PIP_CONSTRAINT and PIP_BUILD_CONSTRAINT.")
for name in sorted(pins):
    by_minor = pins[name]
    # Runs of the interpreters that resolved the package with the same version; an interpreter
    # that does not install it (a set not resolved there) neither breaks a run nor bounds it.
    groups = []
    for minor in present:
        if minor not in by_minor:
            continue
        if groups and groups[-1][0] == by_minor[minor]:
            groups[-1][2] = minor
        else:
            groups.append([by_minor[minor], minor, minor])
    for index, (version, first, last) in enumerate(groups):
        bounds = []
        if index > 0:
            bounds.append(f'python_version >= "{first}"')
        if index < len(groups) - 1:
            bounds.append(f'python_version < "{groups[index + 1][1]}"')
        print(f"{name}=={version}; {' and '.join(bounds)}" if bounds else f"{name}=={version}")
EOF
echo "wrote constraints.txt; run the tests (bash scripts/test.sh) before committing it"
