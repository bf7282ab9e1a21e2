# Unit-level scenarios: the shipped units, unchanged, booted by systemd 252 (PID 1) in a
# container (systemd-nspawn). They see ordering, dependencies and hardening at run time; the
# loader, kernel command line, reboots and crashes are QEMU's part (docs/lab.md).

# Shared set-up: tree + disk + config + grubenv. $1: scenario name; rest: grubenv vars.
nspawn_setup() {
    local name=$1
    shift
    TREE=$LAB/trees/$name
    mkdir -p "$LAB/trees"
    make_tree "$TREE" || { fail "could not prepare the tree $TREE"; return 1; }
    make_disk "$LAB/trees/$name.img" || { fail "could not build the GPT disk (sgdisk/losetup)"; return 1; }
    write_config "$TREE" "$LOOP" "${NSPAWN_EXTRA_CONFIG:-}"
    write_grubenv "$TREE" "$@" || { fail "grub-editenv failed"; return 1; }
}

nspawn_run() {
    local name=$1
    boot_nspawn "$TREE" "$LAB/trees/$name.console" || { release_disk; return 1; }
    release_disk
    journal_of "$TREE" >"$LAB/trees/$name.journal"
    PROBE=$TREE/var/lib/lab/probe.txt
    [ -s "$LAB/trees/$name.journal" ] || { fail "no journal in $TREE/var/log/journal"; return 1; }
    assert_no_cycle "$LAB/trees/$name.journal"
    # The boot's first transaction is built before journald runs, so a cycle in it never
    # reaches the journal: ask the tree's own systemd to build the same transaction.
    chroot "$TREE" systemd-analyze verify --man=no multi-user.target boot-complete.target \
        >"$LAB/trees/$name.verify" 2>&1
    assert_no_cycle "$LAB/trees/$name.verify"
}

# A normal boot of a committed slot: no cycle, nothing failed, all three units ran; and the
# D-Bus API, installed as docs/dbus.md says, is started by the bus on a root client's call.
scenario_units_nspawn() {
    nspawn_setup units-nspawn ORDER="A B" A_OK=1 A_TRY=0 B_OK=1 B_TRY=0 || return 1
    install -D -m 0644 "$REPO/docs/dbus/org.updateagent.Agent1.conf" \
        "$TREE/usr/share/dbus-1/system.d/org.updateagent.Agent1.conf"
    install -D -m 0644 "$REPO/docs/dbus/org.updateagent.Agent1.service" \
        "$TREE/usr/share/dbus-1/system-services/org.updateagent.Agent1.service"
    cat >"$TREE/etc/systemd/system/lab-dbus.service" <<'UNIT'
[Unit]
Description=lab D-Bus client (a root caller of org.updateagent.Agent1)
Requires=dbus.socket
After=dbus.socket update-agent-commit.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'busctl --json=short call org.updateagent.Agent1 /org/updateagent/Agent1 org.updateagent.Agent1 Status >/var/lib/lab/dbus-status.json'
[Install]
WantedBy=multi-user.target
UNIT
    systemctl --root="$TREE" enable lab-dbus.service >/dev/null 2>&1 || { fail "cannot enable lab-dbus"; return 1; }
    nspawn_run units-nspawn || return 1
    grep -q "Started update-agent-dbus.service" "$LAB/trees/units-nspawn.journal" \
        || fail "the bus did not start update-agent-dbus.service"
    grep -q '"schema_version' "$TREE/var/lib/lab/dbus-status.json" 2>/dev/null \
        || fail "Status over D-Bus answered no status: $(head -c 300 "$TREE/var/lib/lab/dbus-status.json" 2>&1)"
    local failed
    failed=$(sed -n '/^== failed/,/^== units/p' "$PROBE" | grep -v '^==')
    [ -z "$failed" ] || fail "failed units: $(echo "$failed" | tr '\n' ' ')"
    grep -q "^settled_after" "$PROBE" || fail "probe output incomplete"
    sed -n '/^== jobs/,/^== failed/p' "$PROBE" | has -v '^==' && fail "jobs never finished: $(sed -n '/^== jobs/,/^== failed/p' "$PROBE" | grep -v '^==' | tr '\n' ' ')"
    assert_unit "$PROBE" update-agent-health.service active success
    assert_unit "$PROBE" update-agent-commit.service active success
    assert_unit "$PROBE" update-agent.service active success
    assert_unit "$PROBE" boot-complete.target active ""
    # The health unit confirmed slot A (the agent's own words, in the journal).
    grep -q "normal boot of slot A" "$LAB/trees/units-nspawn.journal" \
        || fail "the health check's verdict (normal boot of slot A) is not in the journal"
    # The daemon told systemd it is ready (Type=notify) and is polling.
    grep -q "Started update-agent.service" "$LAB/trees/units-nspawn.journal" \
        || fail "the daemon never reported ready"
    [ -z "$FAIL_REASON" ]
}

# A trial boot of slot A whose required check passes: the health unit only records the pass,
# update-agent-commit.service commits after boot-complete.target, then the daemon starts.
scenario_units_nspawn_trial() {
    nspawn_setup units-nspawn-trial ORDER="A B" A_OK=1 A_TRY=0 B_OK=1 B_TRY=0 \
        UPDATE_AGENT_TRIAL=A || return 1
    printf '#!/bin/sh\necho lab-check-ok\nexit 0\n' >"$TREE/etc/update-agent/health/required.d/10-lab"
    chmod 0755 "$TREE/etc/update-agent/health/required.d/10-lab"
    nspawn_run units-nspawn-trial || return 1
    local j=$LAB/trees/units-nspawn-trial.journal
    assert_unit "$PROBE" update-agent-health.service active success
    assert_unit "$PROBE" update-agent-commit.service active success
    assert_unit "$PROBE" update-agent.service active success
    grep -q "commit waits for boot-complete.target" "$j" \
        || fail "the health unit did not leave the commit to boot-complete.target"
    grep -q "committed after boot-complete.target" "$PROBE" \
        || fail "history has no commit after boot-complete.target"
    # Order in the journal: health finished, target reached, then the commit unit ran.
    local t_health t_target t_commit
    t_health=$(grep -n "Finished update-agent-health.service\|Finished update-agent health check" "$j" | head -1 | cut -d: -f1)
    t_target=$(grep -n "Reached target boot-complete.target\|Reached target Boot Completion Check" "$j" | head -1 | cut -d: -f1)
    t_commit=$(grep -n "Starting update-agent-commit.service\|Starting update-agent commit" "$j" | head -1 | cut -d: -f1)
    if [ -z "$t_health" ] || [ -z "$t_target" ] || [ -z "$t_commit" ]; then
        fail "journal lacks health finished ($t_health) / target reached ($t_target) / commit started ($t_commit)"
    elif ! { [ "$t_health" -lt "$t_target" ] && [ "$t_target" -lt "$t_commit" ]; }; then
        fail "order wrong: health@$t_health target@$t_target commit@$t_commit (journal lines)"
    fi
    # The disk afterwards: the trial mark is gone, A is good.
    local env
    env=$(grub-editenv "$TREE/boot/grub/grubenv" list)
    echo "$env" | has "^UPDATE_AGENT_TRIAL=" && fail "grubenv still marks a trial: $(echo "$env" | tr '\n' ' ')"
    echo "$env" | has "^A_OK=1$" || fail "grubenv lost A_OK=1: $(echo "$env" | tr '\n' ' ')"
    [ -z "$FAIL_REASON" ]
}

# Another unit RequiredBy=boot-complete.target fails: our check passes, but the commit never
# happens and the daemon never starts (no install after a failed boot).
scenario_units_nspawn_veto() {
    nspawn_setup units-nspawn-veto ORDER="A B" A_OK=1 A_TRY=0 B_OK=1 B_TRY=0 \
        UPDATE_AGENT_TRIAL=A || return 1
    cat >"$TREE/etc/systemd/system/lab-veto.service" <<'UNIT'
[Unit]
Description=lab veto (an operator's check that fails)
Before=boot-complete.target
[Service]
Type=oneshot
ExecStart=/bin/false
[Install]
RequiredBy=boot-complete.target
UNIT
    systemctl --root="$TREE" enable lab-veto.service >/dev/null 2>&1 || { fail "cannot enable lab-veto"; return 1; }
    nspawn_run units-nspawn-veto || return 1
    assert_unit "$PROBE" lab-veto.service failed exit-code
    assert_unit "$PROBE" update-agent-health.service active success
    assert_unit "$PROBE" update-agent-commit.service inactive success
    assert_unit "$PROBE" update-agent.service inactive success
    assert_unit "$PROBE" boot-complete.target inactive ""
    grep -q "committed after boot-complete.target" "$PROBE" && fail "the trial was committed despite the veto"
    grep -q "Dependency failed for update-agent" "$LAB/trees/units-nspawn-veto.journal" \
        || fail "systemd did not report the commit/daemon dependency failure"
    grub-editenv "$TREE/boot/grub/grubenv" list | has "^UPDATE_AGENT_TRIAL=A$" \
        || fail "the trial mark is gone though the boot was vetoed"
    [ -z "$FAIL_REASON" ]
}
