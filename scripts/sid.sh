#!/usr/bin/env bash
# A Debian sid root for the CPythons that pyenv does not have here (3.14 and 3.15, from Debian's
# own packages): made once with debootstrap from the Debian registry apt already uses, then kept.
# Each command runs in it with the machine's Rust toolchain, /proc, /dev and this project mounted
# in (in a mount namespace of its own, so nothing stays mounted), the CA bundle and pip's
# configuration copied in.
#   scripts/sid.sh make            make the root, if it is not made yet (a minute or a few, with the network)
#   scripts/sid.sh has 3.14        exit 0 if the root is made and has python3.14 (makes nothing)
#   scripts/sid.sh run CMD ARG...  run CMD in the root, in this project's folder
# LOOPWATCH_SID_ROOT says where the root lives (default: ~/.cache/loopwatch/sid-root).
set -euo pipefail
project=$(cd "$(dirname "$0")/.." && pwd)
sid=${LOOPWATCH_SID_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/loopwatch/sid-root}
ready=$sid/.loopwatch-ready
packages=(python3.14 python3.14-dev python3.14-venv python3.15 python3.15-dev python3.15-venv
  gcc libc6-dev ca-certificates)

# The Debian mirror apt is configured with (deb822 .sources first, then sources.list), security
# archives aside.
debian_mirror() {
  local uri
  uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && u && $0 !~ /security/ {print u; exit}' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
      /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || { echo "sid.sh: no Debian mirror found in apt's sources" >&2; return 1; }
  echo "$uri"
}

# Runs "$@" inside the root as root, with the mounts it needs; they vanish with the namespace.
in_root() {
  local mounts=(/proc /dev /dev/pts "$project")
  # A local folder that pip's configuration points at (PIP_FIND_LINKS) is mounted too.
  for dir in "$HOME/.cargo" "$HOME/.rustup" ${CARGO_HOME:+"$CARGO_HOME"} ${RUSTUP_HOME:+"$RUSTUP_HOME"} \
    ${PIP_FIND_LINKS:+"$PIP_FIND_LINKS"}; do
    [ -d "$dir" ] && mounts+=("$dir")
  done
  local script='set -e; root=$1; shift; n=$1; shift
    for ((i = 0; i < n; i++)); do mkdir -p "$root$1"; mount --rbind "$1" "$root$1"; shift; done
    exec chroot "$root" /usr/bin/env HOME="$HOME" PATH="$HOME/.cargo/bin:/usr/local/bin:/usr/bin:/bin" "$@"'
  unshare --mount --propagation private bash -c "$script" in_root "$sid" "${#mounts[@]}" "${mounts[@]}" "$@"
}

copy_host_config() {
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$sid/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$sid/etc/ssl/certs/ca-certificates.crt"
  fi
  if [ -f /etc/pip.conf ]; then cp /etc/pip.conf "$sid/etc/pip.conf"; fi
  cp /etc/resolv.conf "$sid/etc/resolv.conf" 2>/dev/null || true
}

make_root() {
  [ -f "$ready" ] && return 0
  command -v debootstrap >/dev/null || { echo "sid.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; return 1; }
  local mirror
  mirror=$(debian_mirror)
  # A root left half made by an interrupted run (it carries our mark) is made again from the
  # start; any other folder that is not empty is the user's, and is left as it is.
  if [ -d "$sid" ] && [ -n "$(ls -A "$sid")" ] && [ ! -f "$sid/.loopwatch-making" ]; then
    echo "sid.sh: $sid is not empty and is not a root this script made; set LOOPWATCH_SID_ROOT to a new folder" >&2
    return 1
  fi
  rm -rf "$sid"
  mkdir -p "$sid"
  touch "$sid/.loopwatch-making"
  echo "sid.sh: making a Debian sid root in $sid (a minute or a few)"
  debootstrap --variant=minbase sid "$sid" "$mirror" >"$sid.log" 2>&1 ||
    { echo "sid.sh: debootstrap failed; its log: $sid.log" >&2; tail -n 5 "$sid.log" >&2; return 1; }
  copy_host_config
  echo 'APT::Sandbox::User "root";' >"$sid/etc/apt/apt.conf.d/99sandbox"
  # The registry may serve a frozen snapshot whose Release files are past their date: apt on this
  # machine is told to accept that, and so is the root's.
  apt-config dump 2>/dev/null | grep -E '^Acquire::Check-(Valid-Until|Date) ' \
    >"$sid/etc/apt/apt.conf.d/99host-registry" || true
  in_root /bin/sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${packages[*]}" \
    >>"$sid.log" 2>&1 ||
    { echo "sid.sh: installing the Pythons failed; its log: $sid.log" >&2; tail -n 5 "$sid.log" >&2; return 1; }
  rm -f "$sid/.loopwatch-making"
  touch "$ready"
}

case ${1:-} in
  make) make_root ;;
  has) [ -f "$ready" ] && [ -x "$sid/usr/bin/python${2:?which minor version}" ] ;;
  run)
    shift
    [ -f "$ready" ] || { echo "sid.sh: the root is not made yet (scripts/sid.sh make)" >&2; exit 1; }
    copy_host_config
    in_root /bin/sh -c 'cd "$0" && exec "$@"' "$project" "$@"
    ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
