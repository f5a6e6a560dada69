# scripts/demo, part 3 (sourced): a two-leg mirror, one leg failed under writes, repaired onto a new
# device and resynced with a progress bar; the legs end identical.
step "mirror two legs (each a linear device, so one can be failed)"
D=$(dmt loop attach "$work/disk-d.img"); loops+=("$D")
E=$(dmt loop attach "$work/disk-e.img"); loops+=("$E")
F=$(dmt loop attach "$work/disk-f.img"); loops+=("$F")
show dmt dm create leg0-dmdemo --table "0 $sectors linear $D 0"
show dmt dm create leg1-dmdemo --table "0 $sectors linear $E 0"
head -c $((4 * 1024 * 1024)) /dev/urandom | dd of="$D" bs=1M conv=fsync status=none
# (without --handle-errors a failed leg is marked and writes go on, as with the kernel's mirror;
# with it, writes are held until the leg is repaired, which is dmeventd's cue)
show dmt mirror create demo-mir-dmdemo "$(path_of leg0-dmdemo)" "$(path_of leg1-dmdemo)" \
  --region-size 512K
show dmt mirror resync demo-mir-dmdemo --progress
show dmt mirror status demo-mir-dmdemo

step "fail leg 1 (its table becomes 'error') and keep writing to the mirror"
show dmt dm suspend leg1-dmdemo
show dmt dm load leg1-dmdemo --table "0 $sectors error"
show dmt dm resume leg1-dmdemo
mir=$(path_of demo-mir-dmdemo)
show dd if="$work/payload" of="$mir" bs=64K seek=8 oflag=direct status=none
show dmt mirror status demo-mir-dmdemo

step "repair: replace leg 1 with $F and resync only that leg"
show dmt mirror repair demo-mir-dmdemo 1 "$F" --progress
show dmt mirror status demo-mir-dmdemo
# direct reads: the legs were written underneath any page cache of the loop devices
cmp <(dd if="$D" iflag=direct bs=1M count=64 status=none) <(dd if="$F" iflag=direct bs=1M count=64 status=none)
echo "legs $D and $F are identical"
show dmt mirror remove demo-mir-dmdemo
show dmt dm remove leg0-dmdemo leg1-dmdemo
