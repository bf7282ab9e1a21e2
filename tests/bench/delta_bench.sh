#!/usr/bin/env bash
# Delta update benchmark (issue 13, docs/delta.md): real Debian rootfs images, ours against
# full zstd, casync (64 KiB and 16 KiB average chunks), zchunk and xdelta3, on the same pairs.
#
#   tests/bench/delta_bench.sh [WORKDIR]
#
# Installs nothing. Needs (Debian): mmdebstrap e2fsprogs zstd casync zchunk xdelta3 time,
# and cargo (builds the agent's delta_fetch example, update-publish and server-mock).
# Builds three trees with mmdebstrap (bookworm minbase; + one package; + twenty packages),
# each made into a 512 MiB ext4 image with fixed UUID, hash seed and timestamps, and the first
# two into reproducible squashfs-zstd images. Pairs:
#   a) minbase -> minbase + less            (one package)
#   b) minbase -> minbase + 20 packages     (about twenty packages)
#   c) random bytes -> minbase + less        (unrelated seed: worst case)
#   s) squashfs minbase -> squashfs minbase + less (a compressed, read-only filesystem)
# For each method: bytes fetched (as % of the new raw image), requests, wall time, peak RSS.
# PAIRS="a b c s" selects pairs; OURS_SIZES the chunk sizes of ours (MIN/AVG/MAX, spaces);
# PREP_ONLY=1 only builds the images (cached in WORKDIR for the next run).
set -euo pipefail

missing=()
for t in mmdebstrap mke2fs debugfs mksquashfs zstd casync zck zck_delta_size xdelta3 /usr/bin/time cargo python3 curl; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
if ((${#missing[@]})); then
  echo "missing: ${missing[*]}" >&2
  echo "install: apt-get install -y mmdebstrap e2fsprogs squashfs-tools zstd casync zchunk xdelta3 time python3 curl" >&2
  exit 1
fi

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-$(mktemp -d /tmp/delta-bench.XXXXXX)}
mkdir -p "$WORK"
cd "$WORK"
EPOCH=1700000000
IMG_MIB=512


tree() { # name extra-packages
  [[ -s "$1.tar" ]] || SOURCE_DATE_EPOCH=$EPOCH mmdebstrap --variant=minbase --mode=unshare \
    ${2:+--include=$2} bookworm "$1.tar" >"$1.mmdebstrap.log" 2>&1
}

# Deterministic ext4: fixed UUID, hash seed, fs timestamps (E2FSPROGS_FAKE_TIME), every
# file's mtime set before mke2fs -d, then atime/ctime/crtime of every inode set with debugfs
# (mke2fs -d copies them from the tree, so they would differ from build to build).
ext4() { # name
  local d="$1.root"
  rm -rf "$d" && mkdir "$d" && tar -C "$d" -xf "$1.tar"
  find "$d" -exec touch -h -d "@$EPOCH" {} +
  rm -f "$1.ext4" && truncate -s ${IMG_MIB}M "$1.ext4"
  E2FSPROGS_FAKE_TIME=$EPOCH mke2fs -q -t ext4 -U 6a1c0e27-3b1b-4c1a-9f6e-000000000001 \
    -E hash_seed=6a1c0e27-3b1b-4c1a-9f6e-000000000002,root_owner=0:0 -I 256 -d "$d" "$1.ext4"
  E2FSPROGS_FAKE_TIME=$EPOCH python3 - "$1.ext4" "$EPOCH" <<'PY'
import subprocess, sys
img, t = sys.argv[1], sys.argv[2]
out = subprocess.run(["debugfs", "-R", "stats", img], capture_output=True, text=True).stdout
inodes = int([l for l in out.splitlines() if l.startswith("Inode count:")][0].split()[-1])
cmds = []
for i in range(1, inodes + 1):
    for f in ("atime", "ctime", "mtime", "crtime"):
        cmds.append(f"sif <{i}> {f} {t}")
cmds_in = "\n".join(cmds) + "\n"
subprocess.run(["debugfs", "-w", "-f", "-", img], input=cmds_in, capture_output=True, text=True)
PY
}

tree t1 ""
tree t2 "less"
tree t3 "less,nano,curl,ca-certificates,openssl,procps,iproute2,iputils-ping,netbase,kmod,psmisc,file,bzip2,xz-utils,zstd,lsof,strace,htop,jq,rsync"
# Reproducible squashfs (zstd): mksquashfs refuses -reproducible's time options while
# SOURCE_DATE_EPOCH is set, so it is unset here.
sqfs() { # name
  local d="$1.sq-root"
  rm -rf "$d" && mkdir "$d" && tar -C "$d" -xf "$1.tar"
  env -u SOURCE_DATE_EPOCH mksquashfs "$d" "$1.sqfs" -comp zstd -reproducible -mkfs-time 0 \
    -all-time 0 -noappend -no-progress -quiet >/dev/null
}
for t in t1 t2 t3; do [[ -s $t.ext4 ]] || ext4 $t; done
for t in t1 t2; do [[ -s $t.sqfs ]] || sqfs $t; done
[[ -s rand.ext4 ]] || head -c ${IMG_MIB}M /dev/urandom >rand.ext4
RAW=$((IMG_MIB << 20))

# Determinism check: a second build of t1 must be byte-identical.
if [[ ! -s t1b.ext4 ]]; then cp t1.tar t1b.tar; ext4 t1b; fi
if cmp -s t1.ext4 t1b.ext4; then DET="byte-identical"; else DET="DIFFERENT ($(cmp t1.ext4 t1b.ext4 | head -1))"; fi
if [[ ! -s t1b.sqfs ]]; then sqfs t1b; fi
if cmp -s t1.sqfs t1b.sqfs; then DETS="byte-identical"; else DETS="DIFFERENT ($(cmp t1.sqfs t1b.sqfs | head -1))"; fi
# PREP_ONLY=1: build (and cache in WORKDIR) the trees and images, nothing else.
[[ -n ${PREP_ONLY:-} ]] && { echo "images ready in $WORK"; exit 0; }

# One cargo invocation: building server-mock alone would rebuild dependencies with other features.
(cd "$ROOT" && cargo build -q --release -p update-agent --example delta_fetch --bin update-publish -p server-mock)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
PAIRS=${PAIRS:-"a b c s"}
OURS_SIZES=${OURS_SIZES:-"4096/16384/65536 2048/8192/32768"}

pct() { python3 -c "print(f'{100*$1/$RAW:.3f}%')"; }
rss() { awk '/Maximum resident/ {print $6 " KiB"}' "$1"; }
row() { printf '| %s | %s | %s | %s | %s | %s |\n' "$@"; }

serve() { # dir -> sets URL, SPID
  # exec: the coproc PID is then the server itself, so stop() ends it.
  coproc SM { exec "$BIN/server-mock" --dir "$1" 2>/dev/null; }
  read -r _ _ URL <&"${SM[0]}"
  SPID=$SM_PID
}
# Bytes sent and requests, from the server's own log (the same measure for every method).
served() { curl -s "$URL/_admin/log" | python3 -c "import json,sys; l=json.load(sys.stdin); print(sum(e['bytes_sent'] for e in l), len(l))"; }
stop() { kill "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null || true; }
wall() { awk -F': ' '/Elapsed/ {print $2}' "$1"; }

echo "ext4 ${IMG_MIB} MiB images from Debian bookworm (mmdebstrap minbase); two builds of the same tree: $DET"
echo "squashfs-zstd images of t1/t2: $(stat -c %s t1.sqfs)/$(stat -c %s t2.sqfs) bytes; two builds of the same tree: $DETS"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
row pair method "fetched (% of raw)" requests "wall (m:s)" "peak RSS"
row --- --- --- --- --- ---
for name in $PAIRS; do
  case $name in
    a) old=t1.ext4 new=t2.ext4 ;;
    b) old=t1.ext4 new=t3.ext4 ;;
    c) old=rand.ext4 new=t2.ext4 ;;
    s) old=t1.sqfs new=t2.sqfs ;;
    *) echo "unknown pair $name" >&2; exit 1 ;;
  esac
  RAW=$(stat -c %s "$new")
  rm -rf "repo-$name" && mkdir "repo-$name"
  zstd -q -3 -f "$new" -o "repo-$name/full.zst"
  serve "repo-$name"
  /usr/bin/time -v -o "full-$name.time" bash -c "curl -sf '$URL/full.zst' | zstd -dc >'full-$name.out'"
  cmp -s "full-$name.out" "$new" || { echo "full: wrong image for $name" >&2; exit 1; }
  read -r b r < <(served); stop
  row "$name" "full zstd -3 (curl \| zstd -d)" "$(pct "$b")" "$r" "$(wall "full-$name.time")" "$(rss "full-$name.time")"

  for sizes in $OURS_SIZES; do
    d="ours-$name-${sizes//\//-}"; rm -rf "$d" && mkdir "$d"
    "$BIN/update-publish" image --chunked --chunk-sizes "$sizes" --input "$new" --out-dir "$d" \
      --role root --entry-out "$d/entry.json" >/dev/null
    serve "$d"
    /usr/bin/time -v -o "$d.time" "$BIN/examples/delta_fetch" "$old" \
      "$d/entry.json" "$URL" "$d.out" >"$d.json"
    cmp -s "$d.out" "$new" || { echo "ours: wrong image for $name" >&2; exit 1; }
    read -r b r < <(served); stop
    ix=$(stat -c %s "$d"/*.idx)
    row "$name" "ours (fastcdc ${sizes}, index $((ix >> 10)) KiB)" "$(pct "$b")" "$r" "$(wall "$d.time")" "$(rss "$d.time")"
  done

  for avg in 65536 16384; do
    d="ca-$name-$avg"; rm -rf "$d" && mkdir -p "$d"
    casync make --chunk-size=$avg --store="$d/store.castr" "$d/img.caibx" "$new" >/dev/null
    serve "$d"
    /usr/bin/time -v -o "$d.time" casync extract --store="$URL/store.castr" --seed="$old" \
      "$URL/img.caibx" "$d.out" 2>"$d.log" || { echo "casync failed: $(tail -2 "$d.log")" >&2; }
    read -r b r < <(served); stop
    cmp -s "$d.out" "$new" || echo "casync $avg: wrong or no image for $name" >&2
    row "$name" "casync $((avg >> 10)) KiB" "$(pct "$b")" "$r" "$(wall "$d.time")" "$(rss "$d.time")"
  done

  d="zck-$name"; rm -rf "$d" && mkdir -p "$d"
  zck -q -o "$d/new.zck" "$new" 2>/dev/null || zck -o "$d/new.zck" "$new" >/dev/null
  zck -o "$d/old.zck" "$old" >/dev/null 2>&1
  # server-mock answers multi-range requests with the whole file (RFC 9110 allows it), which
  # zckdl would count as a full download: measure what zchunk needs with its own tool.
  zb=$(zck_delta_size "$d/old.zck" "$d/new.zck" 2>/dev/null | awk '/download/ {for(i=1;i<=NF;i++) if ($i ~ /^[0-9]+$/) {print $i; exit}}')
  row "$name" "zchunk (zck_delta_size)" "$(pct "${zb:-0}")" "-" - -

  /usr/bin/time -v -o "xd-$name.time" xdelta3 -e -f -9 -S djw -s "$old" "$new" "xd-$name.vcdiff"
  row "$name" "xdelta3 -9 (patch size)" "$(pct "$(stat -c %s "xd-$name.vcdiff")")" 1 "$(wall "xd-$name.time")" "$(rss "xd-$name.time")"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
