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
#include <pthread.h>
#include <sys/uio.h>
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
/* The system calls of this thread's last call, one letter each (r, w, f; z for zeros written
 * ahead, a for the next metadata area zeroed), for tests. */
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

/* The copy and commit of count chunks (n bytes: count equal chunks, or one), records {old + i,
 * new + i} at index + i. A chunk of zeros is not written onto COW chunks known to read as zeros
 * (all of them written where one is not); onto others the Python path decides. */
static int dms_copy_commit(int ofd, int64_t ooff, int64_t n, int64_t count, int cfd, int64_t coff, int cow_zeroed,
			   char *area, int64_t alen, int64_t aoff, int64_t index, uint64_t old, uint64_t new, int wfd,
			   const char *wbuf, int64_t wlen, int64_t woff, char *buf)
{
	if (ofd >= 0 && dms_io(0, 'r', ofd, buf, (uint64_t)n, (uint64_t)ooff))
		return DMS_COPY;
	int zeros = 0;
	for (int64_t i = 0; i < count; i++)
		zeros += dms_zero(buf + i * (n / count), (uint64_t)(n / count));
	if (zeros && !cow_zeroed)
		return DMS_COPY;
	if (zeros < count && dms_io(1, 'w', cfd, buf, (uint64_t)n, (uint64_t)coff))
		return DMS_COPY;
	if (dms_io(2, 'f', cfd, NULL, 0, 0))
		return DMS_PREFLUSH;
	for (int64_t i = 0; i < count; i++) {
		uint64_t rec[2] = {htole64(old + (uint64_t)i), htole64(new + (uint64_t)i)};
		memcpy(area + 16 * (index + i), rec, sizeof rec);
	}
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
static int dms_copy_commit_buffered(int ofd, int64_t ooff, int64_t n, int64_t count, int cfd, int64_t coff,
				    int cow_zeroed, char *area, int64_t alen, int64_t aoff, int64_t index, uint64_t old,
				    uint64_t new, int wfd, const char *wbuf, int64_t wlen, int64_t woff)
{
	if (n <= DMS_STACK_MAX) {
		char buf[DMS_STACK_MAX] __attribute__((aligned(4096)));
		return dms_copy_commit(ofd, ooff, n, count, cfd, coff, cow_zeroed, area, alen, aoff, index, old, new,
				       wfd, wbuf, wlen, woff, buf);
	}
	char *buf = malloc((size_t)n);
	if (!buf)
		return DMS_COPY;
	int rc = dms_copy_commit(ofd, ooff, n, count, cfd, coff, cow_zeroed, area, alen, aoff, index, old, new, wfd,
				 wbuf, wlen, woff, buf);
	free(buf);
	return rc;
}

int dms_copy_commit_chunk(int ofd, int64_t ooff, int64_t n, int cfd, int64_t coff, int cow_zeroed, char *area,
			  int64_t alen, int64_t aoff, int64_t index, uint64_t old, uint64_t new, int wfd,
			  const char *wbuf, int64_t wlen, int64_t woff)
{
	dms_nops = dms_flushes = 0;
	dms_flush_ns = 0;
	if (n <= 0 || ooff < 0 || coff < 0 || aoff < 0 || index < 0 || 16 * (index + 1) > alen || wlen < 0 ||
	    (wlen && (wfd < 0 || woff < 0 || !wbuf)))
		return -1;
	return dms_copy_commit_buffered(ofd, ooff, n, 1, cfd, coff, cow_zeroed, area, alen, aoff, index, old, new,
					wfd, wbuf, wlen, woff);
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
	return dms_copy_commit(-1, 0, n, 1, cfd, coff, cow_zeroed, area, alen, aoff, index, old, new, -1, NULL, 0, 0,
			       (char *)src);
}

/* --- one snapshot's first writes, whole in C (snapshot.store.fast) ---------------------------
 *
 * The state the common first write needs, kept here under one mutex: which origin chunks have an
 * exception (a bitmap), the store's allocation (next free chunk, the metadata area's stride, the
 * COW's size in chunks, the range zeroed ahead), the metadata area buffer and how many records it
 * holds. While armed by Python, dms_snap_write does a one-chunk first write entirely: lookup,
 * allocation, dms_copy_commit (copy, flush, record, flush, origin write), and logs the exception
 * it committed; Python folds that log into its table and store (dms_snap_fence) before any path
 * of its own touches them, and the fence disarms C until Python arms it again. C zeroes ahead
 * as the store does once the store zeroed a range itself, and commits the record that fills an
 * area as the store does (the next area zeroed first, then on to it in a buffer of its own, the
 * fence handing the new area back). C declines (the Python path then runs) whatever needs more:
 * no room in the COW, the first zeroing ahead, a run across an area's end, a failed zeroing, a
 * full log. A failure after the copy is in place disarms C and is reported to the next fence,
 * which goes on from there as the Python path would.
 */
#define DMS_OFF (-2)        /* not armed, or declined: nothing done */
#define DMS_MAPPED 7        /* the chunk has its exception: the origin write not made */
#define DMS_MAPPED_WROTE 8  /* the chunk has its exception, the origin write made */
#define DMS_DONE_WROTE 6    /* committed and the origin write made */
#define DMS_FENCE_HEAD 9    /* words before the log's pairs in dms_snap_fence's answer */
#define DMS_RUN_MAX 16      /* chunks of one dms_snap_write_run */

struct dms_snap {
	pthread_mutex_t lock;
	long refs;            /* Python's (dms_snap_new) and each origin map's (dms_snap_get) */
	int armed;
	int failed;           /* the DMS_* of a failure after the copy was in place, else 0 */
	int64_t failed_count; /* the records of that write: the last ones logged */
	uint64_t *bits;       /* one bit per origin chunk: it has an exception */
	int64_t nchunks, cb;
	int64_t next_free, stride, cow_chunks, zeroed_from, zeroed_upto;
	int64_t zero_ahead;   /* zeroing ahead is on: the bytes zeroed at a time, else 0 */
	char *area;
	int64_t alen, aoff, committed;
	char *own;            /* the area buffer once C filled Python's and went on to the next area */
	int64_t own_len;
	int64_t areas;        /* areas C filled and went past since it was armed */
	uint64_t *log;        /* (old, new) pairs committed since the last fence */
	int64_t nlog, logmax;
	int64_t flush_ns, flushes;
	int64_t slow_ns;      /* a flush this long or longer is slow */
	int slow;             /* the last write's flushes were slow (atomic: read without the lock) */
};

struct dms_snap *dms_snap_new(int64_t nchunks, int64_t cb, int64_t logmax)
{
	if (nchunks <= 0 || cb <= 0 || logmax <= 0)
		return NULL;
	struct dms_snap *s = calloc(1, sizeof *s);
	if (!s)
		return NULL;
	s->bits = calloc((size_t)(nchunks + 63) / 64, sizeof *s->bits);
	s->log = calloc((size_t)logmax * 2, sizeof *s->log);
	if (!s->bits || !s->log || pthread_mutex_init(&s->lock, NULL)) {
		free(s->bits);
		free(s->log);
		free(s);
		return NULL;
	}
	s->nchunks = nchunks;
	s->cb = cb;
	s->logmax = logmax;
	s->refs = 1;
	return s;
}

/* One more reference: an origin's first-write descriptor in the exposure's C data path
 * (fastio.c dmf_chunks_first) keeps the state until it is withdrawn. */
void dms_snap_get(struct dms_snap *s)
{
	__atomic_add_fetch(&s->refs, 1, __ATOMIC_RELAXED);
}

/* Drop a reference (Python's, through its garbage collection, or a descriptor's): the last one
 * frees the state. */
void dms_snap_free(struct dms_snap *s)
{
	if (!s || __atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) != 0)
		return;
	pthread_mutex_destroy(&s->lock);
	free(s->bits);
	free(s->log);
	free(s->own);
	free(s);
}

/* Origin chunks old..old+count-1 have exceptions (those past the bitmap are ignored). */
void dms_snap_mark(struct dms_snap *s, int64_t old, int64_t count)
{
	pthread_mutex_lock(&s->lock);
	for (int64_t c = old < 0 ? 0 : old; c < old + count && c < s->nchunks; c++)
		s->bits[c >> 6] |= 1ULL << (c & 63);
	pthread_mutex_unlock(&s->lock);
}

/* dms_snap_mark for each of n packed keys (old << shift | new): doubles when as_double, else
 * unsigned 64-bit words (snapshot.store.table's sorted array). */
void dms_snap_mark_keys(struct dms_snap *s, const void *keys, int64_t n, int shift, int as_double)
{
	pthread_mutex_lock(&s->lock);
	for (int64_t i = 0; i < n; i++) {
		uint64_t k = as_double ? (uint64_t)((const double *)keys)[i] : ((const uint64_t *)keys)[i];
		uint64_t c = k >> shift;
		if (c < (uint64_t)s->nchunks)
			s->bits[c >> 6] |= 1ULL << (c & 63);
	}
	pthread_mutex_unlock(&s->lock);
}

/* Arm: the store's allocation and area as Python has them now (see struct dms_snap), zero_ahead
 * the bytes zeroed ahead at a time (0: zeroing ahead is off), and whether the COW's flushes take
 * slow_ns or longer (slow). */
void dms_snap_arm(struct dms_snap *s, int64_t next_free, int64_t stride, int64_t cow_chunks, int64_t zeroed_from,
		  int64_t zeroed_upto, int zero_ahead, char *area, int64_t alen, int64_t aoff, int64_t committed,
		  int64_t slow_ns, int slow)
{
	pthread_mutex_lock(&s->lock);
	s->slow_ns = slow_ns;
	__atomic_store_n(&s->slow, slow, __ATOMIC_RELAXED);
	s->next_free = next_free;
	s->stride = stride;
	s->cow_chunks = cow_chunks;
	s->zeroed_from = zeroed_from;
	s->zeroed_upto = zeroed_upto;
	s->zero_ahead = zero_ahead > 0 ? zero_ahead : 0;
	s->area = area;
	s->alen = alen;
	s->aoff = aoff;
	s->committed = committed;
	s->areas = 0;
	if (s->own_len != alen && alen > 0) { /* (the next area's buffer, should C fill this one) */
		free(s->own);
		s->own = calloc(1, (size_t)alen);
		s->own_len = s->own ? alen : 0;
	}
	s->armed = area && alen >= 16 && stride > 1 && !s->failed;
	pthread_mutex_unlock(&s->lock);
}

/* Tests: hold (or release) the state's mutex, as a write in flight does. */
void dms_snap_hold(struct dms_snap *s, int hold)
{
	if (hold)
		pthread_mutex_lock(&s->lock);
	else
		pthread_mutex_unlock(&s->lock);
}

/* Disarm, waiting for a write in flight, and hand over what happened since the last fence:
 * out[0] next free chunk, out[1] records in the area, out[2] exceptions logged, out[3] the mean
 * nanoseconds of their flushes (-1 without one), out[4] the failure (DMS_*, 0 for none), out[5]
 * how many of the logged exceptions that failed write had (the last ones), out[6] and out[7] the
 * range last zeroed ahead (zeroed_from, zeroed_upto), out[8] the areas C filled and went past
 * (the records of the one it writes now, out[1] of them, are the last ones logged), then the
 * logged (old, new) pairs; out holds DMS_FENCE_HEAD + 2 * logmax words. */
void dms_snap_fence(struct dms_snap *s, int64_t *out)
{
	pthread_mutex_lock(&s->lock);
	s->armed = 0;
	out[0] = s->next_free;
	out[1] = s->committed;
	out[2] = s->nlog;
	out[3] = s->flushes ? s->flush_ns / s->flushes : -1;
	out[4] = s->failed;
	out[5] = s->failed ? s->failed_count : 0;
	out[6] = s->zeroed_from;
	out[7] = s->zeroed_upto;
	out[8] = s->areas;
	memcpy(out + DMS_FENCE_HEAD, s->log, (size_t)s->nlog * 2 * sizeof *s->log);
	s->nlog = s->flush_ns = s->flushes = 0;
	s->failed = 0;
	pthread_mutex_unlock(&s->lock);
}

/* zeros for the writes below */
static const char zeros[64 << 10];

/* The store's zeroing ahead (snapshot.store.persistent _zero_ahead_locked), for allocations up
 * to chunk nf on the COW at cbase of cfd (csize bytes): zeros over the next zero_ahead bytes from
 * chunk nf where they are a hole, nothing where any of it holds data; the range zeroed (or found
 * written) then starts at nf (or at its end). Only once Python zeroed a range ahead first
 * (zeroed_upto > 0: the COW can tell its holes): Python probes a new COW and gives up zeroing for
 * good where it cannot. 0 when done (or nothing to do: the COW is full), else -1 with nothing of
 * the state changed (the Python path then zeroes, or gives up as it does). */
static int dms_zero_ahead(struct dms_snap *s, int64_t nf, int cfd, int64_t cbase, int64_t csize)
{
	if (s->zeroed_upto <= 0)
		return -1;
	int64_t start = nf * s->cb, length = s->zero_ahead / s->cb * s->cb, room = csize / s->cb * s->cb - start;
	if (room < length)
		length = room;
	if (length <= 0)
		return 0;
	off_t data = lseek(cfd, (off_t)(cbase + start), SEEK_DATA);
	if (data < 0 && errno != ENXIO)
		return -1;
	int hole = data < 0 || data >= cbase + start + length;
	for (int64_t done = 0; hole && done < length;) {
		struct iovec iov[16];
		int n = 0;
		for (int64_t left = length - done; n < 16 && left > 0; n++, left -= (int64_t)sizeof zeros) {
			iov[n].iov_base = (void *)zeros;
			iov[n].iov_len = left < (int64_t)sizeof zeros ? (size_t)left : sizeof zeros;
		}
		ssize_t k = pwritev(cfd, iov, n, (off_t)(cbase + start + done));
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		done += k;
	}
	if (dms_nops < (int)sizeof dms_ops && hole)
		dms_ops[dms_nops++] = 'z';
	s->zeroed_from = hole ? nf : nf + length / s->cb;
	s->zeroed_upto = nf + length / s->cb;
	return 0;
}

/* The next metadata area, at aoff of cfd, written with zeros (its stale bytes would read as
 * records after the full area): 0 when done, else -1 (nothing of the state changed: the Python
 * path commits the record that fills the area). */
static int dms_zero_area(struct dms_snap *s, int cfd, int64_t aoff)
{
	if (s->alen > (int64_t)sizeof zeros)
		return -1;
	ssize_t k;
	do
		k = pwrite(cfd, zeros, (size_t)s->alen, (off_t)aoff);
	while (k < 0 && errno == EINTR);
	if (k != (ssize_t)s->alen)
		return -1;
	if (dms_nops < (int)sizeof dms_ops)
		dms_ops[dms_nops++] = 'a';
	return 0;
}

/* dms_snap_write and dms_snap_write_run: count consecutive chunks from first. */
static int dms_snap_write_n(struct dms_snap *s, int64_t first, int64_t count, int ofd, int64_t ooff, int cfd,
			    int64_t cbase, int64_t csize, int wfd, const char *wbuf, int64_t wlen, int64_t woff)
{
	dms_nops = dms_flushes = 0;
	dms_flush_ns = 0;
	if (first < 0 || count < 1 || count > DMS_RUN_MAX || ooff < 0 || cbase < 0 || wlen < 0 ||
	    (wlen && (wfd < 0 || woff < 0 || !wbuf)))
		return DMS_OFF;
	/* A write in flight: wait for it where the flushes are fast; where they are slow, decline
	 * (the Python path commits concurrent writers' exceptions together, as the kernel does). */
	if (pthread_mutex_trylock(&s->lock)) {
		if (__atomic_load_n(&s->slow, __ATOMIC_RELAXED))
			return DMS_OFF;
		pthread_mutex_lock(&s->lock);
	}
	if (!s->armed || first + count > s->nchunks) {
		pthread_mutex_unlock(&s->lock);
		return DMS_OFF;
	}
	int64_t mapped = 0;
	for (int64_t c = first; c < first + count; c++)
		mapped += !!(s->bits[c >> 6] & (1ULL << (c & 63)));
	if (mapped) {
		pthread_mutex_unlock(&s->lock);
		if (mapped < count) /* (some to copy: the Python path) */
			return DMS_OFF;
		if (!wlen)
			return DMS_MAPPED;
		ssize_t k;
		do
			k = pwrite(wfd, wbuf, (size_t)wlen, (off_t)woff);
		while (k < 0 && errno == EINTR);
		return k == (ssize_t)wlen ? DMS_MAPPED_WROTE : DMS_MAPPED;
	}
	/* the store's prepare_exceptions: consecutive chunks from the next free one, the one after
	 * them skipping a metadata area; declined where a metadata area lies among them, the COW is
	 * full or zeroing ahead is due, or the area would fill */
	int64_t new = s->next_free, nf = new + count;
	for (int64_t c = new + 1; c < nf; c++)
		if (c % s->stride == 1) {
			pthread_mutex_unlock(&s->lock);
			return DMS_OFF;
		}
	if (nf % s->stride == 1)
		nf++;
	/* records filling the area: the next area zeroed first (its zeros durable with this commit's
	 * PREFLUSH, before the full area points past it), as the store's commit does */
	int fills = 16 * (s->committed + count) == s->alen;
	int64_t next_aoff = s->aoff + s->stride * s->cb;
	if (new + count > s->cow_chunks || (new + count) * s->cb > csize || s->aoff + s->alen > csize ||
	    s->nlog + count > s->logmax || 16 * (s->committed + count) > s->alen ||
	    (fills && (!s->own || s->alen != s->cb || next_aoff + s->alen > csize)) ||
	    (s->zero_ahead && count * s->cb < s->zero_ahead && s->zeroed_upto <= nf &&
	     dms_zero_ahead(s, nf, cfd, cbase, csize)) ||
	    (fills && dms_zero_area(s, cfd, cbase + next_aoff))) {
		pthread_mutex_unlock(&s->lock);
		return DMS_OFF;
	}
	int zeroed = s->zeroed_from <= new && new + count <= s->zeroed_upto;
	int rc = dms_copy_commit_buffered(ofd, ooff, count * s->cb, count, cfd, cbase + new * s->cb, zeroed, s->area,
					  s->alen, cbase + s->aoff, s->committed, (uint64_t)first, (uint64_t)new, wfd,
					  wbuf, wlen, woff);
	if (rc != DMS_COPY) {
		s->next_free = nf;
		s->committed += count;
		for (int64_t i = 0; i < count; i++) {
			int64_t c = first + i;
			s->bits[c >> 6] |= 1ULL << (c & 63);
			s->log[2 * s->nlog] = (uint64_t)c;
			s->log[2 * s->nlog + 1] = (uint64_t)(new + i);
			s->nlog++;
		}
		if (fills && (rc == DMS_DONE || rc == DMS_ORIGIN)) { /* committed: on to the next area */
			s->committed = 0;
			s->aoff = next_aoff;
			memset(s->own, 0, (size_t)s->alen);
			s->area = s->own;
			s->areas++;
		}
		s->flush_ns += dms_flush_ns;
		s->flushes += dms_flushes;
		if (dms_flushes)
			__atomic_store_n(&s->slow, dms_flush_ns / dms_flushes >= s->slow_ns, __ATOMIC_RELAXED);
		if (rc != DMS_DONE) {
			s->failed = rc;
			s->failed_count = count;
			s->armed = 0;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return rc == DMS_DONE && wlen ? DMS_DONE_WROTE : rc;
}

/* The origin write of wlen bytes of wbuf at woff of wfd to origin chunk `chunk` (none for wlen
 * 0: the copy alone, for one of several snapshots), whose copy sits at ooff of ofd, with the COW
 * (csize bytes) at cbase of cfd: DMS_OFF (nothing done: the Python path); the chunk's exception
 * existing, DMS_MAPPED_WROTE (or DMS_MAPPED: no write asked, or it failed or fell short: the
 * caller writes); else the first write done as dms_copy_commit_chunk does it with a new COW
 * chunk: DMS_DONE_WROTE (DMS_DONE without a write), or DMS_COPY (nothing of it in place, nothing
 * allocated), or another DMS_* failure (logged, C disarmed until the next fence). */
int dms_snap_write(struct dms_snap *s, int64_t chunk, int ofd, int64_t ooff, int cfd, int64_t cbase, int64_t csize,
		   int wfd, const char *wbuf, int64_t wlen, int64_t woff)
{
	return dms_snap_write_n(s, chunk, 1, ofd, ooff, cfd, cbase, csize, wfd, wbuf, wlen, woff);
}

/* dms_snap_write for an origin write over count (at most DMS_RUN_MAX) consecutive chunks from
 * first, whose copies start at ooff of ofd: none of them with an exception yet, they get
 * consecutive COW chunks (declined where a metadata area lies among them), copied with one read
 * and one write, committed with one flush, one area write of their records and one flush, then
 * the origin write; every one with its exception: DMS_MAPPED_WROTE (or DMS_MAPPED) as
 * dms_snap_write; some: DMS_OFF (the Python path). A failure after the copies were in place
 * fails the commit of all of them (dms_snap_fence's out[5]). */
int dms_snap_write_run(struct dms_snap *s, int64_t first, int64_t count, int ofd, int64_t ooff, int cfd,
		       int64_t cbase, int64_t csize, int wfd, const char *wbuf, int64_t wlen, int64_t woff)
{
	return dms_snap_write_n(s, first, count, ofd, ooff, cfd, cbase, csize, wfd, wbuf, wlen, woff);
}
