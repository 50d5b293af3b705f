#!/usr/bin/env bash
# Fuzzes the recording reader with libFuzzer for a while (default 10 minutes), starting from the
# seed recordings in fuzz/seeds. Needs cargo-fuzz (`cargo install cargo-fuzz`); its nightly flags
# are let through on a stable toolchain. A crash leaves its input in fuzz/artifacts/.
#   scripts/fuzz.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-600}
mkdir -p corpus/read_recording
cp -n seeds/* corpus/read_recording/
RUSTC_BOOTSTRAP=1 cargo fuzz run -O read_recording corpus/read_recording -- \
  -max_total_time="$seconds" -rss_limit_mb=512 -max_len=65536
