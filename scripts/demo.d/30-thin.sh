# scripts/demo, part 4 (sourced): a thin pool in LVM's layout, two thin volumes, a snapshot that
# shares every block with its origin, then a write that breaks sharing; thin ls before and after.
step "a thin pool: data on one loop device, metadata on another, 64 KiB blocks"
T=$(dmt loop attach "$work/disk-g.img"); loops+=("$T")
M=$(dmt loop attach "$work/disk-h.img"); loops+=("$M")
show dmt thin pool create demo-pool-dmdemo --metadata "$M" --data "$T" --chunk-size 64K
show dmt thin create demo-pool-dmdemo demo-thin1-dmdemo --size 32M
show dmt thin create demo-pool-dmdemo demo-thin2-dmdemo --size 32M
show dmt dm ls

thin_ls() {  # a live pool's devices, through a metadata snapshot as thin_ls reads them
  dmt dm message demo-pool-dmdemo-tpool 0 reserve_metadata_snap
  show dmt thin ls -m -o DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS "$(path_of demo-pool-dmdemo-tmeta)"
  dmt dm message demo-pool-dmdemo-tpool 0 release_metadata_snap
}

step "write 4 MiB to the first volume, snapshot it: nothing is copied, every block is shared"
thin1=$(path_of demo-thin1-dmdemo)
head -c $((4 * 1024 * 1024)) /dev/urandom > "$work/thin-payload"
show dd if="$work/thin-payload" of="$thin1" bs=1M oflag=direct conv=fsync status=none
show dmt thin snapshot demo-pool-dmdemo demo-thin1-dmdemo demo-tsnap-dmdemo
thin_ls

step "rewrite the first 1 MiB of the volume: 16 blocks stop being shared"
show dd if=/dev/urandom of="$thin1" bs=64K count=16 oflag=direct conv=fsync status=none
thin_ls
cmp <(head -c $((4 * 1024 * 1024)) "$(path_of demo-tsnap-dmdemo)") "$work/thin-payload"
echo "the snapshot still holds the first 4 MiB as written"
show dmt thin list demo-pool-dmdemo
show dmt thin status demo-pool-dmdemo

step "remove the volumes and the pool"
for v in demo-tsnap-dmdemo demo-thin2-dmdemo demo-thin1-dmdemo; do show dmt thin remove demo-pool-dmdemo "$v"; done
show dmt thin deactivate demo-pool-dmdemo
