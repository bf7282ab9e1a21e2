#!/usr/bin/env bash
# Install benchmark (docs/benchmarks.md): apply an image from server-mock over loopback into
# slot B of a GPT disk file with the agent's pipeline, and measure beside it the limit: the
# same bytes fetched with curl and written with dd conv=fsync into the same partition range.
#
# Usage: tests/bench/install_bench.sh [SIZE_MIB ...]      (default: 256 1024)
# Env:   BENCH_DIR (work dir, default $CARGO_TARGET_DIR/bench or target/bench)
#        CARGO_TARGET_DIR (where the release binaries are built)
#        REPEAT (rounds; contenders take turns each round, best kept; default 3)
# Needs: curl, dd, sgdisk (gdisk), zstd. Not part of `cargo test`: it moves gigabytes.
set -euo pipefail
shopt -s inherit_errexit

SIZES=("$@")
[ ${#SIZES[@]} -eq 0 ] && SIZES=(256 1024)
REPEAT=${REPEAT:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BENCH_DIR=${BENCH_DIR:-$TARGET/bench}
mkdir -p "$BENCH_DIR/repo"

for tool in curl dd sgdisk zstd; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install curl coreutils gdisk zstd)" >&2; exit 2; }
done

if [ -z "${NO_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release -q -p server-mock --bin server-mock \
        && cargo build --release -q -p update-agent --example install_bench)
fi
AGENT=$TARGET/release/examples/install_bench
SERVER=$TARGET/release/server-mock

now() { date +%s.%N; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# Start the server and read its URL from the first stdout line.
SERVER_OUT=$BENCH_DIR/server.out
"$SERVER" --dir "$BENCH_DIR/repo" >"$SERVER_OUT" 2>"$BENCH_DIR/server.err" &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "listening on" "$SERVER_OUT" 2>/dev/null && break; sleep 0.1; done
BASE=$(sed -n 's/^listening on //p' "$SERVER_OUT" | head -1)
[ -n "$BASE" ] || { echo "server-mock did not start" >&2; cat "$BENCH_DIR/server.err" >&2; exit 1; }
BASE=${BASE%/}

# A Flatcar-like GPT disk: USR-A and USR-B sized for the largest image.
make_disk() { # $1 = partition MiB
    local disk=$BENCH_DIR/disk.img
    rm -f "$disk"
    truncate -s $(( 2 * $1 + 8 ))M "$disk"
    sgdisk -n 3:2048:+"$1"M -c 3:USR-A -n 4:0:+"$1"M -c 4:USR-B "$disk" >/dev/null 2>&1
    sgdisk -A 3:set:56 -A 3:set:48 "$disk" >/dev/null   # A: successful, priority 1
    echo "$disk"
}
part_offset() { # byte offset of partition 4
    sgdisk -i 4 "$1" | awk '/First sector/ { print $3 * 512 }'
}

run_limit() { # $1 url, $2 disk, $3 offset, $4 decompress(yes/no)
    local t0 t1
    sync
    t0=$(now)
    if [ "$4" = yes ]; then
        curl -sf "$1" | zstd -dc | dd of="$2" bs=4M seek="$3" oflag=seek_bytes conv=notrunc,fsync status=none
    else
        curl -sf "$1" | dd of="$2" bs=4M seek="$3" oflag=seek_bytes conv=notrunc,fsync status=none
    fi
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}

run_agent() { # extra args...; prints "wall_s json"
    local t0 t1 out
    sync
    t0=$(now)
    out=$("$AGENT" "$@")
    t1=$(now)
    printf '%s %s\n' "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" "$out"
}

# Keep the line with the smaller first field (seconds).
keep_min() { # $1 current best line (may be empty), $2 new line
    if [ -z "$1" ] || awk -v a="${2%% *}" -v b="${1%% *}" 'BEGIN { exit !(a < b) }'; then
        echo "$2"
    else
        echo "$1"
    fi
}

json_field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" <<<"$2" | tr -d '"'; }

printf '%-28s %8s %8s %8s %7s %7s %9s %s\n' image limit_s ours_s ours_rb ratio ratio_rb rss_mib readback
for mib in "${SIZES[@]}"; do
    RAW=$BENCH_DIR/repo/random-$mib.img
    USR=$BENCH_DIR/repo/usr-$mib.img
    [ -f "$RAW" ] || head -c "${mib}M" /dev/urandom >"$RAW"
    if [ ! -f "$USR.zst" ]; then
        # Real executables and libraries: compress about as well as an OS image.
        find /usr/lib /usr/bin /usr/share -type f -size +4k 2>/dev/null | sort | xargs cat 2>/dev/null \
            | head -c "${mib}M" >"$USR" || true
        [ "$(stat -c %s "$USR")" -eq $(( mib << 20 )) ] || { echo "not enough bytes under /usr for $mib MiB" >&2; exit 1; }
        zstd -q -f -3 -T0 "$USR" -o "$USR.zst"   # level 3: window 2^21, within the 2^23 cap
    fi
    DISK=$(make_disk $(( mib + 16 )))
    OFF=$(part_offset "$DISK")
    for kind in raw zstd; do
        if [ $kind = raw ]; then
            IMG=$RAW; URL=$BASE/random-$mib.img; DEC=no
            EXTRA=()
        else
            IMG=$USR; URL=$BASE/usr-$mib.img.zst; DEC=yes
            EXTRA=(--compression zstd --compressed-size "$(stat -c %s "$USR.zst")"
                   --compressed-sha256 "$(sha256sum "$USR.zst" | cut -d' ' -f1)")
        fi
        SIZE=$(stat -c %s "$IMG")
        SHA=$(sha256sum "$IMG" | cut -d' ' -f1)
        curl -sf "$URL" >/dev/null   # warm the server's page cache for both contenders
        # Contenders take turns, so each sees the same background load; best of REPEAT each.
        # Peak RSS is the largest VmHWM of every agent run, not only of the fastest.
        LIMIT=""; NORB=""; RB=""; RSS_KIB=0
        for _ in $(seq "$REPEAT"); do
            LIMIT=$(keep_min "$LIMIT" "$(run_limit "$URL" "$DISK" "$OFF" $DEC)")
            for rb in off on; do
                LINE=$(run_agent --disk "$DISK" --url "$URL" --size "$SIZE" --sha256 "$SHA" "${EXTRA[@]}" --readback $rb)
                K=$(json_field vm_hwm_kib "$LINE")
                [ "$K" -gt "$RSS_KIB" ] && RSS_KIB=$K
                if [ $rb = off ]; then NORB=$(keep_min "$NORB" "$LINE"); else RB=$(keep_min "$RB" "$LINE"); fi
            done
        done
        T_NORB=${NORB%% *}; T_RB=${RB%% *}
        RSS=$(( RSS_KIB / 1024 ))
        printf '%-28s %8s %8s %8s %7s %7s %9s %s\n' "$kind-$mib MiB" "$LIMIT" "$T_NORB" "$T_RB" \
            "$(ratio "$T_NORB" "$LIMIT")" "$(ratio "$T_RB" "$LIMIT")" "$RSS" "$(json_field readback "$RB")"
        echo "  detail no-readback: ${NORB#* }" >&2
        echo "  detail readback:    ${RB#* }" >&2
    done
    sgdisk -v "$DISK" | grep -q "No problems found" || { echo "sgdisk -v reports problems on $DISK" >&2; exit 1; }
done
