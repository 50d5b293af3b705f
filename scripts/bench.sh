#!/usr/bin/env bash
# Reproduces the README's Performance section: the overhead runner on each CPython 3.11-3.15
# found (3.14 and 3.15 in the Debian sid root of scripts/sid.sh when pyenv has neither), then the
# service and memory benchmarks on the newest of 3.11-3.13. Results (JSON) go to
# benches/results/, the service plot to docs/service-benchmark.png. About 35 minutes.
#   scripts/bench.sh                  everything
#   scripts/bench.sh 3.12             the overhead runner on 3.12 only, then the rest on 3.12
#   ROUNDS=9 scripts/bench.sh         more interleaved rounds per workload (default 5)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
minors=("$@")
[ ${#minors[@]} -gt 0 ] || minors=(3.11 3.12 3.13 3.14 3.15)
venvs=${LOOPWATCH_VENVS:-$root/.venvs}
results=benches/results
mkdir -p "$results"

source scripts/lib.sh

newest=""
for minor in "${minors[@]}"; do
  python=$(find_python "$minor")
  if use_sid_root "$minor"; then
    in_sid_root "$minor" || exit 1  # the overhead runner only, in the root
    continue
  fi
  if [ -z "$python" ]; then
    echo "SKIPPED $minor: not installed on this machine (nor in scripts/sid.sh's root)"
    continue
  fi
  venv="$venvs/bench-$minor"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || exit 1
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1
  # A release build, as users get it.
  "$venv/bin/python" -m pip install -q "$root[bench]" || exit 1
  echo "=== overhead, CPython $minor"
  "$venv/bin/python" benches/overhead.py --rounds "${ROUNDS:-5}" --json "$results/overhead-$minor.json" || exit 1
  case $minor in 3.11|3.12|3.13) newest=$venv ;; esac
done
[ -z "${LOOPWATCH_IN_SID:-}" ] || exit 0
if [ -z "$newest" ]; then
  echo "SKIPPED the service and memory benchmarks: they run on the newest of 3.11-3.13, and none was given"
  tables=$(find_python 3.13); tables=${tables:-$(command -v python3)}
  "$tables" benches/tables.py "$results"
  exit 0
fi

echo "=== service under load ($("$newest/bin/python" -V))"
"$newest/bin/python" benches/service.py --json "$results/service.json" --plot docs/service-benchmark.png || exit 1
echo "=== memory ($("$newest/bin/python" -V))"
"$newest/bin/python" benches/memory.py --json "$results/memory.json" || exit 1
echo "=== the README's tables"
"$newest/bin/python" benches/tables.py "$results"
