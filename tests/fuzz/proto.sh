#!/usr/bin/env bash
# CI-sized fuzzing (docs/fuzzing.md) of every parser of untrusted or on-disk bytes:
# updater-proto's sans-IO parsers (the manifest envelope and payload, the trust root, the
# chunk index, the digest) and the agent's (grubenv, GPT, state/resume/health JSON,
# Content-Range and ETag). Stable Rust, no cargo-fuzz and no nightly: each fuzz crate is
# built with plain cargo and the same coverage flags cargo-fuzz passes for `--sanitizer none`
# (all stable codegen options), and each target is the libFuzzer binary itself, run from a
# fresh corpus plus the committed seeds for a bounded time. Any crash, panic, failed
# assertion, timeout (10 s) or RSS above 2 GiB fails the script.
#   FUZZ_SECONDS   seconds per target (default 15; 9 targets)
#   FUZZ_SUITES    which crates (default "proto agent")
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
secs="${FUZZ_SECONDS:-15}"
export CARGO_TARGET_DIR="$root/target/fuzz-proto"
triple="$(rustc -vV | sed -n 's/^host: //p')"
# The flags go to the target only (--target), not to build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# suite: crate directory and its targets
declare -A DIR_OF=([proto]=updater-proto/fuzz [agent]=agent/fuzz)
declare -A TARGETS_OF=([proto]="envelope signed_payload root chunk_index digest"
    [agent]="grubenv gpt state_json http_headers")
summary=()
total=0
for suite in ${FUZZ_SUITES:-proto agent}; do
    dir="$root/${DIR_OF[$suite]:?unknown suite $suite (proto, agent)}"
    read -r -a targets <<<"${TARGETS_OF[$suite]}"
    (cd "$dir" && cargo build --locked --release --target "$triple" --bins)
    bin="$CARGO_TARGET_DIR/$triple/release"
    for t in "${targets[@]}"; do
        corpus="$(mktemp -d)"
        log="$(mktemp)"
        mkdir -p "$dir/artifacts/$t"
        echo "== fuzz $t (${secs}s)"
        if ! "$bin/$t" "$corpus" "$dir/seeds/$t" -max_total_time="$secs" -max_len=20000 \
                -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
                -artifact_prefix="$dir/artifacts/$t/" >"$log" 2>&1; then
            tail -n 60 "$log"
            echo "fuzz target $t failed; the input is in ${dir#"$root"/}/artifacts/$t/" >&2
            exit 1
        fi
        execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)"
        summary+=("$t: ${execs:-?} executions in ${secs}s")
        total=$((total + ${execs:-0}))
        rm -rf "$corpus" "$log"
    done
done
printf '%s\n' "${summary[@]}"
echo "fuzz: ${#summary[@]} targets, $total executions, no crash"
