#!/usr/bin/env bash
# Install benchmark (docs/benchmarks.md): what a user runs, beside the fastest stock tools.
#
# Into partition 4 (USR-B) of a loop-attached GPT disk (losetup --direct-io=on -P), for each
# image (raw: /dev/urandom; zstd: the first N MiB of /usr, compressed with zstd -3), rounds in
# which the contenders take turns:
#   dd-local     dd if=IMG of=/dev/loopXp4 bs=4M oflag=direct conv=fsync   (zstd: zstd -dc IMG.zst | dd ...)
#   ours-local   update-agent apply --manifest repo/M.json --no-readback   (the real CLI)
#   ours-local-rb  ... with read-back
#   dd-http      curl -sf URL | dd iflag=fullblock oflag=direct conv=fsync (zstd: curl | zstd -dc | dd)
#   ours-http    update-agent apply --manifest http://127.0.0.1:PORT/M.json --no-readback (server-mock)
#   ours-http-rb ... with read-back
#   rauc         rauc install BUNDLE (raw image, sizes <= RAUC_MAX_MIB, default 256; no read-back)
# Before each run: the first and last MiB of the image range are zeroed (so the hash after it
# proves this run wrote them), the caches are dropped, and the 1-minute load and the idle CPU
# over 0.5 s are recorded. After each run the partition is read with O_DIRECT and its first
# SIZE bytes must hash to the image. Each run is timed by wall clock, and /usr/bin/time -v
# gives its system CPU and peak RSS (the largest process of the run).
#
# Usage: tests/bench/install_bench.sh [-n ROUNDS] [SIZE_MIB ...]   (default: -n 5, 1024)
# Env:   BENCH_DIR (work dir, default $CARGO_TARGET_DIR/bench or target/bench; needs ~6x SIZE)
#        NO_BUILD=1 (use the release binaries as built); RAUC_MAX_MIB (default 256)
# Needs: root (losetup), curl, dd, sgdisk (gdisk), zstd, /usr/bin/time (time).
# Not part of `cargo test`: it moves gigabytes.
set -euo pipefail
shopt -s inherit_errexit

ROUNDS=5
while getopts "n:" o; do
    case $o in
        n) ROUNDS=$OPTARG ;;
        *) echo "usage: $0 [-n ROUNDS] [SIZE_MIB ...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
SIZES=("$@")
[ ${#SIZES[@]} -eq 0 ] && SIZES=(1024)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BENCH_DIR=${BENCH_DIR:-$TARGET/bench}

if [ "$(id -u)" -ne 0 ]; then
    echo "install_bench: needs root to attach a loop device (losetup); run it as root" >&2
    exit 2
fi
for tool in curl dd sgdisk zstd losetup sha256sum /usr/bin/time; do
    command -v "$tool" >/dev/null || {
        echo "missing $tool (apt-get install curl coreutils gdisk zstd util-linux time)" >&2; exit 2; }
done

if [ -z "${NO_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release -q -p server-mock --bin server-mock \
        && cargo build --release -q -p update-agent --bin update-agent --bin update-publish --example install_bench)
fi
AGENT=$TARGET/release/update-agent
PUBLISH=$TARGET/release/update-publish
SERVER=$TARGET/release/server-mock

W=$BENCH_DIR/cli
REPO=$W/repo
rm -rf "$W"
mkdir -p "$REPO" "$W/keys"
LOOP=""
P3=""
P4=""
SERVER_PID=""
RAUC_SERVICE_PID=""
RAUC_DBUS_PID=""
RAUC_MAX_MIB=${RAUC_MAX_MIB:-256}
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    [ -n "$RAUC_SERVICE_PID" ] && kill "$RAUC_SERVICE_PID" 2>/dev/null || true
    [ -n "$RAUC_DBUS_PID" ] && kill "$RAUC_DBUS_PID" 2>/dev/null || true
    for l in $LOOP $P3 $P4; do losetup -d "$l" 2>/dev/null || true; done
}
trap cleanup EXIT

now() { date +%s.%N; }
load1() { cut -d' ' -f1 /proc/loadavg; }
idle_pct() { # idle share of all CPUs over 0.5 s
    local a b
    a=$(awk '/^cpu /{print $5+$6, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    sleep 0.5
    b=$(awk '/^cpu /{print $5+$6, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]) }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
max() { sort -g | tail -1; }

# Publisher key, host configuration.
PUB=$W/keys/release.pub
"$PUBLISH" keygen --private "$W/keys/release.key" --public "$PUB" >/dev/null

"$SERVER" --dir "$REPO" >"$W/server.out" 2>"$W/server.err" &
SERVER_PID=$!
for _ in $(seq 50); do grep -q "listening on" "$W/server.out" 2>/dev/null && break; sleep 0.1; done
BASE=$(sed -n 's/^listening on //p' "$W/server.out" | head -1)
[ -n "$BASE" ] || { echo "server-mock did not start" >&2; cat "$W/server.err" >&2; exit 1; }
BASE=${BASE%/}

MAXMIB=0
for m in "${SIZES[@]}"; do [ "$m" -gt "$MAXMIB" ] && MAXMIB=$m; done
PART_MIB=$((MAXMIB + 16))
DISK=$W/disk.img
truncate -s $((2 * PART_MIB + 8))M "$DISK"
sgdisk -n 3:2048:+"$PART_MIB"M -c 3:USR-A -n 4:0:+"$PART_MIB"M -c 4:USR-B "$DISK" >/dev/null 2>&1
sgdisk -A 3:set:56 -A 3:set:48 "$DISK" >/dev/null   # A: successful, priority 1
# The whole disk for the agent, and each partition as its own loop device over the same
# file (offset + size limit): partition scanning (-P) needs udev to make the nodes.
part() { # $1 number, $2 off|len
    sgdisk -i "$1" "$DISK" | awk -v w="$2" '/First sector/ { f = $3 } /Last sector/ { l = $3 }
        END { if (w == "off") print f * 512; else print (l - f + 1) * 512 }'
}
LOOP=$(losetup --find --show --direct-io=on "$DISK")
P3=$(losetup --find --show --direct-io=on -o "$(part 3 off)" --sizelimit "$(part 3 len)" "$DISK")
P4=$(losetup --find --show --direct-io=on -o "$(part 4 off)" --sizelimit "$(part 4 len)" "$DISK")

cat >"$W/config.toml" <<EOF
[disk]
path = "$LOOP"
layout = "flatcar"

[boot]
backend = "gptprio"
booted_slot = "A"

[trust]
product = "bench"
channel = "stable"

[[trust.keys]]
file = "$PUB"

[state]
dir = "$W/state"

[install]
allow_downgrade = true

[reboot]
command = ["true"]
EOF

# RAUC (Debian's rauc 1.8) set up as the benchmark needs: a plain bundle of the image signed
# with a throw-away certificate, a system.conf with both raw slots and a custom bootloader
# backend (slot A primary and good), a private system bus, and `rauc service` on it.
# rauc_setup DIR IMG P3 P4
rauc_setup() {
    local d=$1 img=$2 p3=$3 p4=$4
    mkdir -p "$d/content" "$d/mnt" "$d/data"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/key.pem" -out "$d/cert.pem" \
        -subj /CN=bench -days 2 2>/dev/null
    ln -f "$img" "$d/content/rootfs.img" 2>/dev/null || cp "$img" "$d/content/rootfs.img"
    cat >"$d/content/manifest.raucm" <<EOT
[update]
compatible=bench
version=1.0

[bundle]
format=plain

[image.rootfs]
filename=rootfs.img
EOT
    rm -f "$d/bundle.raucb"
    rauc bundle --cert "$d/cert.pem" --key "$d/key.pem" --mksquashfs-args="-noI -noD -noF -noX" \
        "$d/content" "$d/bundle.raucb" >"$d/bundle.log" 2>&1 || { cat "$d/bundle.log" >&2; return 1; }
    cat >"$d/bootloader.sh" <<'EOT'
#!/bin/sh
# Custom bootloader backend for the benchmark: slot A is primary and good; changes are accepted.
case "$1" in
    get-primary) echo A ;;
    get-state) echo good ;;
    get-current) echo A ;;
    *) exit 0 ;;
esac
EOT
    chmod +x "$d/bootloader.sh"
    cat >"$d/system.conf" <<EOT
[system]
compatible=bench
bootloader=custom
mountprefix=$d/mnt
data-directory=$d/data

[handlers]
bootloader-custom-backend=$d/bootloader.sh

[keyring]
path=$d/cert.pem

[slot.rootfs.0]
device=$p3
type=raw
bootname=A

[slot.rootfs.1]
device=$p4
type=raw
bootname=B
EOT
    cat >"$d/bus.conf" <<EOT
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$d/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
EOT
    [ -n "$RAUC_SERVICE_PID" ] && kill "$RAUC_SERVICE_PID" 2>/dev/null && wait "$RAUC_SERVICE_PID" 2>/dev/null
    [ -n "$RAUC_DBUS_PID" ] && kill "$RAUC_DBUS_PID" 2>/dev/null && wait "$RAUC_DBUS_PID" 2>/dev/null
    rm -f "$d/bus"
    dbus-daemon --config-file="$d/bus.conf" --nofork --nopidfile >"$d/dbus.log" 2>&1 &
    RAUC_DBUS_PID=$!
    for _ in $(seq 50); do [ -S "$d/bus" ] && break; sleep 0.1; done
    export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$d/bus
    rauc service --conf="$d/system.conf" --override-boot-slot=A >"$d/service.log" 2>&1 &
    RAUC_SERVICE_PID=$!
    for _ in $(seq 100); do rauc status >/dev/null 2>&1 && break; sleep 0.1; done
    rauc status >/dev/null 2>&1 || { cat "$d/service.log" >&2; return 1; }
}

# CPU seconds (user+system, field 14+15) and system seconds of a process, and its VmHWM in KiB.
proc_cpu() { awk '{ printf "%.2f %.2f", ($14 + $15) / 100, $15 / 100 }' "/proc/$1/stat"; }
proc_hwm() { awk '/VmHWM/ { print $2 }' "/proc/$1/status"; }

# One run of a contender: prints "wall_s sys_s rss_kib load1 idle_pct".
run() { # $1 name, $2 size, $3 sha, then the command
    local name=$1 size=$2 sha=$3 t0 t1 load idle sys rss got
    shift 3
    dd if=/dev/zero of="$P4" bs=1M count=1 oflag=direct conv=fsync status=none
    dd if=/dev/zero of="$P4" bs=1M count=1 seek=$(( (size >> 20) - 1 )) oflag=direct conv=fsync status=none
    rm -rf "$W/state"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    load=$(load1)
    idle=$(idle_pct)
    [ "$name" = rauc ] && RAUC_SYS0=$(proc_cpu "$RAUC_SERVICE_PID" | cut -d' ' -f2)
    t0=$(now)
    /usr/bin/time -v -o "$W/time.txt" "$@" >"$W/$name.out" 2>"$W/$name.err" || {
        echo "$name failed:" >&2; tail -5 "$W/$name.err" >&2; cat "$W/$name.out" >&2; exit 1; }
    t1=$(now)
    sys=$(awk -F': ' '/System time/ { print $2 }' "$W/time.txt")
    rss=$(awk -F': ' '/Maximum resident/ { print $2 }' "$W/time.txt")
    if [ "$name" = rauc ]; then
        # The work happens in `rauc service`: its system CPU during the run, its peak RSS.
        sys=$(awk -v a="$RAUC_SYS0" -v b="$(proc_cpu "$RAUC_SERVICE_PID" | cut -d' ' -f2)" -v c="$sys" \
            'BEGIN { printf "%.2f", b - a + c }')
        rss=$(proc_hwm "$RAUC_SERVICE_PID")
    fi
    got=$(dd if="$P4" bs=4M iflag=direct,count_bytes count="$size" status=none | sha256sum | cut -d' ' -f1)
    [ "$got" = "$sha" ] || { echo "$name: partition hashes to $got, image is $sha" >&2; exit 1; }
    awk -v a="$t0" -v b="$t1" -v s="$sys" -v r="$rss" -v l="$load" -v i="$idle" \
        'BEGIN { printf "%.3f %s %s %s %s\n", b - a, s, r, l, i }'
}

echo "# $(date -u +%FT%TZ) $(uname -r), $(nproc) CPUs, rounds $ROUNDS, disk $LOOP (direct-io) on $(df --output=source "$W" | tail -1)"
echo "# sha256: ring $("$ROOT/target/release/examples/install_bench" --sha256-speed 1024 2>/dev/null || echo '(example not built)'),"\
     "openssl $(openssl speed -evp sha256 -bytes 1048576 -seconds 1 2>/dev/null | awk '/^sha256/ { print $2 }')"
printf '| %-7s | %-13s | %8s | %5s | %7s | %7s | %7s | %9s | %8s |\n' image contender median_s ratio "MB/s" sys_s rss_MiB "load" "idle_%"
printf '|---------|---------------|---------:|------:|--------:|--------:|--------:|----------:|---------:|\n'
SERIAL=0
for mib in "${SIZES[@]}"; do
    RAW=$W/random-$mib.img
    USR=$W/usr-$mib.img
    head -c "${mib}M" /dev/urandom >"$RAW"
    find /usr/lib /usr/bin /usr/share -type f -size +4k 2>/dev/null | sort | xargs cat 2>/dev/null \
        | head -c "${mib}M" >"$USR" || true
    [ "$(stat -c %s "$USR")" -eq $((mib << 20)) ] || { echo "not enough bytes under /usr for $mib MiB" >&2; exit 1; }
    for kind in raw zstd; do
        if [ $kind = raw ]; then IMG=$RAW; COMP=none; else IMG=$USR; COMP=zstd; fi
        SIZE=$(stat -c %s "$IMG")
        SHA=$(sha256sum "$IMG" | cut -d' ' -f1)
        SERIAL=$((SERIAL + 1))
        NAME=$kind-$mib
        rm -rf "${REPO:?}/$NAME"
        mkdir -p "$REPO/$NAME"
        "$PUBLISH" image --input "$IMG" --out-dir "$REPO/$NAME" --role usr --compression $COMP \
            --entry-out "$W/$NAME.entry.json" >/dev/null
        "$PUBLISH" manifest --out "$REPO/$NAME/manifest.json" --key "$W/keys/release.key" \
            --product bench --channel stable --version "1.0.$SERIAL" --serial "$SERIAL" \
            --expires-in 7d --image "$W/$NAME.entry.json" >/dev/null
        WIRE=$(find "$REPO/$NAME" -type f ! -name manifest.json | head -1)
        URL=$BASE/$NAME/$(basename "$WIRE")
        if [ $kind = raw ]; then
            DD_LOCAL=(dd if="$WIRE" of="$P4" bs=4M oflag=direct conv=fsync status=none)
            DD_HTTP=(bash -c "curl -sf '$URL' | dd of='$P4' bs=4M iflag=fullblock oflag=direct conv=fsync status=none")
        else
            DD_LOCAL=(bash -c "zstd -dc '$WIRE' | dd of='$P4' bs=4M iflag=fullblock oflag=direct conv=fsync status=none")
            DD_HTTP=(bash -c "curl -sf '$URL' | zstd -dc | dd of='$P4' bs=4M iflag=fullblock oflag=direct conv=fsync status=none")
        fi
        A=("$AGENT" --config "$W/config.toml" --json apply)
        ORDER=(dd-local ours-local ours-local-rb dd-http ours-http ours-http-rb)
        if [ $kind = raw ] && [ "$mib" -le "$RAUC_MAX_MIB" ]; then
            if command -v rauc >/dev/null && command -v mksquashfs >/dev/null && command -v dbus-daemon >/dev/null; then
                rauc_setup "$W/rauc" "$IMG" "$P3" "$P4"
                ORDER+=(rauc)
            else
                echo "# rauc skipped: needs rauc, squashfs-tools and dbus (apt-get install rauc squashfs-tools dbus)"
            fi
        fi
        N=${#ORDER[@]}
        for c in "${ORDER[@]}"; do : >"$W/$NAME.$c.runs"; done
        for r in $(seq "$ROUNDS"); do
            # Rotate the starting contender each round so none always runs first.
            for k in $(seq 0 $((N - 1))); do
                c=${ORDER[$(( (k + r) % N ))]}
                case $c in
                    dd-local) line=$(run "$c" "$SIZE" "$SHA" "${DD_LOCAL[@]}") ;;
                    dd-http) line=$(run "$c" "$SIZE" "$SHA" "${DD_HTTP[@]}") ;;
                    ours-local) line=$(run "$c" "$SIZE" "$SHA" "${A[@]}" --manifest "$REPO/$NAME/manifest.json" --no-readback) ;;
                    ours-local-rb) line=$(run "$c" "$SIZE" "$SHA" "${A[@]}" --manifest "$REPO/$NAME/manifest.json") ;;
                    ours-http) line=$(run "$c" "$SIZE" "$SHA" "${A[@]}" --manifest "$BASE/$NAME/manifest.json" --no-readback) ;;
                    ours-http-rb) line=$(run "$c" "$SIZE" "$SHA" "${A[@]}" --manifest "$BASE/$NAME/manifest.json") ;;
                    rauc) line=$(run "$c" "$SIZE" "$SHA" rauc install "$W/rauc/bundle.raucb") ;;
                esac
                echo "$line" >>"$W/$NAME.$c.runs"
                case $c in ours-*) tail -1 "$W/$c.out" >>"$W/$NAME.$c.json" ;; esac
            done
        done
        for c in "${ORDER[@]}"; do
            f=$W/$NAME.$c.runs
            med=$(cut -d' ' -f1 "$f" | median)
            case $c in *-local* | rauc) lim=$(cut -d' ' -f1 "$W/$NAME.dd-local.runs" | median) ;;
                       *) lim=$(cut -d' ' -f1 "$W/$NAME.dd-http.runs" | median) ;; esac
            printf '| %-7s | %-13s | %8s | %5s | %7s | %7s | %7s | %9s | %8s |\n' "$kind $mib" "$c" "$med" \
                "$(awk -v a="$med" -v b="$lim" 'BEGIN { printf "%.2f", a / b }')" \
                "$(awk -v s="$SIZE" -v t="$med" 'BEGIN { printf "%.0f", s / t / 1e6 }')" \
                "$(cut -d' ' -f2 "$f" | median)" \
                "$(cut -d' ' -f3 "$f" | max | awk '{ printf "%.1f", $1 / 1024 }')" \
                "$(cut -d' ' -f4 "$f" | sort -g | sed -n '1p;$p' | paste -sd- -)" \
                "$(cut -d' ' -f5 "$f" | sort -g | sed -n '1p;$p' | paste -sd- -)"
        done
        if [ -f "$W/$NAME.rauc.runs" ] && [ "${ORDER[-1]}" = rauc ]; then
            echo "#   $NAME ours-local-rb / rauc: $(awk -v a="$(cut -d' ' -f1 "$W/$NAME.ours-local-rb.runs" | median)" \
                -v b="$(cut -d' ' -f1 "$W/$NAME.rauc.runs" | median)" 'BEGIN { printf "%.2f", a / b }')"
        fi
        for c in ours-local-rb ours-http-rb; do
            echo "#   $NAME $c stages (last run): $(tail -1 "$W/$NAME.$c.json" | sed -n 's/.*"stages":\({[^}]*}\).*/\1/p')"
        done
    done
done
sgdisk -v "$LOOP" | grep -q "No problems found" || { echo "sgdisk -v reports problems on $LOOP" >&2; exit 1; }
echo "# sgdisk -v: no problems on $LOOP"
