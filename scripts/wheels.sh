#!/usr/bin/env bash
# Builds the wheelhouse: for each CPython of the matrix, one manylinux2014 wheel of loopwatch
# (manylinux_2_17: any Linux with glibc 2.17 or newer), linked through zig by maturin so that
# the build machine's newer glibc cannot leak in, and checked with auditwheel; then the sdist,
# checked by building a wheel from it. The wheels need no Rust to install.
#   scripts/wheels.sh               every CPython 3.9-3.15 present (3.14 and 3.15 in the root
#                                   of scripts/sid.sh, when it is made)
#   scripts/wheels.sh 3.12 3.15     only these (the sdist is made when run outside that root)
# Out: target/wheelhouse, or $WHEELHOUSE. Prints one line per version, as matrix.sh does.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
source scripts/lib.sh
minors=("$@")
[ ${#minors[@]} -gt 0 ] || minors=(3.9 3.10 3.11 3.12 3.13 3.14 3.15)
venvs=${LOOPWATCH_VENVS:-$root/.venvs}
wheelhouse=${WHEELHOUSE:-$root/target/wheelhouse}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
# The release build, not the tests' profile: these are the wheels users get.
unset MATURIN_PEP517_ARGS
logs=$CARGO_TARGET_DIR/wheel-logs
mkdir -p "$wheelhouse" "$logs"

# The build tools (maturin, zig, auditwheel), pinned, in a venv of their own.
tools=$venvs/wheel-tools
ensure_tools() {
  [ -x "$tools/bin/auditwheel" ] && [ -x "$tools/bin/maturin" ] && "$tools/bin/python" -m ziglang version >/dev/null 2>&1 &&
    return 0
  local python="" candidate
  for candidate in 3.13 3.12 3.11 3.15 3.14; do
    python=$(find_python "$candidate")
    [ -n "$python" ] && break
  done
  [ -n "$python" ] || { echo "wheels.sh: no CPython 3.11+ to run the build tools" >&2; return 1; }
  "$python" -m venv "$tools" && "$tools/bin/python" -m pip install -q maturin ziglang auditwheel
}

declare -a summary
status=0
if [ -z "${LOOPWATCH_IN_SID:-}" ]; then
  ensure_tools || exit 1
fi
for minor in "${minors[@]}"; do
  tag=cp${minor/./}
  python=$(find_python "$minor")
  if use_sid_root "$minor"; then
    in_sid_root "$minor" WHEELHOUSE="$wheelhouse" || status=1
    continue
  fi
  if [ -z "$python" ]; then
    summary+=("SKIPPED $minor: not installed on this machine (nor in scripts/sid.sh's root)")
    if [[ " ${REQUIRE:-} " == *" $minor "* ]]; then status=1; fi
    continue
  fi
  if [ -n "${LOOPWATCH_IN_SID:-}" ]; then
    ensure_tools || { summary+=("FAILED  $minor: could not install the build tools"); status=1; continue; }
  fi
  echo "=== wheel for CPython $minor ($python)"
  rm -f "$wheelhouse"/loopwatch-*-"$tag"-"$tag"-*.whl
  # maturin finds zig as `python -m ziglang`, with the first python on PATH.
  if ! PATH="$tools/bin:$PATH" "$tools/bin/maturin" build --release --zig --compatibility manylinux2014 -i "$python" \
    --out "$wheelhouse" >"$logs/$tag.log" 2>&1; then
    tail -n 20 "$logs/$tag.log"
    summary+=("FAILED  $minor: the wheel did not build (its log: $logs/$tag.log)"); status=1; continue
  fi
  wheel=$(ls "$wheelhouse"/loopwatch-*-"$tag"-"$tag"-*.whl)
  # auditwheel reads the symbols the extension needs from the system: glibc 2.17's at most.
  verdict=$("$tools/bin/auditwheel" show "$wheel" 2>&1)
  if ! grep -q 'consistent with the following platform tag:' <<<"$verdict" ||
    ! tr '\n' ' ' <<<"$verdict" | grep -Eq 'platform tag: +"manylinux_2_17_'; then
    echo "$verdict"
    summary+=("FAILED  $minor: auditwheel does not find $(basename "$wheel") manylinux_2_17"); status=1; continue
  fi
  summary+=("PASSED  $minor: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) kB), manylinux_2_17 by auditwheel")
done

if [ -z "${LOOPWATCH_IN_SID:-}" ]; then
  echo "=== sdist"
  rm -f "$wheelhouse"/loopwatch-*.tar.gz
  work=$(mktemp -d)
  if "$tools/bin/maturin" sdist --out "$wheelhouse" >"$work/sdist.log" 2>&1 &&
    sdist=$(ls "$wheelhouse"/loopwatch-*.tar.gz) &&
    "$tools/bin/python" -m pip wheel -q --no-deps -w "$work" "$sdist" >>"$work/sdist.log" 2>&1; then
    summary+=("PASSED  sdist: $(basename "$sdist") builds a wheel")
  else
    tail -n 20 "$work/sdist.log"
    summary+=("FAILED  sdist: not made, or no wheel builds from it"); status=1
  fi
  rm -rf "$work"
fi

echo
echo "Wheelhouse ($wheelhouse):"
printf '  %s\n' "${summary[@]}"
exit $status
