#!/usr/bin/env bash
# Bounded fuzz runs of every cargo-fuzz target (docs/fuzzing.md), failing on any crash,
# panic or broken invariant. Installs cargo-fuzz from crates.io when it is missing.
# Stable Rust with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only flags).
#   FUZZ_SECONDS   seconds per target (default 15)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
secs="${FUZZ_SECONDS:-15}"
export RUSTC_BOOTSTRAP=1
# Both fuzz crates share one target directory, so common dependencies build once.
export CARGO_TARGET_DIR="$root/target/fuzz"
if ! command -v cargo-fuzz >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# crate directory : targets
suites=(
    "updater-proto/fuzz:envelope signed_payload root chunk_index digest"
    "agent/fuzz:grubenv gpt state_json http_headers"
)
summary=()
for suite in "${suites[@]}"; do
    dir="$root/${suite%%:*}"
    read -r -a targets <<<"${suite#*:}"
    # No sanitizer: the parsers are safe Rust, so a bug shows as a panic or a failed
    # assertion, which libFuzzer reports without AddressSanitizer; the build is much
    # cheaper and the runs several times faster.
    (cd "$dir" && cargo fuzz build --sanitizer none)
    for t in "${targets[@]}"; do
        corpus="$(mktemp -d)"
        log="$(mktemp)"
        echo "== fuzz $t (${secs}s)"
        if ! (cd "$dir" && cargo fuzz run --sanitizer none "$t" "$corpus" "seeds/$t" -- \
                -max_total_time="$secs" -max_len=20000 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
                >"$log" 2>&1); then
            tail -n 60 "$log"
            echo "fuzz target $t failed; the input is in ${dir#"$root"/}/artifacts/$t/" >&2
            exit 1
        fi
        execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)"
        [ -n "$execs" ] || execs="$(grep -Eo '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')"
        summary+=("$t: ${execs:-?} executions in ${secs}s")
        rm -rf "$corpus" "$log"
    done
done
printf '%s\n' "${summary[@]}"
echo "fuzz: ${#summary[@]} targets, no crash"
