# scripts/demo, part 2 (sourced): a snapshot of the ext4 volume, a change to the origin, the snapshot
# still holding the old files, then a merge that rolls the origin back.
step "snapshot the ext4 volume (COW on its own loop device)"
C=$(dmt loop attach "$work/disk-c.img"); loops+=("$C")
show dmt snapshot create demo-lin-dmdemo --cow "$C" --name demo-snap-dmdemo --chunk-size 16K
show dmt dm ls
show dmt dm table demo-lin-dmdemo demo-snap-dmdemo

step "change the origin: the snapshot keeps the old data"
lin=$(path_of demo-lin-dmdemo); snap=$(path_of demo-snap-dmdemo)
mnt="$work/mnt"
show mount "$lin" "$mnt"
echo "changed after the snapshot" > "$mnt/hello.txt"; rm "$mnt/payload"
ls "$mnt"; show umount "$mnt"
show mount -o ro,noload "$snap" "$mnt"
printf 'snapshot sees: '; cat "$mnt/hello.txt"; ls "$mnt"
show umount "$mnt"
show dmt snapshot status demo-snap-dmdemo
show dmt snapshot list

step "merge the snapshot back into the origin"
show dmt snapshot merge demo-snap-dmdemo --progress
show dmt dm table demo-lin-dmdemo
show mount "$lin" "$mnt"
printf 'origin after merge: '; cat "$mnt/hello.txt"
cmp "$mnt/payload" "$work/payload"
echo "payload is back"
show umount "$mnt"
mnt=
