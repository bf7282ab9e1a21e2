# Helpers of tests/lab/run.sh (sourced). See docs/lab.md.

# Each scenario sets FAIL_REASON (first failure wins) instead of exiting, so the run goes on.
fail() {
    [ -z "${FAIL_REASON:-}" ] && FAIL_REASON="$*"
    return 1
}

# `grep -q ARGS` for the end of a pipeline: grep reads all its input. run.sh runs under
# pipefail, and `grep -q` exits at its first match, so a writer still writing (awk printing a
# boot's console) dies of SIGPIPE and the pipeline fails although the line is there: a match
# read as a miss, seen making fleetlock-two-guests fail "QEMU ended before GRUB ran" when the
# console had GRUB's line, and able to fail any check (or pass an `&& fail` one) at random.
has() {
    grep "$@" >/dev/null
}

# tool -> Debian package, for the "how to install" message.
declare -A PKG_OF=(
    [mmdebstrap]=mmdebstrap [systemd-nspawn]=systemd-container [journalctl]=systemd
    [systemctl]=systemd [sgdisk]=gdisk [grub-editenv]=grub-common [grub-script-check]=grub-common [losetup]=mount
    [cargo]="rustup/cargo (https://rustup.rs)" [timeout]=coreutils [tar]=tar
)

prerequisites() {
    local missing=() pkgs=()
    if [ "$(id -u)" -ne 0 ]; then
        echo "the lab must run as root (it boots containers and attaches loop devices): sudo $0 $*" >&2
        return 1
    fi
    for t in "${!PKG_OF[@]}"; do
        if ! command -v "$t" >/dev/null 2>&1; then
            missing+=("$t")
            pkgs+=("${PKG_OF[$t]}")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "missing tools: ${missing[*]}" >&2
        echo "install them with: apt-get install -y $(printf '%s\n' "${pkgs[@]}" | sort -u | grep -v rustup | tr '\n' ' ')" >&2
        return 1
    fi
}

# Free space where the lab builds, printed for the record, and refused below what one run
# needs at its peak (LAB_MIN_FREE_MIB, docs/lab.md: the cached tree, slot images and
# published releases, and one scenario's disks, which go once it passed).
lab_space_ok() {
    local free need=${LAB_MIN_FREE_MIB:-6144}
    free=$(df -Pm "$LAB" | awk 'NR == 2 { print $4 }')
    echo "lab: ${free} MiB free under $LAB (a run needs about ${need} MiB)"
    [ "$free" -ge "$need" ] && return 0
    echo "lab: not enough space under $LAB: ${free} MiB free, ${need} MiB needed (free some, or LAB_DIR=elsewhere)" >&2
    return 1
}

# The agent for the guest: release build of this checkout (LAB_AGENT_BIN overrides). The guest
# is Debian bookworm like the CI host, so the dynamically linked binary runs there.
# update-publish and server-mock (the host side of the QEMU scenarios) come from the same
# directory as the agent, built when missing.
build_agent() {
    if [ -n "${LAB_AGENT_BIN:-}" ]; then
        AGENT_BIN=$(cd "$(dirname "$LAB_AGENT_BIN")" && pwd)/$(basename "$LAB_AGENT_BIN")
        local dir profile=()
        dir=$(dirname "$AGENT_BIN")
        [ "$(basename "$dir")" = release ] && profile=(--release)
        if [ ! -x "$dir/update-publish" ] || [ ! -x "$dir/server-mock" ]; then
            (cd "$REPO" && cargo build "${profile[@]}" -p update-agent --bin update-publish \
                -p server-mock --bin server-mock) >"$LAB/build.log" 2>&1 || return 1
        fi
    else
        (cd "$REPO" && cargo build --release -p update-agent -p server-mock) >"$LAB/build.log" 2>&1 || return 1
        AGENT_BIN=$REPO/target/release/update-agent
    fi
    PUBLISH_BIN=$(dirname "$AGENT_BIN")/update-publish
    SERVER_BIN=$(dirname "$AGENT_BIN")/server-mock
}

# minbase + systemd, cached as a tarball; rebuilt only when missing (delete it to refresh).
# LAB_ROOTFS_TAR: an operator's own base tree (a tarball of a Debian-like root with systemd).
build_base_tree() {
    if [ -n "${LAB_ROOTFS_TAR:-}" ]; then
        [ -s "$LAB_ROOTFS_TAR" ] || return 1
        BASE_TAR=$LAB_ROOTFS_TAR
        return 0
    fi
    local tar=$LAB/rootfs-base.tar
    BASE_TAR=$tar
    [ -f "$tar" ] && [ -s "$tar" ] && return 0
    # mmdebstrap picks its output format from the name's extension, so the partial file must
    # still end in .tar (with ".tar.tmp" it silently writes a directory).
    local part=$LAB/rootfs-base.part.tar
    rm -rf "$part" "$tar"
    mmdebstrap --variant=minbase --include=systemd,systemd-sysv,udev,dbus \
        "$SUITE" "$part" "$MIRROR" >"$LAB/mmdebstrap.log" 2>&1 || return 1
    [ -f "$part" ] || { echo "mmdebstrap did not write a tarball: $part" >&2; return 1; }
    mv "$part" "$tar"
}

# A fresh tree for one scenario, with the agent installed as docs/boot.md tells an operator.
# $1: tree directory.
make_tree() {
    local tree=$1
    rm -rf "$tree"
    mkdir -p "$tree"
    tar -C "$tree" -xf "${BASE_TAR:-$LAB/rootfs-base.tar}" || return 1
    # docs/boot.md, "Installing" (systemctl --root is `systemctl enable` on an offline tree).
    install -m 0755 "$AGENT_BIN" "$tree/usr/bin/update-agent"
    install -d -m 0755 "$tree/etc/update-agent" "$tree/etc/update-agent/health/required.d" \
        "$tree/etc/update-agent/health/wanted.d"
    # LAB_UNITS_DIR: another set of units (an operator's, or an older release's).
    local units=${LAB_UNITS_DIR:-$REPO/docs/systemd} u names=()
    for u in "$units"/*.service; do
        install -m 0644 "$u" "$tree/etc/systemd/system/"
        names+=("$(basename "$u")")
    done
    systemctl --root="$tree" enable "${names[@]}" >/dev/null 2>&1 || return 1
    # Persistent journal, read from the host afterwards.
    mkdir -p "$tree/var/log/journal"
    : >"$tree/etc/machine-id"
    echo lab >"$tree/etc/hostname"
    # The lab's own probe (not part of the product): once the boot has settled it writes
    # what systemd and the agent say into /var/lib/lab/probe.txt and powers off.
    install -d "$tree/var/lib/lab" "$tree/usr/local/sbin"
    install -m 0755 "$HERE/guest/lab-probe" "$tree/usr/local/sbin/lab-probe"
    install -m 0644 "$HERE/guest/lab-probe.service" "$tree/etc/systemd/system/"
    systemctl --root="$tree" enable lab-probe.service >/dev/null 2>&1 || return 1
}

# A GPT disk like the QEMU guest's (BIOS boot, boot, root-a, root-b, data) on a loop device.
# $1: image file. Sets LOOP.
make_disk() {
    local img=$1
    rm -f "$img"
    truncate -s 64M "$img"
    sgdisk -Z "$img" >/dev/null 2>&1
    sgdisk -n 1:2048:+1M -t 1:ef02 -c 1:bios \
        -n 2:0:+16M -t 2:8300 -c 2:boot \
        -n 3:0:+12M -t 3:8300 -c 3:root-a \
        -n 4:0:+12M -t 4:8300 -c 4:root-b \
        -n 5:0:0 -t 5:8300 -c 5:data "$img" >/dev/null || return 1
    sgdisk -v "$img" | has "No problems found" || return 1
    LOOP=$(losetup --find --show "$img") || return 1
}

release_disk() {
    [ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null
    LOOP=""
}

# The agent's configuration for a container boot. The container shares the host's
# /proc/cmdline, so the booted slot comes from a file naming it the way GRUB would.
# $1: tree, $2: disk device, $3: extra TOML appended.
write_config() {
    local tree=$1 dev=$2 extra=${3:-}
    cat >"$tree/etc/update-agent/config.toml" <<EOF
[disk]
path = "$dev"
layout = "custom"

[disk.slots]
flags_role = "root"
a = { root = { label = "root-a" } }
b = { root = { label = "root-b" } }

[boot]
backend = "grubenv"
grubenv_path = "/boot/grub/grubenv"
cmdline_path = "/etc/update-agent/lab-cmdline"

[server]
# Nothing listens here: the daemon only has to start and keep polling.
manifest_url = "http://127.0.0.1:9/manifest.json"
$extra
EOF
    echo "console=ttyS0 rauc.slot=A" >"$tree/etc/update-agent/lab-cmdline"
}

# $1: tree; remaining: grub-editenv set arguments.
write_grubenv() {
    local tree=$1
    shift
    install -d "$tree/boot/grub"
    grub-editenv "$tree/boot/grub/grubenv" create || return 1
    grub-editenv "$tree/boot/grub/grubenv" set "$@" || return 1
}

# Boot the tree under systemd-nspawn until the probe powers it off (bounded).
# $1: tree, $2: log file.
boot_nspawn() {
    local tree=$1 log=$2 rc
    timeout --kill-after=10 "$NSPAWN_TIMEOUT" systemd-nspawn -q -D "$tree" -b \
        --register=no --keep-unit --console=pipe --bind="$LOOP" </dev/null >"$log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        fail "the container did not power off within ${NSPAWN_TIMEOUT}s (log: $log)"
        return 1
    fi
    if [ ! -s "$tree/var/lib/lab/probe.txt" ]; then
        fail "the probe never ran (nspawn exit $rc; log: $log)"
        return 1
    fi
}

# Whole journal of the last boot, as text. $1: tree.
journal_of() {
    journalctl -D "$1/var/log/journal" -b -o short-monotonic --no-pager 2>/dev/null
}

# Fails on any ordering cycle or deleted job anywhere in the journal. $1: journal text file.
assert_no_cycle() {
    if grep -qiE "ordering cycle|deleted to break" "$1"; then
        fail "systemd reports an ordering cycle: $(grep -iE 'ordering cycle|deleted to break' "$1" | head -2 | tr '\n' ' ')"
        return 1
    fi
}

# $1: probe file, $2: unit, $3: wanted ActiveState, $4: wanted Result.
assert_unit() {
    local line _tag _name active result
    line=$(grep "^unit $2 " "$1") || { fail "probe has no line for $2"; return 1; }
    # line: unit NAME ACTIVE RESULT [STATUS]
    read -r _tag _name active result _ <<<"$line"
    if [ "$active" != "$3" ] || [ "$result" != "$4" ]; then
        fail "$2 is $active/$result, expected $3/$4"
        return 1
    fi
}
