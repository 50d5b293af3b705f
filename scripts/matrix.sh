#!/usr/bin/env bash
# Builds loopwatch and runs its Python tests on each CPython 3.9–3.15 that is installed
# (through pyenv where present, else the pythonX.Y on PATH; failing both, in the Debian sid root
# of scripts/sid.sh if it is made and has that version). Prints one line per version.
#   scripts/matrix.sh                 every minor version found
#   scripts/matrix.sh 3.11 3.12       only these
#   REQUIRE="3.11 3.12 3.13" ...      fail if one of these is missing
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
minors=("$@")
[ ${#minors[@]} -gt 0 ] || minors=(3.9 3.10 3.11 3.12 3.13 3.14 3.15)
venvs=${LOOPWATCH_VENVS:-$root/.venvs}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
# The tests' build of the extension: optimized, without fat LTO (Cargo.toml's test-ext profile),
# a fraction of the release build's time for each interpreter. Benchmarks build the release.
export MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile test-ext}"

source scripts/lib.sh

declare -a summary
status=0
for minor in "${minors[@]}"; do
  python=$(find_python "$minor")
  if use_sid_root "$minor"; then
    echo "=== CPython $minor (Debian sid root)"
    in_sid_root "$minor" || status=1
    continue
  fi
  if [ -z "$python" ]; then
    summary+=("SKIPPED $minor: not installed on this machine (nor in scripts/sid.sh's root)")
    if [[ " ${REQUIRE:-} " == *" $minor "* ]]; then status=1; fi
    continue
  fi
  echo "=== CPython $minor ($python)"
  venv="$venvs/$minor"
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" || { summary+=("FAILED  $minor: could not create a venv"); status=1; continue; }
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1
  if ! "$venv/bin/python" -m pip install -q "$root[test]"; then
    summary+=("FAILED  $minor: build or install failed"); status=1; continue
  fi
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests"
  rc=$?
  if [ $rc -eq 0 ]; then
    summary+=("PASSED  $minor ($("$venv/bin/python" -c 'import platform; print(platform.python_version())'))")
  elif [ $rc -eq 5 ]; then
    summary+=("FAILED  $minor: pytest collected no tests"); status=1
  else
    summary+=("FAILED  $minor: pytest exited $rc"); status=1
  fi
done

echo
echo "Interpreter matrix:"
printf '  %s\n' "${summary[@]}"
exit $status
