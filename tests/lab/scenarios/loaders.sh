# Loader scenarios (issue 12): the agent's bls and efi backends in the real loaders, under
# OVMF (UEFI) in QEMU: systemd-boot's boot counting (bls-cycle) and the firmware's own
# BootNext/BootOrder (efi-bootnext). Each runs the same cycle from slot A at 1.0.0:
#   1. 1.1.0 (good): the daemon installs it into B and stages it, the loader boots B, the
#      health check commits it;
#   2. 1.2.0 (its required check fails): installed into A, A's trial fails, the agent rolls
#      back to B;
#   3. 1.3.0 (never reaches the health check): installed into A, the trial boot is cut, the
#      loader itself goes back to B.
# After every step the loader's own state is judged: the entry file names on the ESP
# (systemd-boot renames them) or efibootmgr's view of BootCurrent/BootNext/BootOrder.

ALL_SCENARIOS+=(bls-cycle efi-bootnext)

# shellcheck source=tests/lab/lib-loaders.sh
. "$HERE/lib-loaders.sh"

# OVMF + kernel + systemd to the initrd's line (bounded).
L_T_LOADER=${LAB_T_LOADER:-240}

# Fresh run files for scenario $1 with backend $2. Sets Q, DISK.
loaders_begin() {
    Q=${1//-/_}
    loaders_prepare "$2" || return 1
    rm -rf "$QRUN/$Q".* "$QRUN/$Q"
    mkdir -p "$QRUN/$Q"
    DISK=$QRUN/$Q.img
    qemu_server_start "$QRUN/$Q/repo" || return 1
}

# The current boot's console has a line matching the extended regex.
loaders_console_has() {
    qemu_console_boot "$Q" | has -E "$1"
}

# The four releases of the cycle (image name prefix $1), the disk with 1.0.0 in A, and 1.1.0
# published. Sets the caller's v1, v2, bad, nohealth.
loaders_cycle_images() {
    loaders_image "$1-v1.0.0" 1.0.0 good || return 1
    v1=$SLOT_IMG
    loaders_image "$1-v1.1.0" 1.1.0 good || return 1
    v2=$SLOT_IMG
    loaders_image "$1-v1.2.0-bad" 1.2.0 bad-check || return 1
    bad=$SLOT_IMG
    loaders_image "$1-v1.3.0-nohealth" 1.3.0 no-health || return 1
    nohealth=$SLOT_IMG
    loaders_disk "$DISK" "$v1" || { fail "could not assemble the UEFI disk"; return 1; }
    qemu_publish 1.1.0 "$v2" 1 || { fail "publish 1.1.0 failed"; return 1; }
}

# Start the guest under OVMF on DISK.
loaders_start() {
    loaders_fw "$DISK"
    qemu_start "$Q" "$DISK"
}

# Boot and check that the loader started slot $1 (the initrd names the root it was given):
# sets LOADED.
loaders_loaded() {
    local want=/dev/vda3
    [ "$1" = B ] && want=/dev/vda4
    loaders_start
    qemu_wait "$Q" 'LAB-INITRD root=' "$L_T_LOADER" || return 1
    LOADED=$(qemu_console_boot "$Q" | sed -n 's/.*LAB-INITRD root=\([^ ]*\).*/\1/p' | head -1)
    [ "$LOADED" = "$want" ] || { fail "the loader started root=$LOADED, expected slot $1 ($want)"; return 1; }
}

# The loader boots slot $1, the boot settles running version $2.
loaders_boot_expect() {
    local slot=$1 ver=$2 got
    loaders_loaded "$slot" || return 1
    qemu_wait "$Q" 'LAB-SETTLED' "$Q_T_SETTLE" || return 1
    got=$(qemu_report "$Q" slot)
    [ "$got" = "$slot" ] || { fail "the guest says it booted slot '$got', the loader started $slot"; return 1; }
    got=$(qemu_report "$Q" version)
    [ "$got" = "$ver" ] || { fail "slot $slot runs VERSION_ID '$got', expected $ver"; return 1; }
}

# --- bls: systemd-boot ---------------------------------------------------------------------

# The ESP's entries (QEMU stopped) are exactly as many files as regexes given, each matching
# one of them (extended regexes, whole names).
bls_entries_are() {
    local names re
    names=$(loaders_esp_ls "$DISK" loader/entries)
    [ "$(printf '%s\n' "$names" | grep -c .)" -eq $# ] || { fail "ESP loader/entries is '$(echo $names)', expected $# entries: $*"; return 1; }
    for re in "$@"; do
        printf '%s\n' "$names" | has -xE "$re" || { fail "ESP loader/entries is '$(echo $names)', none is /$re/"; return 1; }
    done
}

# In the guest: `bootctl list` and `update-agent status` agree on the entry systemd-boot
# boots next ("(default)") and the booted one ("(selected)"); $1: slot booted, $2: slot next.
bls_bootctl_agrees() {
    local booted=$1 next=$2 out def sel
    qemu_run "$Q" "bootctl --no-pager list 2>&1" 60 || return 1
    out=$CMD_OUT
    printf '%s\n' "$out" >"$QRUN/$Q.bootctl.$QCMD_N"
    # The id line after the title carrying the marker.
    def=$(printf '%s\n' "$out" | awk '/title:.*\(default\)/ {m=1} m && /id:/ {print $2; exit}')
    sel=$(printf '%s\n' "$out" | awk '/title:.*\(selected\)/ {m=1} m && /id:/ {print $2; exit}')
    case $def in *update-agent-a*) def=A ;; *update-agent-b*) def=B ;; *) def="?$def" ;; esac
    case $sel in *update-agent-a*) sel=A ;; *update-agent-b*) sel=B ;; *) sel="?$sel" ;; esac
    [ "$def" = "$next" ] && [ "$sel" = "$booted" ] \
        || { fail "bootctl list: default $def, selected $sel; expected $next, $booted ($QRUN/$Q.bootctl.$QCMD_N)"; return 1; }
    qemu_run "$Q" "update-agent --json status 2>&1 | tr -d '\\n'; echo" 60 || return 1
    printf '%s' "$CMD_OUT" | grep '{' | sed 's/^[^{]*{/{/' >"$QRUN/$Q.status.$QCMD_N"
    [ "$(jq -r "(.boot.next == \"$next\") and (.booted.slot == \"$booted\")" "$QRUN/$Q.status.$QCMD_N" 2>/dev/null)" = true ] \
        || { fail "update-agent status disagrees with bootctl (next $next, booted $booted): $QRUN/$Q.status.$QCMD_N"; return 1; }
}

# systemd-boot's LoaderBootCountPath of this boot (UTF-16 without the NULs), in the guest.
bls_count_path() {
    qemu_run "$Q" "tr -d '\\000' </sys/firmware/efi/efivars/LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f 2>&1 | tr -dc '[:print:]'; echo" 30 || return 1
    COUNT_PATH=$CMD_OUT
}

scenario_bls_cycle() {
    loaders_begin bls-cycle bls || return 1
    local v1 v2 bad nohealth
    loaders_cycle_images bls || return 1

    # 1. systemd-boot boots A's committed entry; the daemon installs 1.1.0 into B, stages it
    # (one rename: a generation prefix so it sorts first, and the counter) and reboots.
    loaders_boot_expect A 1.0.0 || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    bls_entries_are 'update-agent-a\.conf' '1-update-agent-b\+1\.conf' || return 1
    # systemd-boot counts (renames +1 to +0-1) and boots B; the health check commits it.
    loaders_boot_expect B 1.1.0 || return 1
    qemu_unit_is update-agent-health.service active/success || return 1
    qemu_unit_is update-agent-commit.service active/success || return 1
    qemu_status_is '.booted.slot == "B"' '.phase.phase == "committed"' || return 1
    bls_count_path || return 1
    case $COUNT_PATH in *'\loader\entries\1-update-agent-b+0-1.conf'*) ;;
        *) fail "LoaderBootCountPath is '$COUNT_PATH', expected systemd-boot's rename to 1-update-agent-b+0-1.conf"; return 1 ;; esac
    bls_bootctl_agrees B B || return 1
    qemu_poweroff || return 1
    bls_entries_are 'update-agent-a\.conf' '1-update-agent-b\.conf' || return 1

    # 2. 1.2.0 fails its required check: installed into A, A's trial boot (counted), the agent
    # marks it bad and reboots; systemd-boot boots B again.
    qemu_publish 1.2.0 "$bad" 2 || { fail "publish 1.2.0 failed"; return 1; }
    loaders_boot_expect B 1.1.0 || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    bls_entries_are '1-update-agent-b\.conf' '2-update-agent-a\+1\.conf' || return 1
    loaders_loaded A || return 1
    qemu_wait_exit "$Q" "$Q_T_SETTLE" || return 1
    loaders_console_has "LAB-SETTLED" && { fail "the failed trial of A settled instead of rolling back"; return 1; }
    # +0-1: systemd-boot's count (DONE=1), kept by the agent's rollback (+0 = bad).
    bls_entries_are '1-update-agent-b\.conf' '2-update-agent-a\+0-1\.conf' || return 1

    # 3. 1.3.0 never reaches its health check: installed into A, its trial boot is cut;
    # systemd-boot skips the spent entry and boots B, and the agent records the fallback.
    qemu_publish 1.3.0 "$nohealth" 3 || { fail "publish 1.3.0 failed"; return 1; }
    loaders_boot_expect B 1.1.0 || return 1
    qemu_history_is '[.entries[] | select(.event == "rolled_back" and .version == "1.2.0")] | length == 1' \
        '.denylist | map(.version) | index("1.2.0") != null' || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    bls_entries_are '1-update-agent-b\.conf' '3-update-agent-a\+1\.conf' || return 1
    loaders_boot_expect A 1.3.0 || return 1
    qemu_unit_is update-agent-commit.service failed/exit-code || return 1
    qemu_kill "$Q"
    bls_entries_are '1-update-agent-b\.conf' '3-update-agent-a\+0-1\.conf' || return 1
    loaders_boot_expect B 1.1.0 || return 1
    qemu_history_is '[.entries[] | select(.event == "rolled_back" and .version == "1.3.0")] | length == 1' || return 1
    bls_bootctl_agrees B B || return 1
    qemu_poweroff || return 1
    qemu_disk_ok || return 1
    qemu_end
    [ -z "$FAIL_REASON" ]
}

# --- efi: the firmware's boot manager --------------------------------------------------------

# In the guest: efibootmgr's BootCurrent, BootNext (or "-") and BootOrder (the slots' entries
# only, in order) are $1, $2, $3; and update-agent status agrees (booted slot, next slot).
efi_vars_are() {
    local cur=$1 next=$2 order=$3 out got_cur got_next got_order
    qemu_run "$Q" "efibootmgr 2>&1" 60 || return 1
    out=$CMD_OUT
    printf '%s\n' "$out" >"$QRUN/$Q.efibootmgr.$QCMD_N"
    got_cur=$(printf '%s\n' "$out" | sed -n 's/^BootCurrent: *//p' | tr -d ' ')
    got_next=$(printf '%s\n' "$out" | sed -n 's/^BootNext: *//p' | tr -d ' ')
    got_order=$(printf '%s\n' "$out" | sed -n 's/^BootOrder: *//p' | tr ',' '\n' \
        | grep -xE "$LOADERS_EFI_A|$LOADERS_EFI_B" | paste -sd,)
    [ "$got_cur|${got_next:--}|$got_order" = "$cur|$next|$order" ] \
        || { fail "efibootmgr: BootCurrent $got_cur, BootNext ${got_next:--}, BootOrder (slots) $got_order; expected $cur, $next, $order ($QRUN/$Q.efibootmgr.$QCMD_N)"; return 1; }
}

scenario_efi_bootnext() {
    loaders_begin efi-bootnext efi || return 1
    local A=$LOADERS_EFI_A B=$LOADERS_EFI_B
    local v1 v2 bad nohealth
    loaders_cycle_images efi || return 1

    # 0. Fresh NVRAM: OVMF finds no option and starts the removable-media loader (systemd-boot,
    # slot A's entry); the provisioning unit creates Boot00A1/00A2, BootOrder=00A1. The daemon
    # installs 1.1.0 into B and writes BootNext=00A2.
    loaders_boot_expect A 1.0.0 || return 1
    loaders_console_has "LAB-EFI-SETUP created" || { fail "the provisioning unit did not create the slots' boot options"; return 1; }
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    # 1. OVMF boots BootNext (B, the EFI-stub kernel) once and deletes it; the commit puts B
    # first in BootOrder, A behind it as the fallback.
    loaders_boot_expect B 1.1.0 || return 1
    qemu_unit_is update-agent-commit.service active/success || return 1
    qemu_status_is '.booted.slot == "B"' '.phase.phase == "committed"' '.boot.next == "B"' || return 1
    efi_vars_are "$B" - "$B,$A" || return 1
    qemu_poweroff || return 1

    # 2. 1.2.0 fails its check: BootNext=A, A's trial fails, the rollback removes A from
    # BootOrder; OVMF boots B.
    qemu_publish 1.2.0 "$bad" 2 || { fail "publish 1.2.0 failed"; return 1; }
    # (No look at BootOrder here: the daemon's disable of A, before it writes A, races it.)
    loaders_boot_expect B 1.1.0 || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    loaders_loaded A || return 1
    qemu_wait_exit "$Q" "$Q_T_SETTLE" || return 1
    loaders_console_has "LAB-SETTLED" && { fail "the failed trial of A settled instead of rolling back"; return 1; }

    # 3. 1.3.0 never reaches its health check: BootNext=A boots it once; cut; OVMF follows
    # BootOrder (B only) back to B.
    qemu_publish 1.3.0 "$nohealth" 3 || { fail "publish 1.3.0 failed"; return 1; }
    loaders_boot_expect B 1.1.0 || return 1
    qemu_history_is '[.entries[] | select(.event == "rolled_back" and .version == "1.2.0")] | length == 1' || return 1
    efi_vars_are "$B" - "$B" || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    loaders_boot_expect A 1.3.0 || return 1
    # BootNext is gone (consumed by this one boot); nothing committed A.
    efi_vars_are "$A" - "$B" || return 1
    qemu_kill "$Q"
    loaders_boot_expect B 1.1.0 || return 1
    qemu_history_is '[.entries[] | select(.event == "rolled_back" and .version == "1.3.0")] | length == 1' || return 1
    efi_vars_are "$B" - "$B" || return 1
    qemu_status_is '.booted.slot == "B"' '.boot.next == "B"' || return 1
    qemu_poweroff || return 1
    qemu_disk_ok || return 1
    qemu_end
    [ -z "$FAIL_REASON" ]
}
