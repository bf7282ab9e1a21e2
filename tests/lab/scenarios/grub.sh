# Loader-level checks that need no guest: the grub.cfg the agent prints is valid GRUB script.

# `update-agent boot grub-cfg --tries N` for N = 1..9 passes grub-script-check (GRUB's own
# parser), and the ladder counts up to N; tries 0 and 10 are refused with a clear error.
scenario_grub_cfg() {
    local n out
    for n in 1 2 3 9; do
        out=$("$AGENT_BIN" boot grub-cfg --tries "$n") || { fail "grub-cfg --tries $n failed"; return 1; }
        printf '%s\n' "$out" | grub-script-check || { fail "grub-script-check rejects grub-cfg --tries $n"; return 1; }
        printf '%s\n' "$out" | has "\"\$TRY\" -lt $n ];" || { fail "grub-cfg --tries $n does not stop at $n tries"; return 1; }
    done
    for n in 0 10; do
        if "$AGENT_BIN" boot grub-cfg --tries "$n" >/dev/null 2>&1; then
            fail "grub-cfg --tries $n was accepted"
            return 1
        fi
    done
}
