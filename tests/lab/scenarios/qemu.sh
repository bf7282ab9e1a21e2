# Machine-level scenarios: real firmware (SeaBIOS), real GRUB i386-pc reading and writing its
# environment block, the Debian cloud kernel, systemd as PID 1 with the shipped units, real
# reboots and power cuts, the server reached only through QEMU's restrict=on guestfwd.
# Every scenario asserts on the guest's console (the lab-report block, GRUB's own lines) and
# on the disk image afterwards (grub-editenv list, sgdisk -v, the state record).

# Bounds (seconds) for one step of a guest under TCG on a loaded 2-core machine.
Q_T_GRUB=${LAB_T_GRUB:-120}       # QEMU start -> GRUB's menu entry line
Q_T_SETTLE=${LAB_T_SETTLE:-600}  # GRUB -> the boot settled (lab-report)
Q_T_INSTALL=${LAB_T_INSTALL:-900} # settled -> the daemon installed and rebooted
Q_T_DOWN=${LAB_T_DOWN:-120}      # poweroff/reboot -> QEMU ended

# Everything every QEMU scenario needs, built once per run (cached on disk).
QEMU_READY=""
qemu_prepare() {
    [ -n "$QEMU_READY" ] && return 0
    mkdir -p "$QLAB" "$QRUN"
    qemu_kernel || { fail "could not fetch the Debian cloud kernel (see $QLAB/kernel/download.log)"; return 1; }
    qemu_initrd || { fail "could not build the busybox initramfs"; return 1; }
    qemu_grub_core || { fail "grub-mkimage failed (see $QLAB/grub-mkimage.log)"; return 1; }
    qemu_keys || { fail "update-publish keygen failed"; return 1; }
    qemu_slot_image v1.0.0 1.0.0 good || { fail "could not build slot image 1.0.0"; return 1; }
    IMG_V1=$SLOT_IMG
    qemu_slot_image v1.1.0 1.1.0 good || { fail "could not build slot image 1.1.0"; return 1; }
    IMG_V2=$SLOT_IMG
    QEMU_READY=1
}

# Fresh logs, repository and server for scenario NAME. Sets Q (the guest's name) and DISK.
qemu_begin() {
    Q=${1//-/_}
    qemu_prepare || return 1
    rm -rf "$QRUN/$Q".* "$QRUN/$Q"
    mkdir -p "$QRUN/$Q"
    DISK=$QRUN/$Q.img
    qemu_server_start "$QRUN/$Q/repo" || return 1
}

qemu_end() {
    local v
    for v in $(compgen -v QPID_); do
        [ -n "${!v}" ] && qemu_kill "${v#QPID_}"
    done
    qemu_server_stop
}

# Boot the guest and check the loader chose SLOT and the boot settled running VERSION.
# $1 slot, $2 version.
qemu_boot_expect() {
    local slot=$1 ver=$2 got
    qemu_start "$Q" "$DISK"
    qemu_wait "$Q" 'LAB-GRUB-(BOOT [AB]|RESCUE)' "$Q_T_GRUB" || return 1
    got=$(qemu_console_boot "$Q" | grep -oE 'LAB-GRUB-(BOOT [AB]|RESCUE)' | head -1)
    [ "$got" = "LAB-GRUB-BOOT $slot" ] || { fail "GRUB chose '$got', expected slot $slot ($(qemu_console_boot "$Q" | grep 'LAB-GRUB default' | head -1))"; return 1; }
    # The kernel and initrd came from the chosen slot itself: its initrd names its release.
    qemu_initrd_is "$slot" "$ver" || return 1
    qemu_wait "$Q" 'LAB-SETTLED' "$Q_T_SETTLE" || return 1
    got=$(qemu_report "$Q" slot)
    [ "$got" = "$slot" ] || { fail "the guest says it booted slot '$got', GRUB chose $slot"; return 1; }
    got=$(qemu_report "$Q" version)
    [ "$got" = "$ver" ] || { fail "slot $slot runs VERSION_ID '$got', expected $ver"; return 1; }
    BOOT_SECS=$(($(date +%s) - QBOOT_START))
}

# The initrd that ran on this boot is the one of slot $1's own filesystem, built for release
# $2 (each slot carries its kernel and initrd). $1 slot, $2 version.
qemu_initrd_is() {
    local dev got
    dev=/dev/vda$([ "$1" = A ] && echo 3 || echo 4)
    qemu_wait "$Q" "LAB-INITRD root=" "$Q_T_GRUB" || return 1
    got=$(qemu_console_boot "$Q" | grep -o 'LAB-INITRD root=[^ ]* release=[^ ]*' | head -1)
    [ "$got" = "LAB-INITRD root=$dev release=$2" ] \
        || { fail "slot $1 booted with '$got', expected the initrd of its own release (root=$dev release=$2)"; return 1; }
}

# $1 unit, $2 wanted ActiveState/Result (from the lab-report block).
qemu_unit_is() {
    local got
    got=$(qemu_report "$Q" "unit.$1")
    [ "$got" = "$2" ] || { fail "$1 is '$got' on this boot, expected $2"; return 1; }
}

# The agent's JSON of this boot (lab-report: status or history) satisfies every jq filter
# given (each must print true). $1: status | history; rest: filters.
qemu_json_is() {
    local what=$1 json f
    shift
    json=$(qemu_report_json "$Q" "$what")
    for f in "$@"; do
        [ "$(printf '%s' "$json" | jq -r "$f" 2>/dev/null)" = "true" ] \
            || { fail "$what does not satisfy $f: $(printf '%s' "$json" | tr '\n' ' ' | cut -c1-800)"; return 1; }
    done
}
qemu_status_is() { qemu_json_is status "$@"; }
qemu_history_is() { qemu_json_is history "$@"; }

# The grubenv on the disk (QEMU stopped) has every KEY=VALUE given.
qemu_env_is() {
    local env kv
    env=$(qemu_env "$DISK")
    for kv in "$@"; do
        printf '%s\n' "$env" | has -xF "$kv" || { fail "grubenv lacks $kv: $(printf '%s' "$env" | tr '\n' ' ')"; return 1; }
    done
}

qemu_disk_ok() {
    sgdisk -v "$DISK" 2>&1 | has "No problems found" || { fail "sgdisk -v: $(sgdisk -v "$DISK" 2>&1 | head -3 | tr '\n' ' ')"; return 1; }
}

qemu_poweroff() {
    qemu_type "$Q" "systemctl poweroff" || return 1
    qemu_wait_exit "$Q" "$Q_T_DOWN"
}

# GETs of the server's log for a path matching the regex (server-mock /_admin/log).
qemu_server_gets() {
    curl -sf "http://127.0.0.1:$QEMU_PORT/_admin/log" | jq -r '.[].path' | grep -cE "$1"
}

# The last steps of most scenarios: B boots VERSION for its trial and is committed; powered
# off, the disk says B is good and first. Ends the scenario.
qemu_b_trial_commits() {
    qemu_boot_expect B "$1" || return 1
    qemu_unit_is update-agent-commit.service active/success || return 1
    qemu_status_is '.booted.slot == "B"' '.phase.phase == "committed"' || return 1
    qemu_poweroff || return 1
    qemu_env_is "ORDER=B A" "B_OK=1" "B_TRY=0" || return 1
    qemu_disk_ok || return 1
    qemu_end
    [ -z "$FAIL_REASON" ]
}

# A: 1.0.0 committed; the daemon finds 1.1.0, installs it into B, reboots; GRUB boots B for
# its trial, the health unit passes before boot-complete.target, the commit unit commits B
# after it; the next boot is B again, and status agrees with GRUB.
scenario_daemon_update() {
    qemu_begin daemon-update || return 1
    qemu_disk "$DISK" "$IMG_V1" || { fail "could not assemble the disk"; return 1; }
    qemu_publish 1.1.0 "$IMG_V2" 1 || { fail "publish 1.1.0 failed"; return 1; }
    qemu_daemon_update_boots || return 1
    # Third boot: B again, committed, status agrees with GRUB's variables.
    qemu_boot_expect B 1.1.0 || return 1
    qemu_unit_is update-agent-health.service active/success
    qemu_status_is '.booted.slot == "B"' '.phase.phase == "committed"' \
        '(.boot.slots[] | select(.slot == "B") | .successful) == true' || return 1
    qemu_poweroff || return 1
    qemu_env_is "B_OK=1" "B_TRY=0" "ORDER=B A" || return 1
    qemu_disk_ok || return 1
    cp --sparse=always "$DISK" "$QRUN/committed-b.img"
    qemu_end
    [ -z "$FAIL_REASON" ]
}

# Boots 1 and 2 of daemon-update (shared with committed-slot-falls-back).
qemu_daemon_update_boots() {
    qemu_boot_expect A 1.0.0 || return 1
    qemu_unit_is update-agent-health.service active/success || return 1
    qemu_unit_is update-agent.service active/success || return 1
    # The daemon polls at start, installs into B and runs `systemctl reboot` itself.
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    [ "$(qemu_server_gets '^/stable/.*\.zst$')" -ge 1 ] || { fail "the guest never fetched the image from the server"; return 1; }
    qemu_env_is "B_OK=1" "B_TRY=0" "UPDATE_AGENT_TRIAL=B" || return 1
    qemu_boot_expect B 1.1.0 || return 1
    qemu_unit_is update-agent-health.service active/success || return 1
    qemu_unit_is boot-complete.target active/ || return 1
    qemu_unit_is update-agent-commit.service active/success || return 1
    qemu_unit_is update-agent.service active/success || return 1
    qemu_console_boot "$Q" | sed -n '/LAB-JOURNAL-BEGIN$/,/LAB-JOURNAL-END$/p' | has "commit waits for boot-complete.target" \
        || { fail "the health unit did not leave the commit to boot-complete.target (journal)"; return 1; }
    qemu_history_is '[.entries[] | select(.event == "committed" and .version == "1.1.0")] | length == 1' || return 1
    qemu_status_is '.booted.slot == "B"' '.phase.phase == "committed"' || return 1
    qemu_poweroff
}

# A release whose required check fails: the trial of B fails, the agent flips back, denylists
# it and reboots; A boots, history says why, and the daemon does not install it again.
scenario_bad_release_rollback() {
    qemu_begin bad-release-rollback || return 1
    qemu_slot_image v1.2.0-bad 1.2.0 bad-check || { fail "could not build slot image 1.2.0-bad"; return 1; }
    qemu_disk "$DISK" "$IMG_V1" || { fail "could not assemble the disk"; return 1; }
    qemu_publish 1.2.0 "$SLOT_IMG" 1 || { fail "publish 1.2.0 failed"; return 1; }
    qemu_boot_expect A 1.0.0 || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    qemu_env_is "UPDATE_AGENT_TRIAL=B" || return 1
    # The trial boot: GRUB boots B, the check fails, the agent rolls back and reboots.
    qemu_start "$Q" "$DISK"
    qemu_wait "$Q" 'LAB-GRUB-BOOT B' "$Q_T_GRUB" || return 1
    qemu_wait_exit "$Q" "$Q_T_SETTLE" || return 1
    qemu_console_boot "$Q" | has "LAB-SETTLED" && { fail "the failed trial boot settled instead of rolling back"; return 1; }
    qemu_env_is "ORDER=A B" || return 1
    local gets
    gets=$(qemu_server_gets '^/stable/.*\.zst$')
    qemu_boot_expect A 1.0.0 || return 1
    qemu_history_is '[.entries[] | select(.event == "rolled_back" and .version == "1.2.0")] | length == 1' \
        '.denylist | map(.version) | index("1.2.0") != null' || return 1
    qemu_status_is '.booted.slot == "A"' '.phase.phase == "rolled_back"' || return 1
    # Two poll intervals: the daemon sees 1.2.0 again and leaves it alone.
    sleep 25
    qemu_run "$Q" "update-agent status" 60 || return 1
    [ "$(qemu_server_gets '^/stable/.*\.zst$')" -eq "$gets" ] || { fail "the daemon fetched the denylisted image again"; return 1; }
    [ "$(qemu_server_gets '^/stable/manifest.json$')" -ge 2 ] || { fail "the daemon on A never polled again (premise)"; return 1; }
    qemu_poweroff || return 1
    qemu_env_is "ORDER=A B" "A_OK=1" "A_TRY=0" || return 1
    qemu_disk_ok || return 1
    qemu_end
    [ -z "$FAIL_REASON" ]
}

# B is staged, but its boot never reaches the health check (the unit is masked in that
# release): nothing commits it, the machine is power-cycled, GRUB's tries run out and A
# boots; the agent on A records the fallback and denylists the release.
scenario_loader_fallback() {
    qemu_begin loader-fallback || return 1
    qemu_slot_image v1.3.0-nohealth 1.3.0 no-health || { fail "could not build slot image 1.3.0-nohealth"; return 1; }
    qemu_disk "$DISK" "$IMG_V1" || { fail "could not assemble the disk"; return 1; }
    qemu_publish 1.3.0 "$SLOT_IMG" 1 || { fail "publish 1.3.0 failed"; return 1; }
    qemu_boot_expect A 1.0.0 || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    qemu_boot_expect B 1.3.0 || return 1
    local h
    h=$(qemu_report "$Q" unit.update-agent-health.service)
    [ "${h%%/*}" != active ] || { fail "premise: the health unit ran on the broken release ($h)"; return 1; }
    # With the health unit masked, boot-complete.target is still reached (systemd drops the
    # requirement on a masked unit), so the commit unit runs: it must refuse, since no check
    # passed on this boot, and the daemon (Requires= it) must not start.
    qemu_unit_is update-agent-commit.service failed/exit-code || return 1
    qemu_unit_is update-agent.service inactive/success || return 1
    qemu_console_boot "$Q" | has "health_not_passed" \
        || { fail "the commit unit did not refuse with health_not_passed"; return 1; }
    qemu_kill "$Q"
    qemu_env_is "B_TRY=1" "UPDATE_AGENT_TRIAL=B" || return 1
    # GRUB counts the trial down: attempts left, so B boots again (power cut in its initrd).
    qemu_tries_spent B 1.3.0 || return 1
    qemu_boot_expect A 1.0.0 || return 1
    qemu_history_is '[.entries[] | select(.event == "rolled_back" and .version == "1.3.0")] | length == 1' \
        '.denylist | map(.version) | index("1.3.0") != null' || return 1
    qemu_console_boot "$Q" | has "new slot failed to boot" || { fail "the agent's journal does not tell the fallback"; return 1; }
    qemu_poweroff || return 1
    qemu_env_is "A_OK=1" "A_TRY=0" || return 1
    qemu_disk_ok || return 1
    qemu_end
    [ -z "$FAIL_REASON" ]
}

# While slot $1 has boot attempts left ($1_TRY of the disk below $QEMU_TRIES), boot it and cut
# the power in its initrd (GRUB has counted the attempt), until the attempts are spent: GRUB
# chose $1 every time and the count went up by one each boot. $1 slot, $2 its version.
qemu_tries_spent() {
    local slot=$1 ver=$2 t dev
    dev=/dev/vda$([ "$slot" = A ] && echo 3 || echo 4)
    t=$(qemu_env "$DISK" | sed -n "s/^${slot}_TRY=//p")
    [ -n "$t" ] || { fail "grubenv has no ${slot}_TRY"; return 1; }
    while [ "$t" -lt "$QEMU_TRIES" ]; do
        qemu_start "$Q" "$DISK"
        qemu_wait "$Q" 'LAB-GRUB-(BOOT [AB]|RESCUE)' "$Q_T_GRUB" || return 1
        qemu_console_boot "$Q" | has "LAB-GRUB-BOOT $slot" \
            || { fail "with ${slot}_TRY=$t of $QEMU_TRIES GRUB did not boot $slot again: $(qemu_console_boot "$Q" | grep -oE 'LAB-GRUB-(BOOT [AB]|RESCUE)' | head -1)"; return 1; }
        qemu_initrd_is "$slot" "$ver" || return 1
        qemu_kill "$Q"
        t=$((t + 1))
        qemu_env_is "${slot}_TRY=$t" || return 1
    done
}

# B committed (daemon-update), then its boots lose power before the health check:
# B_TRY stays spent, GRUB falls back to A. The agent must notice that A is not what it
# committed (status, history, metrics) and follow its policy: A is confirmed, 1.1.0 is not
# denylisted, and the daemon installs it again through a trial boot.
scenario_committed_slot_falls_back() {
    qemu_begin committed-slot-falls-back || return 1
    qemu_publish 1.1.0 "$IMG_V2" 1 || { fail "publish 1.1.0 failed"; return 1; }
    if [ -s "$QRUN/committed-b.img" ]; then
        cp --sparse=always "$QRUN/committed-b.img" "$DISK"
    else
        qemu_disk "$DISK" "$IMG_V1" || { fail "could not assemble the disk"; return 1; }
        qemu_daemon_update_boots || return 1
    fi
    qemu_env_is "ORDER=B A" "B_OK=1" "B_TRY=0" || return 1
    # Power lost while B boots, after GRUB counted the attempt, before userspace, until
    # GRUB's attempts run out ($QEMU_TRIES of them).
    qemu_tries_spent B 1.1.0 || return 1
    qemu_env_is "B_TRY=$QEMU_TRIES" || return 1
    qemu_boot_expect A 1.0.0 || return 1
    # The phase may already have moved on (the daemon starts installing 1.1.0 again within
    # seconds): the record of the fallback is the history entry and the agent's verdict.
    qemu_status_is '.booted.slot == "A"' '(.denylist | index("1.1.0")) == null' \
        '(.phase.phase == "rolled_back" and .phase.from_version == "1.1.0") or .phase.phase == "downloading" or .phase.phase == "staged"' || return 1
    qemu_console_boot "$Q" | has "reason: committed slot B (1.1.0) fell back to slot A" \
        || { fail "the health check's verdict does not tell the fallback of the committed slot"; return 1; }
    qemu_history_is '[.entries[] | select(.event == "rolled_back" and .version == "1.1.0" and (.reason | test("committed slot B")))] | length == 1' || return 1
    # Policy: the daemon installs 1.1.0 again and reboots into its trial.
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    local m
    m=$(qemu_data_file "$DISK" metrics.prom)
    printf '%s\n' "$m" | has '^update_agent_rollbacks_total 1$' || { fail "metrics do not count the fallback: $(printf '%s' "$m" | grep rollbacks)"; return 1; }
    qemu_env_is "UPDATE_AGENT_TRIAL=B" "B_TRY=0" || return 1
    qemu_b_trial_commits 1.1.0
}

# The one-node use: an operator types `update-agent apply --reboot` on the serial console
# (the daemon stopped first, so only the typed command installs).
scenario_apply_by_hand() {
    qemu_begin apply-by-hand || return 1
    qemu_disk "$DISK" "$IMG_V1" || { fail "could not assemble the disk"; return 1; }
    qemu_boot_expect A 1.0.0 || return 1
    qemu_run "$Q" "systemctl stop update-agent.service" 60 || return 1
    qemu_publish 1.1.0 "$IMG_V2" 1 || { fail "publish 1.1.0 failed"; return 1; }
    qemu_type "$Q" "update-agent apply --reboot" || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    local out
    out=$(qemu_console_boot "$Q" | sed -n '/update-agent apply --reboot/,$p')
    printf '%s\n' "$out" | has -iE "staged|installed" || { fail "apply printed no summary: $(printf '%s' "$out" | tail -5 | tr '\n' ' ')"; return 1; }
    printf '%s\n' "$out" > "$QRUN/$Q/apply.out"
    qemu_b_trial_commits 1.1.0
}

# Power cut mid-download: the daemon on A is writing B when QEMU is killed. The restart
# boots A (the verified slot; B was never staged), and the next daemon cycle installs again
# (resuming or starting over) and reboots into B's trial, which commits.
scenario_crash_during_install() {
    qemu_begin crash-during-install || return 1
    qemu_disk "$DISK" "$IMG_V1" || { fail "could not assemble the disk"; return 1; }
    qemu_publish 1.1.0 "$IMG_V2" 1 || { fail "publish 1.1.0 failed"; return 1; }
    qemu_boot_expect A 1.0.0 || return 1
    # Bounded: watch the agent's own progress until bytes are durable on B, then cut.
    local i phase=""
    for i in $(seq 40); do
        qemu_run "$Q" "update-agent --json status | grep -o '\"phase\":\"[a-z_]*\"' | head -1" 60 || return 1
        phase=$(printf '%s' "$CMD_OUT" | grep -o 'downloading\|staged' | head -1)
        [ -n "$phase" ] && break
        sleep 1
    done
    [ "$phase" = downloading ] || { fail "premise: never saw the install in progress (last: $CMD_OUT)"; return 1; }
    qemu_kill "$Q"
    qemu_env_is "ORDER=A B" "B_OK=0" || return 1
    qemu_boot_expect A 1.0.0 || return 1
    qemu_unit_is update-agent-health.service active/success || return 1
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    qemu_env_is "UPDATE_AGENT_TRIAL=B" "B_OK=1" || return 1
    qemu_b_trial_commits 1.1.0
}

# The time (Unix seconds) of the drill report's step $2 in the report JSON $1; fails when the
# step or its time is missing.
qemu_drill_at() {
    local t
    t=$(printf '%s' "$1" | jq -r --arg s "$2" '[.steps[] | select(.step == $s)][0].at // empty | sub("\\.[0-9]+"; "") | fromdateiso8601' 2>/dev/null)
    [ -n "$t" ] && echo "$t"
}

# The rollback drill on a real machine: `update-agent drill arm` typed on the console, the
# daemon's cycle, the trial boot fails on purpose, A comes back, `drill report` passes and
# its timeline has both boots.
scenario_drill() {
    qemu_begin drill || return 1
    qemu_disk "$DISK" "$IMG_V1" || { fail "could not assemble the disk"; return 1; }
    qemu_boot_expect A 1.0.0 || return 1
    qemu_run "$Q" "update-agent drill arm" 60 || return 1
    [ "$CMD_RC" = 0 ] || { fail "drill arm failed: $CMD_OUT"; return 1; }
    qemu_publish 1.1.0 "$IMG_V2" 1 || { fail "publish 1.1.0 failed"; return 1; }
    qemu_wait_exit "$Q" "$Q_T_INSTALL" || return 1
    qemu_start "$Q" "$DISK"
    local trial_start=$QBOOT_START
    qemu_wait "$Q" 'LAB-GRUB-BOOT B' "$Q_T_GRUB" || return 1
    qemu_wait_exit "$Q" "$Q_T_SETTLE" || return 1
    qemu_boot_expect A 1.0.0 || return 1
    local old_start=$QBOOT_START old_btime
    old_btime=$(qemu_report "$Q" btime)
    [ -n "$old_btime" ] || { fail "the lab report has no btime of the old slot's boot"; return 1; }
    qemu_run "$Q" "update-agent --json drill report" 60 || return 1
    local rep
    rep=$(printf '%s\n' "$CMD_OUT" | grep '{' | sed 's/^[^{]*{/{/' | tail -1)
    printf '%s\n' "$rep" >"$QRUN/$Q/drill-report.json"
    [ "$(printf '%s' "$rep" | jq -r .verdict)" = pass ] || { fail "drill report verdict is not pass: $rep"; return 1; }
    # A local name: run.sh's loop names the scenario in a variable called s.
    local step
    for step in armed staged rebooted "check started" "check failed" "flag flipped" "booted old slot" "old slot running"; do
        printf '%s' "$rep" | jq -e --arg s "$step" '[.steps[] | select(.step == $s)] | length == 1' >/dev/null \
            || { fail "drill timeline lacks the step '$step': $rep"; return 1; }
    done
    # The boots are placed at their kernels' start (guest clock = host clock at QEMU start),
    # not at their health checks, which come long after under TCG.
    local kernel check old old_check
    kernel=$(qemu_drill_at "$rep" rebooted) && check=$(qemu_drill_at "$rep" "check started") \
        && old=$(qemu_drill_at "$rep" "booted old slot") && old_check=$(qemu_drill_at "$rep" "old slot running") \
        || { fail "the drill timeline lacks a boot or check step (or its time): $rep"; return 1; }
    [ "$kernel" -ge $((trial_start - 2)) ] && [ "$kernel" -le $((trial_start + Q_T_GRUB)) ] \
        || { fail "the trial boot is placed at $kernel, but its QEMU started at $trial_start: not the kernel's boot time"; return 1; }
    [ $((kernel + 2)) -lt "$check" ] || { fail "the trial's kernel boot ($kernel) is not before its health check ($check)"; return 1; }
    [ $((old - old_btime)) -le 1 ] && [ $((old_btime - old)) -le 1 ] \
        || { fail "the old slot's boot is placed at $old, its kernel's btime is $old_btime"; return 1; }
    [ "$old" -ge $((old_start - 2)) ] && [ $((old + 2)) -lt "$old_check" ] \
        || { fail "the old slot's boot ($old, QEMU started $old_start) is not before its health check ($old_check)"; return 1; }
    printf '%s' "$rep" | jq -e '[.steps[] | select(.step == "rebooted" or .step == "booted old slot") | .detail | test("kernel started")] == [true, true]' >/dev/null \
        || { fail "the drill report does not say the boots are kernel start times: $rep"; return 1; }
    # Not denylisted: the drill's release installs again afterwards.
    qemu_status_is '(.denylist | index("1.1.0")) == null' || return 1
    qemu_kill "$Q"
    qemu_disk_ok || return 1
    qemu_end
    [ -z "$FAIL_REASON" ]
}

# The grubenv on the disk (QEMU stopped) has no KEY=... line for any KEY given.
qemu_env_lacks() {
    local env k
    env=$(qemu_env "$DISK")
    for k in "$@"; do
        printf '%s\n' "$env" | has "^$k=" && { fail "grubenv still has $(printf '%s\n' "$env" | grep "^$k=")"; return 1; }
    done
    return 0
}

# The state record on the disk's data partition (QEMU stopped) satisfies every jq filter.
qemu_state_is() {
    local json f
    json=$(qemu_data_file "$DISK" state.json)
    [ -n "$json" ] || { fail "no state.json on the data partition"; return 1; }
    for f in "$@"; do
        [ "$(printf '%s' "$json" | jq -r "$f" 2>/dev/null)" = "true" ] \
            || { fail "state.json does not satisfy $f: $(printf '%s' "$json" | jq -c '{phase, slots}' 2>/dev/null | cut -c1-400)"; return 1; }
    done
}

# On the running guest: restart the daemon held at POINT (the crash tests' hold, set for this
# boot only by a runtime drop-in), publish VER, and wait (bounded) until the daemon holds
# there: the moment to cut the power. $1 point, $2 version, $3 its image.
qemu_daemon_hold_at() {
    local point=$1 ver=$2 img=$3 d=/run/systemd/system/update-agent.service.d
    qemu_run "$Q" "mkdir -p $d && printf '[Service]\\nEnvironment=UPDATE_AGENT_TEST_HOLD=$point\\n' >$d/lab-hold.conf && systemctl daemon-reload && systemctl restart update-agent.service" 120 || return 1
    [ "$CMD_RC" = 0 ] || { fail "could not restart the daemon held at $point: $CMD_OUT"; return 1; }
    qemu_publish "$ver" "$img" 1 || { fail "publish $ver failed"; return 1; }
    # The progress holds announce themselves in the unit's status, the steps of apply on stderr.
    qemu_run "$Q" "i=0; until systemctl show -P StatusText update-agent.service | grep -q 'test-hold $point' || journalctl -b -u update-agent.service -o cat --no-pager | grep -q 'test-hold $point'; do i=\$((i+1)); [ \$i -ge $Q_T_INSTALL ] && break; sleep 1; done; echo LAB-HOLD-\$i" "$((Q_T_INSTALL + 60))" || return 1
    local i
    i=$(printf '%s\n' "$CMD_OUT" | sed -n 's/.*LAB-HOLD-\([0-9]*\).*/\1/p' | tail -1)
    [ -n "$i" ] && [ "$i" -lt "$Q_T_INSTALL" ] || { fail "the daemon never held at $point (console: $QRUN/$Q.console)"; return 1; }
}

# Power cuts at the flip, each followed by a restart on the same disk: right after the install
# is flushed and verified (`done`), right after the staging intent is recorded (`staging`),
# right after the boot flags are written (`flags-written`, the staged record not yet), and
# right after GRUB's own flag write on the trial boot (its attempt counted). Every restart
# boots a verified slot (A while B is not staged; B, verified before its flags were written,
# once they are), and the next daemon cycle restarts the install or finishes it: B's second
# attempt passes its health check and is committed under the right version.
scenario_crash_at_flip() {
    qemu_begin crash-at-flip || return 1
    qemu_disk "$DISK" "$IMG_V1" || { fail "could not assemble the disk"; return 1; }
    local point
    for point in done staging flags-written; do
        # Nothing published while the guest boots: the daemon must not install unheld.
        qemu_unpublish
        qemu_boot_expect A 1.0.0 || return 1
        qemu_unit_is update-agent-health.service active/success || return 1
        qemu_daemon_hold_at "$point" 1.1.0 "$IMG_V2" || return 1
        qemu_kill "$Q"
        qemu_disk_ok || return 1
        case $point in
            done | staging)
                # Written and verified, never staged: the loader still boots A only.
                qemu_env_is "ORDER=A B" "A_OK=1" "B_OK=0" || return 1
                qemu_env_lacks UPDATE_AGENT_TRIAL || return 1
                [ "$point" = done ] || qemu_state_is '.phase.phase == "downloading"' '.slots.B.version == "1.1.0"' || return 1
                ;;
            flags-written)
                # The flags stage B; the record still says downloading (the staged record was
                # never written), its slot record names 1.1.0.
                qemu_env_is "ORDER=B A" "B_OK=1" "B_TRY=0" "UPDATE_AGENT_TRIAL=B" || return 1
                qemu_state_is '.phase.phase == "downloading"' '.slots.B.version == "1.1.0"' || return 1
                ;;
        esac
    done
    # The trial boot: GRUB counts the attempt (save_env), the power goes right after.
    qemu_start "$Q" "$DISK"
    qemu_wait "$Q" 'LAB-GRUB-BOOT B' "$Q_T_GRUB" || return 1
    qemu_kill "$Q"
    qemu_env_is "B_TRY=1" "UPDATE_AGENT_TRIAL=B" "ORDER=B A" || return 1
    qemu_disk_ok || return 1
    # Attempt 2 of $QEMU_TRIES: B boots again, its check passes, the flags say it is a trial
    # and the record names its release, so it is committed as 1.1.0.
    [ "$QEMU_TRIES" -ge 2 ] || { fail "premise: crash-at-flip needs tries >= 2 (LAB_QEMU_TRIES=$QEMU_TRIES)"; return 1; }
    qemu_boot_expect B 1.1.0 || return 1
    qemu_unit_is update-agent-health.service active/success || return 1
    qemu_unit_is update-agent-commit.service active/success || return 1
    qemu_history_is '[.entries[] | select(.event == "committed" and .version == "1.1.0")] | length == 1' || return 1
    qemu_status_is '.booted.slot == "B"' '.phase.phase == "committed"' || return 1
    qemu_poweroff || return 1
    qemu_env_is "ORDER=B A" "B_OK=1" "B_TRY=0" || return 1
    qemu_env_lacks UPDATE_AGENT_TRIAL || return 1
    qemu_disk_ok || return 1
    qemu_end
    [ -z "$FAIL_REASON" ]
}

# FleetLock: the server's lock view (/_admin/fleetlock on the default server).
qemu_fleetlock() {
    curl -sf "http://127.0.0.1:$QEMU_PORT/_admin/fleetlock"
}

# The host time (ms) at which the default server's FleetLock log counts 0: a lock request of
# a calibration node in its own group, timed from here. Sets FLEET_T0.
qemu_fleetlock_clock() {
    local before after at
    before=$(date +%s%3N)
    curl -sf -X POST -H 'fleet-lock-protocol: true' -H 'content-type: application/json' \
        -d '{"client_params":{"id":"lab-clock","group":"lab-clock"}}' \
        "http://127.0.0.1:$QEMU_PORT/v1/pre-reboot" >/dev/null || { fail "FleetLock pre-reboot of the calibration node failed"; return 1; }
    after=$(date +%s%3N)
    at=$(qemu_fleetlock | jq '[.events[] | select(.id == "lab-clock")][0].at_ms')
    [ -n "$at" ] && [ "$at" != null ] || { fail "the FleetLock log has no calibration event"; return 1; }
    FLEET_T0=$(((before + after) / 2 - at))
}

# Start guest $1 again (same disk $2, server port $3, netdev extra $4) when its QEMU ended
# (the guest rebooted: -no-reboot), recording the host time of each end in $QRUN/$1.ends.
qemu_restart_ended() {
    local name=$1 pid
    pid=$(qemu_pid "$name")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && return 0
    [ -n "$pid" ] && wait "$pid" 2>/dev/null
    qemu_reader_done "$name"
    # A QEMU that ended before GRUB ran did not reboot: it failed to start.
    qemu_console_boot "$name" | has 'LAB-GRUB' \
        || { fail "$name: QEMU ended before GRUB ran: $(head -c 300 "$QRUN/$name.qemu.log")"; return 1; }
    date +%s%3N >>"$QRUN/$name.ends"
    qemu_start "$@"
}

# Two guests in one FleetLock group with one reboot slot, on one server-mock's FleetLock
# (reached at 10.0.2.101:3333), each with its own release server (10.0.2.100). g2 is offered a
# release whose required check fails, g1 a good one once g2 holds the slot. g2 reboots into
# its trial, rolls back, boots A and keeps the slot (the group's rollout halts); g1, staged,
# is refused the whole time and does not reboot. Once the operator frees the slot, g1 takes
# it, reboots, commits and gives it back. From the server's lock log and the guests' consoles:
# never two holders, and every reboot of a guest falls inside its own holding of the slot.
scenario_fleetlock_two_guests() {
    qemu_begin fleetlock-two-guests || return 1
    local fleet='[reboot]
strategy = ["fleet_lock"]
[reboot.fleet_lock]
url = "http://10.0.2.101:3333/"
group = "lab"'
    qemu_slot_image v1.0.0-fleet 1.0.0 good "$fleet" || { fail "could not build slot image 1.0.0-fleet"; return 1; }
    local img_a=$SLOT_IMG
    qemu_slot_image v1.1.0-fleet 1.1.0 good "$fleet" || { fail "could not build slot image 1.1.0-fleet"; return 1; }
    local img_good=$SLOT_IMG
    qemu_slot_image v1.2.0-fleet-bad 1.2.0 bad-check "$fleet" || { fail "could not build slot image 1.2.0-fleet-bad"; return 1; }
    local img_bad=$SLOT_IMG
    local me=$Q repo2=$QRUN/$Q/repo2 port1=$QEMU_PORT port2 t0
    qemu_fleetlock_clock || return 1
    t0=$FLEET_T0
    qemu_server_start "$repo2" server2 || return 1
    port2=$SERVER_PORT
    local d1=$QRUN/$Q-g1.img d2=$QRUN/$Q-g2.img
    # Another guest port than the release server's: QEMU names a forward by its port.
    local lockfwd=",guestfwd=tcp:10.0.2.101:3333-tcp:127.0.0.1:$port1"
    qemu_disk "$d1" "$img_a" || { fail "could not assemble g1's disk"; return 1; }
    # Another machine id, so another FleetLock node id (the slot image has a fixed one).
    qemu_disk "$d2" "$img_a" "" "" "systemd.machine_id=fedcba9876543210fedcba9876543210" \
        || { fail "could not assemble g2's disk"; return 1; }
    qemu_publish 1.2.0 "$img_bad" 1 "$repo2" || { fail "publish 1.2.0 failed"; return 1; }
    rm -f "$QRUN"/g1.* "$QRUN"/g2.*
    qemu_start g1 "$d1" "$port1" "$lockfwd"
    qemu_start g2 "$d2" "$port2" "$lockfwd"
    # Premise: both machines reach GRUB (not, say, a firmware's shell), within GRUB's bound.
    qemu_wait g1 'LAB-GRUB-BOOT A' "$Q_T_GRUB" || return 1
    qemu_wait g2 'LAB-GRUB-BOOT A' "$Q_T_GRUB" || return 1
    local end=$(($(date +%s) + 3 * Q_T_INSTALL)) view g2id="" g1id="" phase=wait-g2 released_ms=0 t
    while [ "$(date +%s)" -lt "$end" ]; do
        qemu_restart_ended g1 "$d1" "$port1" "$lockfwd" || return 1
        qemu_restart_ended g2 "$d2" "$port2" "$lockfwd" || return 1
        view=$(qemu_fleetlock) || { fail "the FleetLock view did not answer"; return 1; }
        case $phase in
            wait-g2)
                # g2 took the slot for its trial: only now is g1 offered its release. (Only
                # the group "lab": the clock's calibration node holds its own group's slot.)
                g2id=$(printf '%s' "$view" | jq -r '[.events[] | select(.group == "lab" and .op == "pre-reboot" and .status == 200)][0].id // empty')
                if [ -n "$g2id" ]; then
                    qemu_publish 1.1.0 "$img_good" 1 || { fail "publish 1.1.0 failed"; return 1; }
                    phase=g2-back
                fi
                ;;
            g2-back)
                # g2 rolled back and is up on A again (its third boot settled), and g1 has been
                # refused at least twice since.
                if [ "$(grep -c '^=== boot' "$QRUN/g2.console")" -ge 3 ] \
                    && Q=g2 qemu_console_boot g2 | has LAB-SETTLED; then
                    g1id=$(printf '%s' "$view" | jq -r --arg g2 "$g2id" '[.events[] | select(.group == "lab" and .op == "pre-reboot" and .id != $g2)][0].id // empty')
                    if [ -n "$g1id" ] && [ "$(printf '%s' "$view" | jq --arg g1 "$g1id" '[.events[] | select(.group == "lab" and .op == "pre-reboot" and .id == $g1 and .status != 200)] | length')" -ge 2 ]; then
                        phase=check-halt
                    fi
                fi
                ;;
            check-halt)
                # Two poll intervals with g2 back on A: it still holds the slot, g1 is still refused.
                sleep 25
                view=$(qemu_fleetlock)
                printf '%s' "$view" | jq -e --arg g2 "$g2id" '.groups.lab.holders == [$g2]' >/dev/null \
                    || { fail "g2 rolled back but does not keep the slot: $(printf '%s' "$view" | jq -c .groups)"; return 1; }
                [ "$(grep -c '^=== boot' "$QRUN/g1.console")" -eq 1 ] \
                    || { fail "g1 rebooted while g2 held the slot"; return 1; }
                Q=g2
                qemu_status_is '.booted.slot == "A"' '.phase.phase == "rolled_back"' '(.denylist | index("1.2.0")) != null' || return 1
                # The operator frees the slot (the rolled-back host has been looked at).
                released_ms=$(date +%s%3N)
                curl -sf -X DELETE "http://127.0.0.1:$port1/_admin/fleetlock?id=$g2id&group=lab" >/dev/null \
                    || { fail "could not release g2's slot"; return 1; }
                phase=g1-done
                ;;
            g1-done)
                # g1 took the slot, rebooted into 1.1.0, committed and gave the slot back.
                if printf '%s' "$view" | jq -e --arg g1 "$g1id" '[.events[] | select(.group == "lab" and .op == "steady-state" and .id == $g1 and .status == 200)] | length >= 1' >/dev/null; then
                    phase=done
                    break
                fi
                ;;
        esac
        sleep 2
    done
    [ "$phase" = done ] || { fail "fleetlock-two-guests stopped at phase $phase (consoles: $QRUN/g1.console, $QRUN/g2.console; lock log: $(qemu_fleetlock | jq -c '.events | map([.op, .id[0:6], .status])' | cut -c1-600))"; return 1; }
    Q=g1
    qemu_initrd_is B 1.1.0 || return 1
    qemu_wait g1 LAB-SETTLED "$Q_T_SETTLE" || return 1
    qemu_status_is '.booted.slot == "B"' '.phase.phase == "committed"' || return 1
    [ "$(qemu_report g1 version)" = 1.1.0 ] || { fail "g1 does not run 1.1.0 after its reboot"; return 1; }
    view=$(qemu_fleetlock)
    printf '%s' "$view" >"$QRUN/$me/fleetlock.json"
    [ "$g1id" != "$g2id" ] || { fail "premise: both guests have the node id $g1id"; return 1; }
    printf '%s' "$view" | jq -e '.groups.lab.max_holders == 1 and .groups.lab.slots == 1 and .groups.lab.holders == []' >/dev/null \
        || { fail "the group's lock did not hold one at a time: $(printf '%s' "$view" | jq -c .groups)"; return 1; }
    # Every reboot (QEMU ending, host clock) of each guest lies inside its own holding: g2's
    # from its grant until the operator freed it, g1's from its grant until it gave it back.
    local g1_from g1_to g2_from
    g2_from=$(printf '%s' "$view" | jq --arg id "$g2id" --argjson t0 "$t0" '[.events[] | select(.group == "lab" and .op == "pre-reboot" and .id == $id and .status == 200)][0].at_ms + $t0')
    g1_from=$(printf '%s' "$view" | jq --arg id "$g1id" --argjson t0 "$t0" '[.events[] | select(.group == "lab" and .op == "pre-reboot" and .id == $id and .status == 200)][0].at_ms + $t0')
    g1_to=$(printf '%s' "$view" | jq --arg id "$g1id" --argjson t0 "$t0" '[.events[] | select(.group == "lab" and .op == "steady-state" and .id == $id and .status == 200)][0].at_ms + $t0')
    [ "$(wc -l <"$QRUN/g2.ends")" -eq 2 ] || { fail "g2 should have rebooted twice (trial, rollback): $(wc -l <"$QRUN/g2.ends")"; return 1; }
    [ "$(wc -l <"$QRUN/g1.ends")" -eq 1 ] || { fail "g1 should have rebooted once: $(wc -l <"$QRUN/g1.ends")"; return 1; }
    while read -r t; do
        [ "$t" -ge "$g2_from" ] && [ "$t" -le "$released_ms" ] || { fail "g2 rebooted at $t, outside its holding [$g2_from, $released_ms]"; return 1; }
    done <"$QRUN/g2.ends"
    while read -r t; do
        [ "$t" -ge "$g1_from" ] && [ "$t" -le "$g1_to" ] || { fail "g1 rebooted at $t, outside its holding [$g1_from, $g1_to]"; return 1; }
    done <"$QRUN/g1.ends"
    # (50 ms: how well qemu_fleetlock_clock knows the server's clock.)
    [ $((g1_from + 50)) -ge "$released_ms" ] || { fail "g1 got the slot at $g1_from, before g2's was freed at $released_ms"; return 1; }
    qemu_kill g1
    qemu_kill g2
    local disk
    for disk in "$d1" "$d2"; do
        DISK=$disk qemu_disk_ok || return 1
    done
    DISK=$d2 qemu_env_is "ORDER=A B" "A_OK=1" || return 1
    DISK=$d1 qemu_env_is "ORDER=B A" "B_OK=1" "B_TRY=0" || return 1
    qemu_end
    [ -z "$FAIL_REASON" ]
}
