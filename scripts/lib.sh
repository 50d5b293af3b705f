# Shared by the scripts: where to find each CPython minor version, and the pinned versions of
# everything they install (constraints.txt, written by scripts/update-pins.sh), the build
# backend included: pip from 26.2 on reads build constraints only from PIP_BUILD_CONSTRAINT.
PIP_CONSTRAINT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/constraints.txt"
export PIP_CONSTRAINT PIP_BUILD_CONSTRAINT="$PIP_CONSTRAINT"

# Prints the newest installed CPython of minor version $1 (pyenv first, then pythonX.Y on PATH),
# or nothing.
find_python() {
  local minor=$1 version
  if command -v pyenv >/dev/null 2>&1; then
    version=$(pyenv versions --bare 2>/dev/null | grep -E "^${minor//./\\.}\.[0-9]+$" | sort -V | tail -n 1)
    if [ -n "$version" ]; then
      echo "$(pyenv prefix "$version")/bin/python"
      return
    fi
  fi
  command -v "python$minor" 2>/dev/null || true
}

# Whether CPython $1 is to be run in the Debian sid root of scripts/sid.sh: not installed here,
# the root made and holding it, and not already inside it.
use_sid_root() {
  [ -z "${LOOPWATCH_IN_SID:-}" ] && [ -z "$(find_python "$1")" ] && scripts/sid.sh has "$1"
}

# Runs the calling script for CPython $1 inside the sid root, with venvs and a build directory of
# its own there (what is built against the root's newer glibc must not be reused out here), the
# other arguments (NAME=value) added to its environment. Reads the caller's `venvs`; adds the
# run's last line to the caller's `summary` array and returns its exit status.
in_sid_root() {
  local minor=$1 log rc
  shift
  log=$(mktemp)
  scripts/sid.sh run env LOOPWATCH_IN_SID=1 LOOPWATCH_VENVS="$venvs/sid" \
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/sid" "$@" "$0" "$minor" | tee "$log"
  rc=${PIPESTATUS[0]}
  summary+=("$(tail -n 1 "$log" | sed 's/^ *//'), in the Debian sid root")
  rm -f "$log"
  return "$rc"
}
