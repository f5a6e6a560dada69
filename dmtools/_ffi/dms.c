/* The classic snapshot's copy-on-write of one chunk (snapshot.route.copy_commit).
 *
 * Built twice: included by fastio.c (the plain C library, called through cffi's ABI mode, the
 * fallback), and on its own as a CPython extension by cffi's API mode (dmtools._ffi.dms), whose
 * generated wrappers call these functions directly: no libffi call frame per call.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* --- the classic snapshot's copy-on-write of one chunk (snapshot.targets.core) -------------
 *
 * A first write to an origin chunk that one snapshot does not hold yet makes the snapshot's copy
 * durable before the origin changes, as dm-snap.c does: read the origin chunk, write it to the
 * chunk the COW store allocated, then commit the exception (dm-snap-persistent.c): a flush
 * (REQ_PREFLUSH: the copy durable before the record that points at it), the metadata area with
 * the new record written, and a flush (REQ_FUA: the record durable before the origin write);
 * then, where the caller asks (wlen > 0), the origin write that needed the copy.
 * snapshot.route calls this inside the origin's and the COW's suspend gates, on the files their
 * live tables map (one linear target each, plain descriptors), holding the snapshot's completion
 * and commit locks, with the GIL released.
 *
 * It stops at the first failure or short transfer and says where (DMS_*), so that the Python path
 * goes on from there: before the COW chunk is written whole nothing needs undoing (the Python
 * path copies again, through the devices if it must); a failed flush is never tried again (a
 * second fdatasync could report success for writes the first lost): the commit has failed. The
 * record enters the area buffer only after the first flush succeeded. An origin chunk of zeros
 * is not written onto a COW chunk known to read as zeros (cow_zeroed); onto any other, the Python
 * path decides (DMS_COPY). The kernel's on-disk format: records {old, new} as little-endian
 * 64-bit words, record index of the area at aoff.
 */
#define DMS_DONE 0     /* copied, flushed, record written, flushed */
#define DMS_COPY 1     /* nothing of the copy is in place: the Python path copies */
#define DMS_PREFLUSH 2 /* copied; the flush before the record failed */
#define DMS_AREA 3     /* copied and flushed, record in the area buffer; the area write failed */
#define DMS_FUA 4      /* area written; the flush after it failed */
#define DMS_ORIGIN 5   /* committed; the origin write failed (or fell short) */
#define DMS_STACK_MAX (64 << 10)

/* A test's seam: the step-th system call (0 origin read, 1 COW write, 2 flush, 3 area write,
 * 4 flush, 5 origin write) of the next call fails (EIO), or with dms_fault_short moves half its
 * bytes. */
static __thread int dms_fault_step = -1, dms_fault_short;
/* The system calls of this thread's last call, one letter each (r, w, f), for tests. */
static __thread char dms_ops[8];
static __thread int dms_nops;
/* The nanoseconds the flushes of this thread's last call took, and how many there were. */
static __thread int64_t dms_flush_ns;
static __thread int dms_flushes;

void dms_set_fault(int step, int short_io)
{
	dms_fault_step = step;
	dms_fault_short = short_io;
}

/* The mean nanoseconds of the flushes of this thread's last call, -1 without one (snapshot.route
 * keeps the moving average the several-snapshot copies are scheduled by). */
int64_t dms_last_flush_ns(void)
{
	return dms_flushes ? dms_flush_ns / dms_flushes : -1;
}

int dms_last_ops(char *out, int n)
{
	int k = dms_nops < n ? dms_nops : n;
	memcpy(out, dms_ops, (size_t)k);
	return k;
}

/* One system call of step `step`: n bytes at off, or a flush (buf NULL). 0 when all was done. */
static int dms_io(int step, char op, int fd, char *buf, uint64_t n, uint64_t off)
{
	if (dms_nops < (int)sizeof dms_ops)
		dms_ops[dms_nops++] = op;
	int fault = step == dms_fault_step;
	if (fault)
		dms_fault_step = -1;
	if (op == 'f') {
		if (fault)
			return -1;
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		int ret = fdatasync(fd);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		dms_flush_ns += (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
		dms_flushes++;
		return ret == 0 ? 0 : -1;
	}
	if (fault && !dms_fault_short)
		return -1;
	uint64_t want = fault ? n / 2 : n;
	ssize_t k;
	do
		k = op == 'w' ? pwrite(fd, buf, want, (off_t)off) : pread(fd, buf, want, (off_t)off);
	while (k < 0 && errno == EINTR);
	return k == (ssize_t)n ? 0 : -1;
}

static int dms_zero(const char *p, uint64_t n)
{
	if (n && p[0])
		return 0;
	for (uint64_t i = 0; i < n; i++)
		if (p[i])
			return 0;
	return 1;
}

static int dms_copy_commit(int ofd, int64_t ooff, int64_t n, int cfd, int64_t coff, int cow_zeroed, char *area,
			   int64_t alen, int64_t aoff, int64_t index, uint64_t old, uint64_t new, int wfd,
			   const char *wbuf, int64_t wlen, int64_t woff, char *buf)
{
	if (ofd >= 0 && dms_io(0, 'r', ofd, buf, (uint64_t)n, (uint64_t)ooff))
		return DMS_COPY;
	if (dms_zero(buf, (uint64_t)n)) {
		if (!cow_zeroed)
			return DMS_COPY;
	} else if (dms_io(1, 'w', cfd, buf, (uint64_t)n, (uint64_t)coff)) {
		return DMS_COPY;
	}
	if (dms_io(2, 'f', cfd, NULL, 0, 0))
		return DMS_PREFLUSH;
	uint64_t rec[2] = {htole64(old), htole64(new)};
	memcpy(area + 16 * index, rec, sizeof rec);
	if (dms_io(3, 'w', cfd, area, (uint64_t)alen, (uint64_t)aoff))
		return DMS_AREA;
	if (dms_io(4, 'f', cfd, NULL, 0, 0))
		return DMS_FUA;
	if (wlen > 0 && dms_io(5, 'w', wfd, (char *)wbuf, (uint64_t)wlen, (uint64_t)woff))
		return DMS_ORIGIN;
	return DMS_DONE;
}

/* Copy n bytes at ooff of ofd to coff of cfd and commit record {old, new} at index of the area
 * buffer (alen bytes, written at aoff of cfd), then write wlen bytes of wbuf at woff of wfd
 * (none for wlen 0); see above. Returns DMS_*, or -1 (nothing done) for arguments out of
 * range. */
int dms_copy_commit_chunk(int ofd, int64_t ooff, int64_t n, int cfd, int64_t coff, int cow_zeroed, char *area,
			  int64_t alen, int64_t aoff, int64_t index, uint64_t old, uint64_t new, int wfd,
			  const char *wbuf, int64_t wlen, int64_t woff)
{
	dms_nops = dms_flushes = 0;
	dms_flush_ns = 0;
	if (n <= 0 || ooff < 0 || coff < 0 || aoff < 0 || index < 0 || 16 * (index + 1) > alen || wlen < 0 ||
	    (wlen && (wfd < 0 || woff < 0 || !wbuf)))
		return -1;
	if (n <= DMS_STACK_MAX) {
		char buf[DMS_STACK_MAX] __attribute__((aligned(4096)));
		return dms_copy_commit(ofd, ooff, n, cfd, coff, cow_zeroed, area, alen, aoff, index, old, new, wfd,
				       wbuf, wlen, woff, buf);
	}
	char *buf = malloc((size_t)n);
	if (!buf)
		return DMS_COPY;
	int rc = dms_copy_commit(ofd, ooff, n, cfd, coff, cow_zeroed, area, alen, aoff, index, old, new, wfd, wbuf,
				 wlen, woff, buf);
	free(buf);
	return rc;
}

/* dms_copy_commit_chunk for an origin chunk read already (src, n bytes: the range one origin
 * write's snapshots share), for one of them: no origin read, no origin write. */
int dms_commit_copy(const char *src, int64_t n, int cfd, int64_t coff, int cow_zeroed, char *area, int64_t alen,
		    int64_t aoff, int64_t index, uint64_t old, uint64_t new)
{
	dms_nops = dms_flushes = 0;
	dms_flush_ns = 0;
	if (!src || n <= 0 || coff < 0 || aoff < 0 || index < 0 || 16 * (index + 1) > alen)
		return -1;
	return dms_copy_commit(-1, 0, n, cfd, coff, cow_zeroed, area, alen, aoff, index, old, new, -1, NULL, 0, 0,
			       (char *)src);
}
