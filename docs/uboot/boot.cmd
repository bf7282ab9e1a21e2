# update-agent / RAUC A/B slot selection for U-Boot (compile: mkimage -A arm64 -O linux -T script -C none -d boot.cmd boot.scr).
# The choice rule is RAUC's contrib/uboot.sh: boot the first slot in BOOT_ORDER whose BOOT_x_LEFT is above 0, decrementing it
# first; when none is left, set both counters to 3, save and reset. update-agent's uboot backend (agent/src/boot/uboot.rs, choose)
# implements the same rule; agent/tests/boot_uboot_backend.rs runs this selection against it on every small state.
# Adapt the per-slot settings (bootpart, bootdev) and the kernel load at the end to the board.

test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv raucslot
for BOOT_SLOT in "${BOOT_ORDER}"; do
  if test "x${raucslot}" != "x"; then
    # skip remaining slots
  elif test "x${BOOT_SLOT}" = "xA"; then
    if test 0x${BOOT_A_LEFT} -gt 0; then
      echo "Found valid slot A, ${BOOT_A_LEFT} attempts remaining"
      setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
      setenv raucslot "A"
      setenv bootpart "${bootpart_a}"
    fi
  elif test "x${BOOT_SLOT}" = "xB"; then
    if test 0x${BOOT_B_LEFT} -gt 0; then
      echo "Found valid slot B, ${BOOT_B_LEFT} attempts remaining"
      setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
      setenv raucslot "B"
      setenv bootpart "${bootpart_b}"
    fi
  fi
done

if test -n "${raucslot}"; then
  saveenv
else
  echo "No valid slot found, resetting tries to 3"
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  saveenv
  reset
fi
# --- end of slot selection; the board's kernel load follows

setenv bootargs "${bootargs} root=${bootpart} rauc.slot=${raucslot}"
load ${devtype} ${devnum}:${bootpart_boot} ${kernel_addr_r} ${kernel_file}
bootm ${kernel_addr_r}
