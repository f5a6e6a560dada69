# scripts/demo, part 3 (sourced): a two-leg mirror, one leg failed under writes, repaired onto a new
# device and resynced with a progress bar; the legs end identical.
step "mirror two legs (each a linear device, so one can be failed)"
D=$(dmt loop attach "$work/disk-d.img"); loops+=("$D")
E=$(dmt loop attach "$work/disk-e.img"); loops+=("$E")
F=$(dmt loop attach "$work/disk-f.img"); loops+=("$F")
show dmt dm create leg0-dmdemo --table "0 $sectors linear $D 0"
show dmt dm create leg1-dmdemo --table "0 $sectors linear $E 0"
head -c $((4 * 1024 * 1024)) /dev/urandom | dd of="$D" bs=1M conv=fsync status=none
# (mirrors get handle_errors by default, as LVM's: after a leg failure writes are held until the
# mirror is reconfigured. On the userspace engine a built-in guard would drop the failed leg by
# itself; --no-monitor leaves the failure to us, and the repair below releases the held write.)
show dmt mirror create demo-mir-dmdemo "$(path_of leg0-dmdemo)" "$(path_of leg1-dmdemo)" \
  --region-size 512K --no-monitor
show dmt mirror resync demo-mir-dmdemo --progress
show dmt mirror status demo-mir-dmdemo

step "fail leg 1 (its table becomes 'error') and keep writing to the mirror"
show dmt dm suspend leg1-dmdemo
show dmt dm load leg1-dmdemo --table "0 $sectors error"
show dmt dm resume leg1-dmdemo
mir=$(path_of demo-mir-dmdemo)
show dd if="$work/payload" of="$mir" bs=64K seek=8 oflag=direct status=none &
writer=$!
for _ in $(seq 100); do dmt mirror status demo-mir-dmdemo | grep -q "(D)" && break; sleep 0.1; done
show dmt mirror status demo-mir-dmdemo

step "repair: replace leg 1 with $F and resync only that leg (the held write then lands)"
show dmt mirror repair demo-mir-dmdemo 1 "$F" --progress
wait "$writer"
show dmt mirror status demo-mir-dmdemo
# direct reads: the legs were written underneath any page cache of the loop devices
cmp <(dd if="$D" iflag=direct bs=1M count=64 status=none) <(dd if="$F" iflag=direct bs=1M count=64 status=none)
echo "legs $D and $F are identical"
show dmt mirror remove demo-mir-dmdemo
show dmt dm remove leg0-dmdemo leg1-dmdemo
