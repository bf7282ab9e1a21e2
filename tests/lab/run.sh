#!/bin/bash
# The lab: the shipped units and the agent on a real systemd (docs/lab.md).
#
#   tests/lab/run.sh [SCENARIO...]      (default: every scenario; must run as root)
#
# Prints `PASS name (seconds)` or `FAIL name: what differed` per scenario, then
# `N passed, M failed`; exits non-zero on any failure or when a prerequisite is missing.
# Everything it builds is cached under target/lab/ (LAB_DIR overrides); it installs nothing.
set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LAB=${LAB_DIR:-$REPO/target/lab}
MIRROR=${LAB_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# Bounded waits: a guest that hangs fails its scenario, it never blocks CI forever.
NSPAWN_TIMEOUT=${LAB_NSPAWN_TIMEOUT:-240}

ALL_SCENARIOS=(grub-cfg units-nspawn units-nspawn-trial units-nspawn-veto
    daemon-update bad-release-rollback loader-fallback committed-slot-falls-back apply-by-hand
    crash-during-install crash-at-flip drill fleetlock-two-guests)

# shellcheck source=tests/lab/lib.sh
. "$HERE/lib.sh"
# shellcheck source=tests/lab/scenarios/nspawn.sh
. "$HERE/scenarios/nspawn.sh"
# shellcheck source=tests/lab/scenarios/grub.sh
. "$HERE/scenarios/grub.sh"
# shellcheck source=tests/lab/lib-qemu.sh
. "$HERE/lib-qemu.sh"
# shellcheck source=tests/lab/scenarios/qemu.sh
. "$HERE/scenarios/qemu.sh"
# Scenarios of other backends (the boot helper's: bls, uboot, efi), when present; each file
# appends its names to ALL_SCENARIOS.
for f in "$HERE"/scenarios/*.sh; do
    case $(basename "$f") in nspawn.sh | grub.sh | qemu.sh) continue ;; esac
    # shellcheck source=/dev/null
    . "$f"
done

# A passed scenario's disks and trees go: each guest disk is about 550 MiB, and the
# whole run kept 9 GiB of them and filled a CI machine's disk (bls-cycle failed with ENOSPC).
# A failed scenario keeps everything for a look; LAB_KEEP=1 keeps the passed ones too.
lab_forget_passed() {
    [ "${LAB_KEEP:-0}" = 1 ] && return 0
    local q=${1//-/_}
    rm -rf "${QRUN:?}/$q" "$QRUN/$q".img "$QRUN/$q"-*.img "$QRUN/$q".img.vars "${LAB:?}/trees/$1" "$LAB/trees/$1.img"
}

main() {
    # A scenario that fails half-way leaves no QEMU or server behind.
    trap 'qemu_end' EXIT
    local scenarios=("$@")
    [ ${#scenarios[@]} -eq 0 ] && scenarios=("${ALL_SCENARIOS[@]}")
    for s in "${scenarios[@]}"; do
        if ! declare -F "scenario_${s//-/_}" >/dev/null; then
            echo "unknown scenario $s (known: ${ALL_SCENARIOS[*]})" >&2
            exit 2
        fi
    done
    prerequisites || exit 2
    qemu_prerequisites || exit 2
    mkdir -p "$LAB"
    build_agent || { echo "FAIL build: cargo build --release -p update-agent failed (see $LAB/build.log)"; exit 1; }
    build_base_tree || { echo "FAIL build: mmdebstrap of the $SUITE tree failed (see $LAB/mmdebstrap.log)"; exit 1; }
    lab_space_ok || exit 2
    local passed=0 failed=0
    for s in "${scenarios[@]}"; do
        local start end why
        start=$(date +%s)
        FAIL_REASON=""
        # Per-scenario machine settings start empty: the loader scenarios set OVMF's firmware
        # here, and a GRUB (BIOS) scenario after them booted OVMF's shell and waited out its
        # 45-minute bound (seen in CI order: bls-cycle, then fleetlock-two-guests).
        QEMU_EXTRA_ARGS=()
        if "scenario_${s//-/_}" && [ -z "$FAIL_REASON" ]; then
            end=$(date +%s)
            echo "PASS $s ($((end - start))s)"
            passed=$((passed + 1))
            lab_forget_passed "$s"
        else
            why=${FAIL_REASON:-scenario returned non-zero}
            echo "FAIL $s: $why"
            failed=$((failed + 1))
        fi
    done
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

main "$@"
