#!/bin/sh
# Runs at boot in the QEMU test system (restrictpd-qemu-test.service, from build-image qemu),
# with its output on the serial console, then powers the machine off. run-qemu reads the
# console for the "QEMU-RESULT:" line.
cd /srv/restrictpd-test || exit 1
echo "QEMU-TEST: system state: $(systemctl is-system-running --wait 2>&1)"
systemctl --failed --no-legend --plain 2>&1 | sed 's/^/QEMU-TEST: failed unit: /'
echo "QEMU-TEST: $(systemd-analyze time 2>&1 | head -n1)"
echo "QEMU-TIME: tests start $(cut -d' ' -f1 /proc/uptime)"
python3 -B -u qemu_inside.py ./restrictpd_*.deb
rc=$?
echo "QEMU-TIME: tests end $(cut -d' ' -f1 /proc/uptime)"
echo "QEMU-RESULT: exit status $rc"
systemctl poweroff --no-block
