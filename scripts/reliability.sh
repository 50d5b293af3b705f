#!/usr/bin/env bash
# The reliability suite: pinned third-party test suites (reliability/run.py) run without loopwatch
# and in each of its modes, compared test by test, on CPython 3.11 (the always-on mode's own way
# there: a callable in asyncio's Handle._run's place), 3.12 and the newest interpreter present
# (or the ones named; 3.14 and 3.15 in scripts/sid.sh's root when pyenv has neither).
# Fails when loopwatch changes any test's outcome.
#   scripts/reliability.sh            3.11, 3.12 and the newest
#   scripts/reliability.sh 3.13       only this one
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
source scripts/lib.sh
venvs=${LOOPWATCH_VENVS:-$root/.venvs}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
export MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile test-ext}"

minors=("$@")
if [ ${#minors[@]} -eq 0 ]; then
  minors=(3.11 3.12)
  for minor in 3.15 3.14 3.13; do
    if [ -n "$(find_python "$minor")" ] || use_sid_root "$minor"; then
      minors+=("$minor"); break
    fi
  done
fi
status=0
declare -a summary
for minor in "${minors[@]}"; do
  python=$(find_python "$minor")
  if use_sid_root "$minor"; then
    in_sid_root "$minor" || status=1
    continue
  fi
  if [ -z "$python" ]; then
    summary+=("SKIPPED $minor: not installed on this machine (nor in scripts/sid.sh's root)"); continue
  fi
  echo "=== reliability, CPython $minor"
  venv="$venvs/reliability-$minor"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || { summary+=("FAILED  $minor: no venv"); status=1; continue; }
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1
  # A wheel install, as users get it: the LOOPWATCH=1 mode needs its .pth.
  if ! "$venv/bin/python" -m pip install -q "$root" -r reliability/requirements.txt; then
    summary+=("FAILED  $minor: install failed"); status=1; continue
  fi
  if "$venv/bin/python" reliability/run.py --python "$venv/bin/python" --work "$CARGO_TARGET_DIR/reliability/$minor"; then
    summary+=("PASSED  $minor")
  else
    summary+=("FAILED  $minor: outcomes changed (above)"); status=1
  fi
done
echo
echo "Reliability suite:"
printf '  %s\n' "${summary[@]}"
exit $status
