#!/usr/bin/env bash
# Reproduces the README's Performance section: the overhead runner on each CPython 3.11-3.13
# found, then the service and memory benchmarks on the newest of them. Results (JSON) go to
# benches/results/, the service plot to docs/service-benchmark.png. About 25 minutes.
#   scripts/bench.sh                  everything
#   scripts/bench.sh 3.12             the overhead runner on 3.12 only, then the rest on 3.12
#   ROUNDS=9 scripts/bench.sh         more interleaved rounds per workload (default 5)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
minors=("$@")
[ ${#minors[@]} -gt 0 ] || minors=(3.11 3.12 3.13)
venvs=${LOOPWATCH_VENVS:-$root/.venvs}
results=benches/results
mkdir -p "$results"

source scripts/lib.sh

newest=""
for minor in "${minors[@]}"; do
  python=$(find_python "$minor")
  if [ -z "$python" ]; then
    echo "SKIPPED $minor: not installed on this machine"
    continue
  fi
  venv="$venvs/bench-$minor"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || exit 1
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1
  # A release build, as users get it.
  "$venv/bin/python" -m pip install -q "$root[bench]" || exit 1
  echo "=== overhead, CPython $minor"
  "$venv/bin/python" benches/overhead.py --rounds "${ROUNDS:-5}" --json "$results/overhead-$minor.json" || exit 1
  newest=$venv
done
[ -n "$newest" ] || { echo "no CPython 3.11-3.13 found"; exit 1; }

echo "=== service under load ($("$newest/bin/python" -V))"
"$newest/bin/python" benches/service.py --json "$results/service.json" --plot docs/service-benchmark.png || exit 1
echo "=== memory ($("$newest/bin/python" -V))"
"$newest/bin/python" benches/memory.py --json "$results/memory.json" || exit 1
echo "=== the README's tables"
"$newest/bin/python" benches/tables.py "$results"
