# The uboot scenario (issue 12): the agent's uboot backend and the shipped boot script's slot
# selection in a real U-Boot (Debian's u-boot-qemu, qemu-x86 build, as QEMU's firmware),
# booting the Debian kernel and systemd of each slot. The cycle of bls-cycle, from slot A at
# 1.0.0 with tries = 1:
#   1. 1.1.0 (good): the daemon installs it into B and stages it, U-Boot boots B, the health
#      check commits it;
#   2. 1.2.0 (its required check fails): installed into A, A's trial fails, the agent rolls
#      back to B;
#   3. 1.3.0 (never reaches the health check): installed into A, the trial boot is cut, U-Boot
#      finds A's attempts spent and falls back to B.
# After every step the environment on the boot partition is read with fw_printenv (Debian's
# libubootenv-tool) and U-Boot's own console says which slot it chose and why.
# Sourced after scenarios/loaders.sh (the glob's order), whose helpers it uses.

ALL_SCENARIOS+=(uboot-cycle)

# shellcheck source=tests/lab/lib-uboot.sh
. "$HERE/lib-uboot.sh"

# The environment is exactly these NAME=VALUE lines (fw_printenv of the boot partition).
uboot_env_is() {
    local got want
    got=$(uboot_env "$DISK") || { fail "fw_printenv cannot read uboot.env on the boot partition ($QRUN/$Q.envcheck)"; return 1; }
    want=$(printf '%s\n' "$@" | LC_ALL=C sort)
    [ "$got" = "$want" ] || { fail "U-Boot environment is '$(echo $got)', expected '$*'"; return 1; }
}

# Boot under U-Boot and check that its script chose slot $1 and the kernel got that slot's
# root; $2: the attempts U-Boot saw for it (its "Found valid slot" line).
uboot_loaded() {
    local slot=$1 left=$2 want=/dev/vda3 got
    [ "$slot" = B ] && want=/dev/vda4
    QEMU_EXTRA_ARGS=(-bios "$UBOOT_ROM")
    qemu_start "$Q" "$DISK"
    qemu_wait "$Q" 'LAB-UBOOT-BOOT |LAB-UBOOT-FAIL|No valid slot' "$L_T_LOADER" || return 1
    loaders_console_has "LAB-UBOOT-ENV imported" || { fail "U-Boot did not import uboot.env ($QRUN/$Q.console)"; return 1; }
    loaders_console_has "Found valid slot $slot, $left attempts remaining" \
        || { fail "U-Boot's script did not choose slot $slot with $left attempts ($QRUN/$Q.console)"; return 1; }
    qemu_wait "$Q" 'LAB-INITRD root=' "$L_T_LOADER" || return 1
    got=$(qemu_console_boot "$Q" | sed -n 's/.*LAB-INITRD root=\([^ ]*\).*/\1/p' | head -1)
    [ "$got" = "$want" ] || { fail "U-Boot started root=$got, expected slot $slot ($want)"; return 1; }
}

# U-Boot boots slot $1 ($2 attempts before it counts), the boot settles running version $3.
uboot_boot_expect() {
    local slot=$1 left=$2 ver=$3 got
    uboot_loaded "$slot" "$left" || return 1
    qemu_wait "$Q" 'LAB-SETTLED' "$Q_T_SETTLE" || return 1
    got=$(qemu_report "$Q" slot)
    [ "$got" = "$slot" ] || { fail "the guest says it booted slot '$got', U-Boot started $slot"; return 1; }
    got=$(qemu_report "$Q" version)
    [ "$got" = "$ver" ] || { fail "slot $slot runs VERSION_ID '$got', expected $ver"; return 1; }
}

scenario_uboot_cycle() {
    Q=uboot_cycle
    declare -F loaders_console_has >/dev/null || { fail "scenarios/loaders.sh was not sourced before uboot.sh"; return 1; }
    uboot_prepare || return 1
    rm -rf "$QRUN/$Q".* "$QRUN/$Q"
    mkdir -p "$QRUN/$Q"
    DISK=$QRUN/$Q.img
    qemu_server_start "$QRUN/$Q/repo" || return 1
    local v1 v2 bad nohealth
    LOADERS_HOOK=$UBOOT_HOOK
    loaders_image uboot-v1.0.0 1.0.0 good || return 1
    v1=$SLOT_IMG
    loaders_image uboot-v1.1.0 1.1.0 good || return 1
    v2=$SLOT_IMG
    loaders_image uboot-v1.2.0-bad 1.2.0 bad-check || return 1
    bad=$SLOT_IMG
    loaders_image uboot-v1.3.0-nohealth 1.3.0 no-health || return 1
    nohealth=$SLOT_IMG
    uboot_disk "$DISK" "$v1" || { fail "could not assemble the U-Boot disk"; return 1; }
    uboot_env_is 'BOOT_ORDER=A' 'BOOT_A_LEFT=1' 'BOOT_B_LEFT=0' || return 1
    qemu_publish 1.1.0 "$v2" 1 || { fail "publish 1.1.0 failed"; return 1; }

    # 1. U-Boot boots A (its one attempt); the normal boot's health check gives it back; the
    # daemon installs 1.1.0 into B and stages it (B first, one attempt, our trial mark).
    uboot_boot_expect A 1 1.0.0 || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    uboot_env_is 'BOOT_ORDER=B A' 'BOOT_A_LEFT=1' 'BOOT_B_LEFT=1' 'UPDATE_AGENT_TRIAL=B' || return 1
    # U-Boot counts B down (saved by the script's export) and boots it; the check commits.
    uboot_boot_expect B 1 1.1.0 || return 1
    qemu_unit_is update-agent-health.service active/success || return 1
    qemu_unit_is update-agent-commit.service active/success || return 1
    qemu_status_is '.booted.slot == "B"' '.phase.phase == "committed"' '.boot.next == "B"' || return 1
    qemu_poweroff || return 1
    uboot_env_is 'BOOT_ORDER=B A' 'BOOT_A_LEFT=1' 'BOOT_B_LEFT=1' || return 1

    # 2. 1.2.0 fails its required check. B's normal boot gets its attempt back, A is written
    # and staged; A's trial fails and the agent rolls back (A out of BOOT_ORDER).
    qemu_publish 1.2.0 "$bad" 2 || { fail "publish 1.2.0 failed"; return 1; }
    uboot_boot_expect B 1 1.1.0 || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    uboot_env_is 'BOOT_ORDER=A B' 'BOOT_A_LEFT=1' 'BOOT_B_LEFT=1' 'UPDATE_AGENT_TRIAL=A' || return 1
    uboot_loaded A 1 || return 1
    qemu_wait_exit "$Q" "$Q_T_SETTLE" || return 1
    loaders_console_has "LAB-SETTLED" && { fail "the failed trial of A settled instead of rolling back"; return 1; }
    uboot_env_is 'BOOT_ORDER=B' 'BOOT_A_LEFT=0' 'BOOT_B_LEFT=1' || return 1

    # 3. 1.3.0 never reaches its health check: staged in A, its one attempt is spent by the
    # cut boot; U-Boot skips A and boots B, and the agent records the fallback.
    qemu_publish 1.3.0 "$nohealth" 3 || { fail "publish 1.3.0 failed"; return 1; }
    uboot_boot_expect B 1 1.1.0 || return 1
    qemu_history_is '[.entries[] | select(.event == "rolled_back" and .version == "1.2.0")] | length == 1' \
        '.denylist | map(.version) | index("1.2.0") != null' || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    uboot_env_is 'BOOT_ORDER=A B' 'BOOT_A_LEFT=1' 'BOOT_B_LEFT=1' 'UPDATE_AGENT_TRIAL=A' || return 1
    uboot_boot_expect A 1 1.3.0 || return 1
    qemu_unit_is update-agent-commit.service failed/exit-code || return 1
    qemu_kill "$Q"
    uboot_env_is 'BOOT_ORDER=A B' 'BOOT_A_LEFT=0' 'BOOT_B_LEFT=1' 'UPDATE_AGENT_TRIAL=A' || return 1
    uboot_boot_expect B 1 1.1.0 || return 1
    qemu_history_is '[.entries[] | select(.event == "rolled_back" and .version == "1.3.0")] | length == 1' || return 1
    qemu_status_is '.booted.slot == "B"' '.boot.next == "B"' || return 1
    qemu_poweroff || return 1
    # B keeps its attempt after the fallback's confirmation; A stays spent.
    local env
    env=$(uboot_env "$DISK") || { fail "fw_printenv cannot read uboot.env"; return 1; }
    printf '%s\n' "$env" | has -x 'BOOT_B_LEFT=1' && printf '%s\n' "$env" | has -x 'BOOT_A_LEFT=0' \
        || { fail "after the fallback the environment is '$(echo $env)', expected BOOT_B_LEFT=1 and BOOT_A_LEFT=0"; return 1; }
    qemu_disk_ok || return 1
    qemu_end
    [ -z "$FAIL_REASON" ]
}
