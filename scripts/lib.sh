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
