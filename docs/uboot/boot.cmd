# update-agent / RAUC A/B slot selection for U-Boot (compile: mkimage -A arm64 -O linux -T script -C none -d boot.cmd boot.scr).
# The choice rule is RAUC's contrib/uboot.sh: boot the first slot in BOOT_ORDER whose BOOT_x_LEFT is above 0, decrementing it
# first; when none is left, set both counters to 3, save and reset. update-agent's uboot backend (agent/src/boot/uboot.rs, choose)
# implements the same rule; agent/tests/boot_uboot_backend.rs runs this selection against it on every small state, and the lab's
# uboot-cycle scenario runs it in Debian's U-Boot (tests/lab/lib-uboot.sh).
# Counters are one digit, 1-9 (update-agent's boot.tries is at most 9): the countdown is a table, not setexpr, so the script also
# runs on U-Boot builds without CONFIG_CMD_SETEXPR (Debian's qemu-x86 and qemu-x86_64 builds have none). A counter of any other text is not
# bootable here, and update-agent refuses it (uboot_bad_value).
# Saving: saveenv, unless the board sets ua_save to its own commands (the lab's U-Boot keeps no environment; its board part
# imports one from a file and ua_save exports it back).
# Adapt the per-slot settings (bootpart_a, bootpart_b) and the kernel load at the end to the board.

# --- slot selection (keep as it is: the agent's rule mirrors it)
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv raucslot
for BOOT_SLOT in "${BOOT_ORDER}"; do
  if test "x${raucslot}" != "x"; then
    # skip remaining slots
  elif test "x${BOOT_SLOT}" = "xA"; then
    setenv ua_next
    setenv ua_prev 0
    for ua_n in 1 2 3 4 5 6 7 8 9; do
      if test "x${BOOT_A_LEFT}" = "x${ua_n}"; then setenv ua_next ${ua_prev}; fi
      setenv ua_prev ${ua_n}
    done
    if test -n "${ua_next}"; then
      echo "Found valid slot A, ${BOOT_A_LEFT} attempts remaining"
      setenv BOOT_A_LEFT ${ua_next}
      setenv raucslot "A"
      setenv bootpart "${bootpart_a}"
    fi
  elif test "x${BOOT_SLOT}" = "xB"; then
    setenv ua_next
    setenv ua_prev 0
    for ua_n in 1 2 3 4 5 6 7 8 9; do
      if test "x${BOOT_B_LEFT}" = "x${ua_n}"; then setenv ua_next ${ua_prev}; fi
      setenv ua_prev ${ua_n}
    done
    if test -n "${ua_next}"; then
      echo "Found valid slot B, ${BOOT_B_LEFT} attempts remaining"
      setenv BOOT_B_LEFT ${ua_next}
      setenv raucslot "B"
      setenv bootpart "${bootpart_b}"
    fi
  fi
done
setenv ua_next
setenv ua_prev

if test -n "${raucslot}"; then
  if test -n "${ua_save}"; then run ua_save; else saveenv; fi
else
  echo "No valid slot found, resetting tries to 3"
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  if test -n "${ua_save}"; then run ua_save; else saveenv; fi
  reset
fi
# --- end of slot selection; the board's kernel load follows

setenv bootargs "${bootargs} root=${bootpart} rauc.slot=${raucslot}"
load ${devtype} ${devnum}:${bootpart_boot} ${kernel_addr_r} ${kernel_file}
bootm ${kernel_addr_r}
