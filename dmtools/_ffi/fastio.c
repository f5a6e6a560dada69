/* The exposure's C data path: FUSE write and read_buf served without Python.
 *
 * Installed by dmtools.engine.fastpath in place of mfusepy's `write`, `read_buf` and `init`
 * entries of libfuse 3's `struct fuse_operations` (fuse.h). Each FUSE file (one per exposed
 * device) has a slot; its open file handle (`fuse_file_info.fh`) is the slot's id. Python
 * installs in a slot a map of the device's live table when every segment maps straight onto
 * backing files (`linear`, `striped`), and removes it before the device's suspend gate closes.
 * A request whose slot holds a map is moved here, without the GIL; every other request, and
 * every request that meets an error, runs the original Python callback, which does it again and
 * reports it exactly as it always has.
 *
 * dmf_main stands in for libfuse's fuse_main_real: its workers receive each request into a buffer
 * where a write's data starts on a page, and serve reads and writes of mapped devices on the spot
 * (O_DIRECT straight from, or into, that buffer; no copy in this process), answering on /dev/fuse
 * themselves. The fuse_operations entries (pwrite, or splice into a per-thread pipe that libfuse
 * splices into its reply) serve the requests that reach libfuse's own dispatch otherwise.
 *
 * Each slot's map is read under a read lock held for the whole request: taking the write lock
 * (dmf_slot_set) waits for the requests in flight, so nothing passes a suspend once it returned.
 * Maps own duplicates of the backing descriptors: a table closing its files never leaves a map
 * with a descriptor number that was reused.
 *
 * Plain C (no Python headers): built with `cc -shared` and loaded with ctypes (dmtools._ffi.fastio).
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <limits.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <linux/fs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/aio_abi.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* --- the classic snapshot's copy-on-write of one chunk: dms.c, also built on its own as a CPython
 * extension (dmtools._ffi.dms); here for the library's cffi ABI-mode callers where that cannot be built. */
#include "dms.c"

#define DMF_ABI 3
/* A map description (dmf_slot_set): header words, then per segment SEG_WORDS + LEG_WORDS per leg. */
#define HDR_WORDS 5 /* size, readonly, direct_min, random_max, nseg */
#define SEG_WORDS 4 /* start, end, chunk bytes (0: linear), nlegs */
#define LEG_WORDS 5 /* fd, fd without read-ahead, direct fd (-1: none), direct alignment, base */
#define DMF_SLOTS 1024
#define FALLBACK (-1)

/* fuse_common.h (libfuse 3): struct fuse_buf, struct fuse_bufvec, enum fuse_buf_flags. */
struct fuse_buf {
	size_t size;
	int flags;
	void *mem;
	int fd;
	off_t pos;
};
struct fuse_bufvec {
	size_t count;
	size_t idx;
	size_t off;
	struct fuse_buf buf[1];
};
#define FUSE_BUF_IS_FD (1 << 1)

typedef int (*write_fn)(const char *, const char *, size_t, off_t, void *);
typedef int (*read_buf_fn)(const char *, struct fuse_bufvec **, size_t, off_t, void *);
typedef void *(*init_fn)(void *, void *);
typedef void *(*get_context_fn)(void);

enum { ST_READS, ST_WRITES, ST_READ_BYTES, ST_WRITE_BYTES, ST_FALLBACKS, ST_ERRORS, ST_FIRST_WRITES, DMF_NSTATS };

struct dmf_leg {
	int fd, rfd, dfd;
	uint64_t dalign, base;
};
struct dmf_seg {
	uint64_t start, end, chunk;
	uint32_t nlegs;
	struct dmf_leg *legs;
};
struct dmf_chunks;
struct dmf_map {
	uint64_t size, direct_min, random_max;
	int readonly;
	uint32_t nseg;
	struct dmf_seg *segs;
	struct dmf_chunks *chunks; /* a snapshot-origin map (dmf_slot_set_origin): its chunk set... */
	uint64_t lower;		   /* ...and the slot its requests pass onto; 0: segs */
};
void dmf_chunks_put(struct dmf_chunks *c);
struct dmf_slot {
	pthread_rwlock_t lock;
	uint64_t id; /* 0: free */
	struct dmf_map *map;
	_Atomic int on; /* map in use: cleared before the write lock is taken */
	_Atomic uint64_t stats[DMF_NSTATS];
};
struct dmf_ctx {
	write_fn py_write;
	read_buf_fn py_read_buf;
	init_fn py_init;
	pthread_mutex_t alloc;
	uint64_t serial;
	size_t pipe_min, pipe_bytes;
	struct dmf_slot slots[DMF_SLOTS];
};

/* libfuse's fuse_get_context() and offsets in its structs, as mfusepy declares them. */
static get_context_fn g_get_context;
static size_t g_private_off, g_fh_off;

int dmf_abi(void) { return DMF_ABI; }

void dmf_setup(void *get_context, size_t private_off, size_t fh_off)
{
	g_get_context = (get_context_fn)get_context;
	g_private_off = private_off;
	g_fh_off = fh_off;
}

/* --- maps ---------------------------------------------------------------------------------- */
static void map_free(struct dmf_map *m)
{
	if (!m)
		return;
	for (uint32_t i = 0; i < m->nseg; i++) {
		for (uint32_t j = 0; j < m->segs[i].nlegs; j++) {
			struct dmf_leg *l = &m->segs[i].legs[j];
			if (l->fd >= 0)
				close(l->fd);
			if (l->rfd >= 0)
				close(l->rfd);
			if (l->dfd >= 0)
				close(l->dfd);
		}
		free(m->segs[i].legs);
	}
	free(m->segs);
	if (m->chunks)
		dmf_chunks_put(m->chunks);
	free(m);
}

static int dup_fd(int64_t fd)
{
	return fd < 0 ? -1 : fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
}

/* A map from its description; NULL with errno set when it is malformed or a dup fails. */
static struct dmf_map *map_new(const int64_t *d, size_t n)
{
	if (n < HDR_WORDS || d[0] < 0 || d[4] <= 0) {
		errno = EINVAL;
		return NULL;
	}
	struct dmf_map *m = calloc(1, sizeof(*m));
	if (!m)
		return NULL;
	m->size = (uint64_t)d[0];
	m->readonly = d[1] != 0;
	m->direct_min = (uint64_t)d[2];
	m->random_max = (uint64_t)d[3];
	m->segs = calloc((size_t)d[4], sizeof(*m->segs));
	if (!m->segs) {
		free(m);
		return NULL;
	}
	size_t pos = HDR_WORDS;
	uint64_t expect = 0;
	for (int64_t i = 0; i < d[4]; i++) {
		if (pos + SEG_WORDS > n || d[pos] != (int64_t)expect || d[pos + 1] <= d[pos] || d[pos + 3] <= 0
		    || d[pos + 2] < 0 || (d[pos + 3] > 1 && d[pos + 2] == 0))
			goto inval;
		struct dmf_seg *s = &m->segs[m->nseg++];
		s->start = (uint64_t)d[pos];
		s->end = expect = (uint64_t)d[pos + 1];
		s->chunk = (uint64_t)d[pos + 2];
		s->legs = calloc((size_t)d[pos + 3], sizeof(*s->legs));
		if (!s->legs)
			goto fail;
		uint32_t nlegs = (uint32_t)d[pos + 3];
		pos += SEG_WORDS;
		if (pos + (size_t)nlegs * LEG_WORDS > n)
			goto inval;
		for (uint32_t j = 0; j < nlegs; j++, pos += LEG_WORDS) {
			struct dmf_leg *l = &s->legs[s->nlegs++];
			l->fd = l->rfd = l->dfd = -1;
			if (d[pos] < 0 || d[pos + 1] < 0 || d[pos + 3] <= 0 || d[pos + 4] < 0)
				goto inval;
			l->dalign = (uint64_t)d[pos + 3];
			l->base = (uint64_t)d[pos + 4];
			if ((l->fd = dup_fd(d[pos])) < 0 || (l->rfd = dup_fd(d[pos + 1])) < 0)
				goto fail;
			if (d[pos + 2] >= 0 && (l->dfd = dup_fd(d[pos + 2])) < 0)
				goto fail;
		}
	}
	if (pos != n || expect != m->size)
		goto inval;
	return m;
inval:
	errno = EINVAL;
fail:;
	int err = errno;
	map_free(m);
	errno = err;
	return NULL;
}

/* --- contexts and slots -------------------------------------------------------------------- */
struct dmf_ctx *dmf_ctx_new(void *py_write, void *py_read_buf, void *py_init, size_t pipe_min, size_t pipe_bytes)
{
	struct dmf_ctx *ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return NULL;
	ctx->py_write = (write_fn)py_write;
	ctx->py_read_buf = (read_buf_fn)py_read_buf;
	ctx->py_init = (init_fn)py_init;
	ctx->pipe_min = pipe_min;
	ctx->pipe_bytes = pipe_bytes;
	pthread_mutex_init(&ctx->alloc, NULL);
	pthread_rwlockattr_t attr;
	pthread_rwlockattr_init(&attr);
	/* A waiting writer (a suspend) holds back new readers: a steady stream of requests cannot
	 * starve it; they wait for it and then find the slot empty (the Python path). */
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	for (int i = 0; i < DMF_SLOTS; i++)
		pthread_rwlock_init(&ctx->slots[i].lock, &attr);
	pthread_rwlockattr_destroy(&attr);
	return ctx;
}

/* Only once the FUSE session that used ctx has ended. */
void dmf_ctx_free(struct dmf_ctx *ctx)
{
	if (!ctx)
		return;
	for (int i = 0; i < DMF_SLOTS; i++) {
		map_free(ctx->slots[i].map);
		pthread_rwlock_destroy(&ctx->slots[i].lock);
	}
	pthread_mutex_destroy(&ctx->alloc);
	free(ctx);
}

/* A free slot's id (never 0, never reused: a stale handle cannot reach a later device), or 0. */
uint64_t dmf_slot_new(struct dmf_ctx *ctx)
{
	uint64_t id = 0;
	pthread_mutex_lock(&ctx->alloc);
	for (int tries = 0; tries < DMF_SLOTS && !id; tries++) {
		uint64_t cand = ++ctx->serial;
		struct dmf_slot *s = &ctx->slots[cand % DMF_SLOTS];
		pthread_rwlock_wrlock(&s->lock);
		if (!s->id) {
			s->id = id = cand;
			for (int k = 0; k < DMF_NSTATS; k++)
				atomic_store(&s->stats[k], 0);
		}
		pthread_rwlock_unlock(&s->lock);
	}
	pthread_mutex_unlock(&ctx->alloc);
	return id;
}

static struct dmf_slot *slot_of(struct dmf_ctx *ctx, uint64_t id)
{
	return id ? &ctx->slots[id % DMF_SLOTS] : NULL;
}

/* Take the slot's write lock: wait for the requests in flight, at most timeout_ms (< 0: no
 * limit). New requests stop using the map at once. Returns 0 or -ETIMEDOUT. */
static int wrlock(struct dmf_slot *s, long timeout_ms)
{
	atomic_store(&s->on, 0);
	if (timeout_ms < 0)
		return -pthread_rwlock_wrlock(&s->lock);
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (timeout_ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	return -pthread_rwlock_timedwrlock(&s->lock, &ts);
}

/* Put m (NULL: none) in the slot once its requests in flight are done; ret is returned unless the
 * slot is gone (-ENOENT) or the wait timed out (m freed). */
static int slot_install(struct dmf_slot *s, uint64_t id, struct dmf_map *m, int ret, long timeout_ms)
{
	int locked = wrlock(s, timeout_ms);
	if (locked) {
		map_free(m);
		return locked;
	}
	struct dmf_map *old = NULL;
	if (s->id == id) {
		old = s->map;
		s->map = m;
		atomic_store(&s->on, m != NULL);
		m = NULL;
	} else if (!ret) {
		ret = -ENOENT;
	}
	pthread_rwlock_unlock(&s->lock);
	map_free(old);
	map_free(m);
	return ret;
}

/* Install the map described by d[0..n) (n == 0: none) once the requests in flight are done.
 * Returns 0, or -errno (the slot then has no map in use). -ETIMEDOUT: a request still runs after
 * timeout_ms; new ones do not use the map, which is freed by the next call that gets the lock. */
int dmf_slot_set(struct dmf_ctx *ctx, uint64_t id, const int64_t *d, size_t n, long timeout_ms)
{
	struct dmf_slot *s = slot_of(ctx, id);
	if (!s)
		return -EINVAL;
	struct dmf_map *m = NULL;
	int ret = 0;
	if (n) {
		m = map_new(d, n);
		if (!m)
			ret = -(errno ? errno : EINVAL);
	}
	return slot_install(s, id, m, ret, timeout_ms);
}

/* Free the slot once its requests in flight are done (at most timeout_ms, < 0: no limit).
 * -ETIMEDOUT: the slot stays taken, unused, until the context is freed. */
int dmf_slot_free(struct dmf_ctx *ctx, uint64_t id, long timeout_ms)
{
	struct dmf_slot *s = slot_of(ctx, id);
	if (!s)
		return -EINVAL;
	int locked = wrlock(s, timeout_ms);
	if (locked)
		return locked;
	struct dmf_map *old = NULL;
	if (s->id == id) {
		old = s->map;
		s->map = NULL;
		s->id = 0;
	}
	pthread_rwlock_unlock(&s->lock);
	map_free(old);
	return 0;
}

/* The slot's counters (DMF_NSTATS words); -ENOENT for a slot that is gone. */
int dmf_slot_stats(struct dmf_ctx *ctx, uint64_t id, uint64_t *out)
{
	struct dmf_slot *s = slot_of(ctx, id);
	if (!s)
		return -ENOENT;
	pthread_rwlock_rdlock(&s->lock);
	int ret = s->id == id ? 0 : -ENOENT;
	for (int k = 0; k < DMF_NSTATS && !ret; k++)
		out[k] = atomic_load(&s->stats[k]);
	pthread_rwlock_unlock(&s->lock);
	return ret;
}

/* --- snapshot-origin maps: requests passed onto the origin device's map ---------------------------
 *
 * A snapshot-origin table maps its device onto the origin (an engine device: LVM's "-real") at the
 * same offsets (dm-snap.c origin_map). Its map (dmf_slot_set_origin) names that device's slot and
 * a chunk set: the granules (4 KiB) of the origin whose every snapshot holds its copy already.
 * Python marks granules once their exceptions are durable (dm-snap.c: origin data is overwritten
 * only after its copy and record are), and empties the set before anything that could need a copy
 * again (a snapshot resumed, merged, invalidated), waiting for the writes that relied on it. A read
 * always passes on (an origin read never copies); a write only when every granule it touches is in
 * the set, else Python copies first. The origin device's own slot must have a map in use, so its
 * suspend holds these requests too (they go to Python, which waits at its gate). */
#define GRANULE_SHIFT 12
struct dmf_first;
struct dmf_chunks {
	pthread_rwlock_t lock; /* read: a write relying on the set, or a mark; write: emptying it */
	_Atomic long refs;
	uint64_t size, nbits;
	size_t bytes;
	_Atomic uint64_t *bits; /* an anonymous mapping: memory only where marks landed */
	struct dmf_first *first; /* the first writes made here (dmf_chunks_first), NULL: none */
};
static void first_free(struct dmf_first *f);

/* A set of granules for a device of size bytes, empty; NULL without memory. */
struct dmf_chunks *dmf_chunks_new(uint64_t size)
{
	struct dmf_chunks *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->size = size;
	c->nbits = (size + (1u << GRANULE_SHIFT) - 1) >> GRANULE_SHIFT;
	size_t words = (size_t)(c->nbits + 63) / 64;
	c->bytes = ((words ? words : 1) * 8 + 4095) & ~(size_t)4095;
	void *p = mmap(NULL, c->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED) {
		free(c);
		return NULL;
	}
	c->bits = p;
	atomic_init(&c->refs, 1);
	pthread_rwlockattr_t attr;
	pthread_rwlockattr_init(&attr);
	/* emptying the set is not starved by a stream of writes: they go to Python meanwhile */
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&c->lock, &attr);
	pthread_rwlockattr_destroy(&attr);
	return c;
}

/* Drop a reference (Python's, or a map's): the last one frees the set. */
void dmf_chunks_put(struct dmf_chunks *c)
{
	if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
		return;
	first_free(c->first);
	munmap((void *)c->bits, c->bytes);
	pthread_rwlock_destroy(&c->lock);
	free(c);
}

/* For each 64-granule word of granules [g0, g1): its mask; all set (test) or set them (!test). */
static int chunks_walk(struct dmf_chunks *c, uint64_t g0, uint64_t g1, int test)
{
	for (uint64_t g = g0; g < g1;) {
		uint64_t b = g % 64, n = g1 - g < 64 - b ? g1 - g : 64 - b;
		uint64_t mask = (n == 64 ? ~0ull : (1ull << n) - 1) << b;
		_Atomic uint64_t *w = &c->bits[g / 64];
		if ((atomic_load_explicit(w, memory_order_relaxed) & mask) != mask) {
			if (test)
				return 0;
			atomic_fetch_or(w, mask);
		}
		g += n;
	}
	return 1;
}

/* Mark the granules lying wholly in [off, off+len) (the last one ends at the device's end). */
void dmf_chunks_mark(struct dmf_chunks *c, uint64_t off, uint64_t len)
{
	uint64_t end = off + len, g0 = (off + (1u << GRANULE_SHIFT) - 1) >> GRANULE_SHIFT;
	uint64_t g1 = end >= c->size ? c->nbits : end >> GRANULE_SHIFT;
	pthread_rwlock_rdlock(&c->lock);
	chunks_walk(c, g0, g1, 0);
	pthread_rwlock_unlock(&c->lock);
}

/* Empty the set, and withdraw its first writes, once no write relying on them is in flight (new
 * ones go to Python meanwhile). */
void dmf_chunks_clear(struct dmf_chunks *c)
{
	pthread_rwlock_wrlock(&c->lock);
	if (madvise((void *)c->bits, c->bytes, MADV_DONTNEED) != 0)
		memset((void *)c->bits, 0, c->bytes);
	struct dmf_first *old = c->first;
	c->first = NULL;
	pthread_rwlock_unlock(&c->lock);
	first_free(old);
}

/* The number of granules in the set. */
uint64_t dmf_chunks_count(struct dmf_chunks *c)
{
	uint64_t n = 0;
	pthread_rwlock_rdlock(&c->lock);
	for (uint64_t i = 0; i < (c->nbits + 63) / 64; i++)
		n += (uint64_t)__builtin_popcountll(atomic_load(&c->bits[i]));
	pthread_rwlock_unlock(&c->lock);
	return n;
}

/* Install a snapshot-origin map of size bytes (see above): requests pass onto slot lower's map
 * at the same offsets, writes where chunks holds them. Returns as dmf_slot_set. */
int dmf_slot_set_origin(struct dmf_ctx *ctx, uint64_t id, uint64_t size, int readonly, struct dmf_chunks *chunks,
			uint64_t lower, long timeout_ms)
{
	struct dmf_slot *s = slot_of(ctx, id);
	if (!s || !chunks || !lower || lower == id)
		return -EINVAL;
	struct dmf_map *m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->size = size;
	m->readonly = readonly != 0;
	m->lower = lower;
	m->chunks = chunks;
	atomic_fetch_add(&chunks->refs, 1);
	return slot_install(s, id, m, 0, timeout_ms);
}

/* The map serving a request of the entered slot s: its own, or for a snapshot-origin map the lower
 * slot's, read-locked in *low (with the chunk set, for a write) until release(). NULL: the request
 * goes to Python (s left, the fallback counted). Never waits: a lock being taken means a suspend
 * or a change of the set, which Python waits for. */
static const struct dmf_map *through(struct dmf_ctx *ctx, struct dmf_slot *s, size_t size, uint64_t off, int write,
				     struct dmf_slot **low, int *first)
{
	const struct dmf_map *m = s->map;
	*low = NULL;
	if (!m->lower)
		return m;
	struct dmf_chunks *c = m->chunks;
	if (write && pthread_rwlock_tryrdlock(&c->lock) != 0)
		goto python;
	int covered = !write || (off + size <= c->size &&
				 chunks_walk(c, off >> GRANULE_SHIFT, ((off + size - 1) >> GRANULE_SHIFT) + 1, 1));
	if (!covered && c->first) {
		*first = 1; /* the caller makes it (first_write), the set and the slot still locked */
		return NULL;
	}
	if (covered) {
		struct dmf_slot *l = slot_of(ctx, m->lower);
		if (pthread_rwlock_tryrdlock(&l->lock) == 0) {
			const struct dmf_map *lm = l->id == m->lower && atomic_load(&l->on) ? l->map : NULL;
			if (lm && !lm->lower && off + size <= lm->size && !(write && lm->readonly)) {
				*low = l;
				return lm;
			}
			pthread_rwlock_unlock(&l->lock);
		}
	}
	if (write)
		pthread_rwlock_unlock(&c->lock);
python:
	atomic_fetch_add(&s->stats[ST_FALLBACKS], 1);
	pthread_rwlock_unlock(&s->lock);
	return NULL;
}

/* Unlock what through() locked for a request of slot s. */
static void release(struct dmf_slot *s, struct dmf_slot *low, int write)
{
	if (!low)
		return;
	pthread_rwlock_unlock(&low->lock);
	if (write)
		pthread_rwlock_unlock(&s->map->chunks->lock);
}

/* --- a snapshot origin's first writes, made whole by the worker ----------------------------------
 *
 * A write the chunk set misses needs each snapshot's copy of the chunks it touches, committed,
 * before the origin changes. Python hands the set a descriptor of the origin's snapshots
 * (dmf_chunks_first): for each, in the order Python copies them, its C state (dms.c struct
 * dms_snap, armed and disarmed by Python: every fence of the snapshot disarms it, waiting for a
 * write in flight), the slot of its COW device and its chunk bytes. A write is then made here as
 * route.first_write makes one from Python: dms_snap_write_run for each snapshot in turn (lookup,
 * allocation, copy, PREFLUSH, records, FUA of its chunks under the write, up to DMS_RUN_MAX of
 * them: a writer's neighbouring pages merged into one request), the origin write with the last
 * one's, on the files of the origin's and each COW's live maps, read-locked (a suspend or a
 * reload of any of these devices takes their write locks: it waits for the write, and the next
 * ones go to Python, which waits at its gates). Anything else, a state not armed, a snapshot
 * declining, or a failure, goes to Python, which goes on from where C stopped (a failure once a
 * copy was in place is reported to the snapshot's next fence). The descriptor holds a reference
 * to each state; it is replaced, or withdrawn by dmf_chunks_clear (a snapshot resumed, handed
 * over, invalidated), under the set's write lock, so it changes only between writes. */
struct dmf_first_snap {
	struct dms_snap *state;
	uint64_t cow; /* the COW device's slot */
	int64_t cb;   /* chunk bytes */
};
struct dmf_first {
	uint32_t n;
	struct dmf_first_snap snaps[];
};
#define FIRST_WORDS 3 /* per snapshot in dmf_chunks_first's description: state, COW slot, chunk bytes */

static void first_free(struct dmf_first *f)
{
	if (!f)
		return;
	for (uint32_t i = 0; i < f->n; i++)
		dms_snap_free(f->snaps[i].state);
	free(f);
}

/* Install the first-write descriptor d[0..n) (FIRST_WORDS per snapshot; n == 0: none) in place of
 * the set's, once no write relying on the set is in flight. Returns 0 or -errno (nothing changed). */
int dmf_chunks_first(struct dmf_chunks *c, const int64_t *d, size_t n)
{
	struct dmf_first *f = NULL;
	if (n % FIRST_WORDS || n / FIRST_WORDS > 64)
		return -EINVAL;
	if (n) {
		for (size_t i = 0; i < n; i += FIRST_WORDS)
			if (!d[i] || d[i + 1] <= 0 || d[i + 2] <= 0 || d[i + 2] % 512)
				return -EINVAL;
		f = calloc(1, sizeof(*f) + n / FIRST_WORDS * sizeof(f->snaps[0]));
		if (!f)
			return -ENOMEM;
		for (size_t i = 0; i < n; i += FIRST_WORDS) {
			struct dmf_first_snap *fs = &f->snaps[f->n++];
			fs->state = (struct dms_snap *)(uintptr_t)d[i];
			fs->cow = (uint64_t)d[i + 1];
			fs->cb = d[i + 2];
			dms_snap_get(fs->state);
		}
	}
	pthread_rwlock_wrlock(&c->lock);
	struct dmf_first *old = c->first;
	c->first = f;
	pthread_rwlock_unlock(&c->lock);
	first_free(old);
	return 0;
}

/* Tests: the next first write made here fails at dms.c's step `step` (dms_set_fault), and the
 * system calls of those made from now on are kept (dmf_first_ops). */
static _Atomic int g_first_fault = -1, g_first_short;
static pthread_mutex_t g_trace_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_trace[4096];
static size_t g_ntrace;
static _Atomic int g_tracing;

void dmf_first_fault(int step, int short_io)
{
	atomic_store(&g_first_short, short_io);
	atomic_store(&g_first_fault, step);
}

void dmf_first_trace(int on)
{
	pthread_mutex_lock(&g_trace_lock);
	g_ntrace = 0;
	atomic_store(&g_tracing, on);
	pthread_mutex_unlock(&g_trace_lock);
}

/* The system calls of the first writes made here since dmf_first_trace(1), one letter each as
 * dms_last_ops, each dms_snap_write call's followed by '.': up to n bytes into out; how many. */
int dmf_first_ops(char *out, int n)
{
	pthread_mutex_lock(&g_trace_lock);
	int k = g_ntrace < (size_t)n ? (int)g_ntrace : n;
	memcpy(out, g_trace, (size_t)k);
	pthread_mutex_unlock(&g_trace_lock);
	return k;
}

static void first_trace(void)
{
	char ops[8];
	int k = dms_last_ops(ops, sizeof ops);
	pthread_mutex_lock(&g_trace_lock);
	if (g_ntrace + (size_t)k + 1 <= sizeof g_trace) {
		memcpy(g_trace + g_ntrace, ops, (size_t)k);
		g_ntrace += (size_t)k;
		g_trace[g_ntrace++] = '.';
	}
	pthread_mutex_unlock(&g_trace_lock);
}

/* The one leg of a writable map that is one linear segment over a file of at least end bytes;
 * else NULL. */
static const struct dmf_leg *plain_leg(const struct dmf_map *m, uint64_t end)
{
	if (!m || m->lower || m->readonly || m->nseg != 1 || m->segs[0].chunk || m->segs[0].nlegs != 1 || end > m->size)
		return NULL;
	return &m->segs[0].legs[0];
}

/* Each snapshot's copies of its chunks under [off, off+size) (at most DMS_RUN_MAX of them, none
 * with an exception yet, or all: dms_snap_write_run), and then the write with the last
 * snapshot's commit, on leg ol of the origin's map lm (its slot read-locked). 1 when all was
 * done, else 0 (Python goes on from there: what C committed is folded at each snapshot's next
 * fence). */
static int first_snaps(struct dmf_ctx *ctx, struct dmf_chunks *c, const struct dmf_first *f, const struct dmf_leg *ol,
		       const struct dmf_map *lm, const char *buf, size_t size, uint64_t off)
{
	uint64_t lo = 0, hi = UINT64_MAX, end = off + size;
	int fault = atomic_exchange(&g_first_fault, -1), done = 1, tracing = atomic_load(&g_tracing);
	if (fault >= 0)
		dms_set_fault(fault, atomic_load(&g_first_short));
	for (uint32_t i = 0; done && i < f->n; i++) {
		const struct dmf_first_snap *fs = &f->snaps[i];
		uint64_t cb = (uint64_t)fs->cb, first = off / cb, last = (end - 1) / cb;
		done = 0;
		if (last - first >= DMS_RUN_MAX || (last + 1) * cb > lm->size)
			break;
		struct dmf_slot *cs = slot_of(ctx, fs->cow);
		if (pthread_rwlock_tryrdlock(&cs->lock) != 0)
			break;
		const struct dmf_map *cm = cs->id == fs->cow && atomic_load(&cs->on) ? cs->map : NULL;
		const struct dmf_leg *cl = plain_leg(cm, 0);
		int wr = i + 1 == f->n, rc = DMS_OFF;
		if (cl)
			rc = dms_snap_write_run(fs->state, (int64_t)first, (int64_t)(last - first + 1), ol->fd,
						(int64_t)(ol->base + first * cb), cl->fd, (int64_t)cl->base, (int64_t)cm->size,
						wr ? ol->fd : -1, wr ? buf : NULL, wr ? (int64_t)size : 0,
						(int64_t)(ol->base + off));
		pthread_rwlock_unlock(&cs->lock);
		if (tracing && rc != DMS_OFF)
			first_trace();
		done = wr ? rc == DMS_DONE_WROTE || rc == DMS_MAPPED_WROTE : rc == DMS_DONE || rc == DMS_MAPPED;
		lo = first * cb > lo ? first * cb : lo;
		hi = (last + 1) * cb < hi ? (last + 1) * cb : hi;
	}
	dms_set_fault(-1, 0);
	if (!done)
		return 0;
	/* every snapshot holds its copies of [lo, hi) now: the next writes there need none */
	uint64_t g1 = hi >= c->size ? c->nbits : hi >> GRANULE_SHIFT;
	chunks_walk(c, (lo + (1u << GRANULE_SHIFT) - 1) >> GRANULE_SHIFT, g1, 0);
	return 1;
}

/* A write of snapshot-origin map m (its slot and chunk set read-locked) that the set misses,
 * made by the set's first writes (see above) where they can: 1 when made, else 0 (Python). */
static int first_write(struct dmf_ctx *ctx, const struct dmf_map *m, const char *buf, size_t size, uint64_t off)
{
	struct dmf_chunks *c = m->chunks;
	const struct dmf_first *f = c->first;
	if (!f || !size || off + size > c->size)
		return 0;
	struct dmf_slot *l = slot_of(ctx, m->lower);
	if (pthread_rwlock_tryrdlock(&l->lock) != 0)
		return 0;
	const struct dmf_map *lm = l->id == m->lower && atomic_load(&l->on) ? l->map : NULL;
	const struct dmf_leg *ol = plain_leg(lm, off + size);
	int done = ol ? first_snaps(ctx, c, f, ol, lm, buf, size, off) : 0;
	pthread_rwlock_unlock(&l->lock);
	return done;
}

/* --- per-thread buffers: the O_DIRECT bounce buffer and the read reply pipe ---------------- */
struct run;
struct thread_bufs {
	struct run *runs; /* MAX_RUN_LEGS of them (map_io) */
	aio_context_t aio; /* 0: not set up yet */
	int aio_failed;
	char *bounce;
	size_t bounce_size;
	int pipe[2];
	size_t pipe_size;
};
static pthread_key_t g_key;
static pthread_once_t g_key_once = PTHREAD_ONCE_INIT;

static void close_pipe(struct thread_bufs *t)
{
	if (t->pipe[0] >= 0) {
		close(t->pipe[0]);
		close(t->pipe[1]);
	}
	t->pipe[0] = t->pipe[1] = -1;
}

static void thread_bufs_free(void *p)
{
	struct thread_bufs *t = p;
	if (t->bounce)
		munmap(t->bounce, t->bounce_size);
	close_pipe(t);
	free(t->runs);
	if (t->aio)
		syscall(SYS_io_destroy, t->aio);
	free(t);
}

static void make_key(void) { pthread_key_create(&g_key, thread_bufs_free); }

static struct thread_bufs *thread_bufs(void)
{
	pthread_once(&g_key_once, make_key);
	struct thread_bufs *t = pthread_getspecific(g_key);
	if (!t) {
		t = calloc(1, sizeof(*t));
		if (!t)
			return NULL;
		t->pipe[0] = t->pipe[1] = -1;
		pthread_setspecific(g_key, t);
	}
	return t;
}

/* A page-aligned buffer of at least n bytes, on huge pages where the kernel gives them. */
static char *bounce(size_t n)
{
	struct thread_bufs *t = thread_bufs();
	if (!t)
		return NULL;
	if (t->bounce_size < n) {
		if (t->bounce)
			munmap(t->bounce, t->bounce_size);
		t->bounce = NULL;
		t->bounce_size = 0;
		size_t size = (n + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1);
		void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			return NULL;
		madvise(p, size, MADV_HUGEPAGE);
		t->bounce = p;
		t->bounce_size = size;
	}
	return t->bounce;
}

/* This thread's empty reply pipe, of pipe_bytes, with room for n bytes, or NULL. A pipe still
 * holding bytes (a reply libfuse did not take, or a read abandoned half-way) is replaced. */
static int *reply_pipe(size_t n, size_t pipe_bytes)
{
	struct thread_bufs *t = thread_bufs();
	if (!t)
		return NULL;
	if (t->pipe[0] >= 0) {
		int pending = 0;
		if (ioctl(t->pipe[0], FIONREAD, &pending) != 0 || pending)
			close_pipe(t);
	}
	if (t->pipe[0] < 0) {
		if (pipe2(t->pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
			t->pipe[0] = t->pipe[1] = -1;
			return NULL;
		}
		int got = fcntl(t->pipe[1], F_SETPIPE_SZ, (int)pipe_bytes);
		t->pipe_size = got > 0 ? (size_t)got : 0;
	}
	return t->pipe_size >= n ? t->pipe : NULL;
}

/* --- the mapping: one table's byte ranges onto (descriptor, offset) runs ------------------- */
enum op { OP_WRITE, OP_READ, OP_SPLICE };

/* One leg's pieces that sit back to back on it, gathered into one preadv/pwritev (as dm-stripe
 * sends the pieces of one stripe down together) or, for OP_SPLICE, one splice. */
#define RUN_IOVS 256
#define MAX_RUN_LEGS 16 /* runs in flight per request; a segment of more legs sends its runs in turn */
struct run {
	const struct dmf_leg *leg;
	uint64_t off; /* on the leg */
	size_t len;
	int niov, misaligned;
	struct iovec iov[RUN_IOVS];
};

static void run_clear(struct run *r)
{
	r->niov = 0;
	r->len = 0;
	r->misaligned = 0;
}

static int rw_all(int fd, int write, struct iovec *iov, int niov, uint64_t off)
{
	while (niov > 0) {
		ssize_t k = write ? pwritev(fd, iov, niov, (off_t)off) : preadv(fd, iov, niov, (off_t)off);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1; /* an error, or the end of the file: the Python path reports it */
		off += (uint64_t)k;
		while (niov > 0 && (size_t)k >= iov->iov_len) {
			k -= (ssize_t)iov->iov_len;
			iov++;
			niov--;
		}
		if (niov > 0) {
			iov->iov_base = (char *)iov->iov_base + k;
			iov->iov_len -= (size_t)k;
		}
	}
	return 0;
}

static int splice_in(int fd, int pipe_w, size_t n, uint64_t off)
{
	size_t done = 0;
	while (done < n) {
		loff_t at = (loff_t)(off + done);
		ssize_t k = splice(fd, &at, pipe_w, NULL, n - done, SPLICE_F_NONBLOCK);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1; /* EAGAIN: the pipe is full (pieces starting mid-page) */
		done += (size_t)k;
	}
	return 0;
}

/* Move a run. Reads, and writes of requests of direct_min bytes or more (as
 * dmtools.engine.backing.BackingDevice writes), go through the leg's O_DIRECT descriptor, as the
 * kernel's dm targets pass I/O on uncached (the loop device's own page cache is the cache above
 * us: a second one below would hold the same pages twice): straight from the caller's buffer
 * when it is aligned, else (writes) through a bounce buffer. Smaller writes use the page cache
 * (made durable by a flush); reads that cannot go direct, of requests under random_max, use the
 * descriptor without read-ahead: through the other one each small random read would read ahead
 * a window of the file. */
static int run_flush(const struct dmf_map *m, enum op op, struct run *r, int pipe_w, size_t request)
{
	if (!r->niov)
		return 0;
	const struct dmf_leg *l = r->leg;
	int write = op == OP_WRITE, ret;
	int direct = op != OP_SPLICE && l->dfd >= 0 && (op == OP_READ || request >= m->direct_min) && r->off % l->dalign == 0
		     && r->len % l->dalign == 0;
	char *b;
	if (direct && !r->misaligned) {
		ret = rw_all(l->dfd, write, r->iov, r->niov, r->off);
	} else if (direct && write && (b = bounce(r->len)) != NULL) {
		size_t at = 0;
		for (int i = 0; i < r->niov; i++) {
			memcpy(b + at, r->iov[i].iov_base, r->iov[i].iov_len);
			at += r->iov[i].iov_len;
		}
		struct iovec one = {b, r->len};
		ret = rw_all(l->dfd, 1, &one, 1, r->off);
	} else {
		int fd = write || request >= m->random_max ? l->fd : l->rfd;
		ret = op == OP_SPLICE ? splice_in(fd, pipe_w, r->len, r->off)
				      : rw_all(fd, write, r->iov, r->niov, r->off);
	}
	run_clear(r);
	return ret;
}

static int direct_run(const struct dmf_map *m, enum op op, const struct run *r, size_t request)
{
	const struct dmf_leg *l = r->leg;
	return r->niov && op != OP_SPLICE && l->dfd >= 0 && (op == OP_READ || request >= m->direct_min) && !r->misaligned
	       && r->off % l->dalign == 0 && r->len % l->dalign == 0;
}

/* This thread's Linux AIO context (io_setup, linux/aio_abi.h), 0 where there is none. */
static aio_context_t thread_aio(struct thread_bufs *t)
{
	if (!t->aio && !t->aio_failed && syscall(SYS_io_setup, MAX_RUN_LEGS, &t->aio) != 0) {
		t->aio = 0;
		t->aio_failed = 1;
	}
	return t->aio;
}

/* Send a segment's runs. The O_DIRECT runs of several legs go down together (Linux AIO), as
 * dm-stripe's pieces of a bio reach their devices at once; the rest one by one. */
static int runs_flush(const struct dmf_map *m, enum op op, struct thread_bufs *t, int pipe_w, size_t request)
{
	struct run *runs = t->runs;
	struct iocb cbs[MAX_RUN_LEGS], *ptrs[MAX_RUN_LEGS];
	struct io_event evs[MAX_RUN_LEGS];
	uint32_t idx[MAX_RUN_LEGS];
	long k = 0, sent = 0;
	for (uint32_t i = 0; i < MAX_RUN_LEGS; i++)
		if (direct_run(m, op, &runs[i], request))
			idx[k++] = i;
	aio_context_t aio = k > 1 ? thread_aio(t) : 0;
	int ret = 0;
	if (aio) {
		for (long j = 0; j < k; j++) {
			struct run *r = &runs[idx[j]];
			memset(&cbs[j], 0, sizeof(cbs[j]));
			cbs[j].aio_fildes = (uint32_t)r->leg->dfd;
			cbs[j].aio_lio_opcode = op == OP_WRITE ? IOCB_CMD_PWRITEV : IOCB_CMD_PREADV;
			cbs[j].aio_buf = (uint64_t)(uintptr_t)r->iov;
			cbs[j].aio_nbytes = (uint64_t)r->niov;
			cbs[j].aio_offset = (int64_t)r->off;
			cbs[j].aio_data = (uint64_t)idx[j];
			ptrs[j] = &cbs[j];
		}
		sent = syscall(SYS_io_submit, aio, k, ptrs);
		if (sent < 0)
			sent = 0; /* sent one by one below */
		long got = 0;
		while (got < sent) {
			long n = syscall(SYS_io_getevents, aio, sent - got, sent - got, evs + got, NULL);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				return -1; /* cannot happen while requests are in flight; the buffer stays ours */
			got += n;
		}
		for (long j = 0; j < sent; j++) {
			struct run *r = &runs[evs[j].data];
			if (evs[j].res != (int64_t)r->len)
				ret = -1; /* an error or a short transfer: the Python path does it again */
		}
		for (long j = 0; j < sent; j++)
			run_clear(&runs[idx[j]]);
	}
	for (uint32_t i = 0; i < MAX_RUN_LEGS && !ret; i++)
		ret = run_flush(m, op, &runs[i], pipe_w, request);
	return ret;
}

/* Add a piece to the run of its leg (runs[stripe]); a piece that does not continue that run
 * sends the run first. Splices keep the request's order: one run at a time, whatever the leg. */
static int run_add(const struct dmf_map *m, enum op op, struct run *runs, uint32_t idx, const struct dmf_leg *l,
		   char *p, size_t n, uint64_t dev_off, int pipe_w, size_t request)
{
	struct run *r = &runs[op == OP_SPLICE ? 0 : idx];
	if (r->niov && (r->leg != l || r->off + r->len != dev_off || r->niov == RUN_IOVS || op == OP_SPLICE))
		if (run_flush(m, op, r, pipe_w, request))
			return -1;
	if (!r->niov) {
		r->leg = l;
		r->off = dev_off;
	}
	r->iov[r->niov].iov_base = p;
	r->iov[r->niov].iov_len = n;
	r->niov++;
	r->len += n;
	if ((uintptr_t)p % l->dalign || n % l->dalign)
		r->misaligned = 1;
	return 0;
}

/* Move [off, off+size) of the device, all inside the map. As Device._map, LinearTarget and
 * StripedTarget._pieces in dmtools.engine. Returns 0 or -1. */
static int map_io(const struct dmf_map *m, enum op op, char *buf, int pipe_w, size_t size, uint64_t off)
{
	uint32_t lo = 0, hi = m->nseg;
	while (hi - lo > 1) {
		uint32_t mid = (lo + hi) / 2;
		if (m->segs[mid].start <= off)
			lo = mid;
		else
			hi = mid;
	}
	struct thread_bufs *t = thread_bufs();
	if (!t)
		return -1;
	if (!t->runs && !(t->runs = calloc(MAX_RUN_LEGS, sizeof(*t->runs))))
		return -1;
	struct run *runs = t->runs;
	for (uint32_t k = 0; k < MAX_RUN_LEGS; k++)
		run_clear(&runs[k]);
	size_t pos = 0;
	int ret = 0;
	for (uint32_t i = lo; pos < size && i < m->nseg && !ret; i++) {
		const struct dmf_seg *s = &m->segs[i];
		/* a run per leg; a segment of more legs than that sends its runs one by one */
		uint32_t nruns = s->nlegs <= MAX_RUN_LEGS ? s->nlegs : 1;
		uint64_t here = off + pos;
		size_t len = (size_t)((s->end < off + size ? s->end : off + size) - here);
		uint64_t rel = here - s->start;
		size_t done = 0;
		while (done < len && !ret) {
			const struct dmf_leg *l = &s->legs[0];
			uint64_t dev_off;
			uint32_t idx = 0;
			size_t n = len - done;
			if (s->chunk) {
				uint64_t at = rel + done, chunk = at / s->chunk, within = at % s->chunk;
				uint64_t row = chunk / s->nlegs, stripe = chunk % s->nlegs;
				if (n > s->chunk - within)
					n = (size_t)(s->chunk - within);
				l = &s->legs[stripe];
				dev_off = l->base + row * s->chunk + within;
				idx = nruns > 1 ? (uint32_t)stripe : 0;
			} else {
				dev_off = l->base + rel + done;
			}
			ret = run_add(m, op, runs, idx, l, buf ? buf + pos + done : NULL, n, dev_off, pipe_w, size);
			done += n;
		}
		pos += len;
		if (!ret) /* a segment's runs end with it */
			ret = runs_flush(m, op, t, pipe_w, size);
	}
	return ret || pos != size ? -1 : 0;
}

/* The slot of handle id, read-locked, with a map covering [off, off+size); else NULL. */
static struct dmf_slot *enter(struct dmf_ctx *ctx, uint64_t id, size_t size, off_t off, int write)
{
	struct dmf_slot *s = slot_of(ctx, id);
	if (!s)
		return NULL;
	pthread_rwlock_rdlock(&s->lock);
	const struct dmf_map *m = s->id == id && atomic_load(&s->on) ? s->map : NULL;
	if (m && size && off >= 0 && (uint64_t)off + size <= m->size && !(write && m->readonly))
		return s;
	if (s->id == id)
		atomic_fetch_add(&s->stats[ST_FALLBACKS], 1);
	pthread_rwlock_unlock(&s->lock);
	return NULL;
}

static void leave(struct dmf_slot *s, int ok, int stat, int bytes_stat, size_t size)
{
	if (ok) {
		atomic_fetch_add(&s->stats[stat], 1);
		atomic_fetch_add(&s->stats[bytes_stat], size);
	} else {
		atomic_fetch_add(&s->stats[ST_ERRORS], 1);
	}
	pthread_rwlock_unlock(&s->lock);
}

/* Write through the slot's map: size, or FALLBACK (nothing to report: Python does it again). */
int dmf_slot_write(struct dmf_ctx *ctx, uint64_t id, const char *buf, size_t size, off_t off)
{
	struct dmf_slot *s = enter(ctx, id, size, off, 1), *low;
	if (!s)
		return FALLBACK;
	int first = 0;
	const struct dmf_map *m = through(ctx, s, size, (uint64_t)off, 1, &low, &first);
	if (first) {
		int made = first_write(ctx, s->map, buf, size, (uint64_t)off);
		pthread_rwlock_unlock(&s->map->chunks->lock);
		if (made) {
			atomic_fetch_add(&s->stats[ST_FIRST_WRITES], 1);
			leave(s, 1, ST_WRITES, ST_WRITE_BYTES, size);
			return (int)size;
		}
		atomic_fetch_add(&s->stats[ST_FALLBACKS], 1);
		pthread_rwlock_unlock(&s->lock);
		return FALLBACK;
	}
	if (!m)
		return FALLBACK;
	int ok = map_io(m, OP_WRITE, (char *)buf, -1, size, (uint64_t)off) == 0;
	release(s, low, 1);
	leave(s, ok, ST_WRITES, ST_WRITE_BYTES, size);
	return ok ? (int)size : FALLBACK;
}

/* Read through the slot's map into buf: size, or FALLBACK. */
int dmf_slot_read(struct dmf_ctx *ctx, uint64_t id, char *buf, size_t size, off_t off)
{
	struct dmf_slot *s = enter(ctx, id, size, off, 0), *low;
	if (!s)
		return FALLBACK;
	const struct dmf_map *m = through(ctx, s, size, (uint64_t)off, 0, &low, NULL);
	if (!m)
		return FALLBACK;
	int ok = map_io(m, OP_READ, buf, -1, size, (uint64_t)off) == 0;
	release(s, low, 0);
	leave(s, ok, ST_READS, ST_READ_BYTES, size);
	return ok ? (int)size : FALLBACK;
}

/* A read reply: the bytes spliced into this thread's pipe (libfuse splices them on into the
 * kernel's request), or read into a malloc'd buffer (small reads, a pipe that filled up). */
static int slot_read_buf(struct dmf_ctx *ctx, uint64_t id, struct fuse_bufvec **bufp, size_t size, off_t off)
{
	struct fuse_bufvec *vec = calloc(1, sizeof(*vec));
	if (!vec)
		return FALLBACK;
	struct dmf_slot *s = enter(ctx, id, size, off, 0), *low;
	const struct dmf_map *m = s ? through(ctx, s, size, (uint64_t)off, 0, &low, NULL) : NULL;
	if (!m) {
		free(vec);
		return FALLBACK;
	}
	vec->count = 1;
	int ok = 0;
	int *p = size >= ctx->pipe_min && size <= ctx->pipe_bytes ? reply_pipe(size, ctx->pipe_bytes) : NULL;
	if (p) {
		if (map_io(m, OP_SPLICE, NULL, p[1], size, (uint64_t)off) == 0) {
			vec->buf[0].fd = p[0];
			vec->buf[0].flags = FUSE_BUF_IS_FD;
			ok = 1;
		} else {
			close_pipe(thread_bufs()); /* holds part of the request */
		}
	}
	if (!ok) {
		char *mem = malloc(size);
		if (mem && map_io(m, OP_READ, mem, -1, size, (uint64_t)off) == 0) {
			vec->buf[0].mem = mem;
			ok = 1;
		} else {
			free(mem);
		}
	}
	release(s, low, 0);
	leave(s, ok, ST_READS, ST_READ_BYTES, size);
	if (!ok) {
		free(vec);
		return FALLBACK;
	}
	vec->buf[0].size = size;
	*bufp = vec;
	return 0;
}

/* --- the fuse_operations entries ----------------------------------------------------------- */
/* Set while the receive loop (dmf_main) hands libfuse a request that the map could not serve:
 * the entries then pass it straight to Python (it was tried in C already). */
static __thread int g_tried;

static struct dmf_ctx *current(void)
{
	char *c = g_get_context();
	return *(struct dmf_ctx **)(c + g_private_off);
}

static uint64_t handle_of(void *fi) { return fi ? *(uint64_t *)((char *)fi + g_fh_off) : 0; }

/* fuse_operations.init: mfusepy's, then the context becomes the file system's private_data
 * (libfuse passes fuse_main_real's user_data as private_data during init only). */
void *dmf_op_init(void *conn, void *cfg)
{
	struct dmf_ctx *ctx = current();
	ctx->py_init(conn, cfg);
	return ctx;
}

int dmf_op_write(const char *path, const char *buf, size_t size, off_t off, void *fi)
{
	struct dmf_ctx *ctx = current();
	int n = g_tried ? FALLBACK : dmf_slot_write(ctx, handle_of(fi), buf, size, off);
	return n != FALLBACK ? n : ctx->py_write(path, buf, size, off, fi);
}

int dmf_op_read_buf(const char *path, struct fuse_bufvec **bufp, size_t size, off_t off, void *fi)
{
	struct dmf_ctx *ctx = current();
	if (!g_tried && slot_read_buf(ctx, handle_of(fi), bufp, size, off) == 0)
		return 0;
	return ctx->py_read_buf(path, bufp, size, off, fi);
}

/* --- the receive loop: libfuse's session loop, with page-aligned write data -------------------
 *
 * libfuse's own loop (fuse_session_loop_mt) reads each request into a malloc'd buffer, which puts
 * a write's data 80 bytes (struct fuse_in_header + struct fuse_write_in, linux/fuse.h) past a
 * 16-byte aligned address: O_DIRECT then needs a copy. dmf_main does what fuse_main_real does
 * (lib/helper.c), but its workers receive into buffers placed so that the data of a write starts
 * on a page: reads and writes of a device with a map are served here and answered on /dev/fuse
 * at once (FUSE_WRITE straight from the receive buffer, FUSE_READ into it); every other request,
 * and one the map cannot serve, goes through fuse_session_process_buf as before (the Python
 * callbacks, which report errors). */
enum { FUSE_READ_OP = 15, FUSE_WRITE_OP = 16 }; /* linux/fuse.h: enum fuse_opcode */
struct fuse_in_header {
	uint32_t len, opcode;
	uint64_t unique, nodeid;
	uint32_t uid, gid, pid;
	uint16_t total_extlen, padding;
};
struct fuse_io_in { /* struct fuse_read_in and struct fuse_write_in share this layout */
	uint64_t fh, offset;
	uint32_t size, io_flags;
	uint64_t lock_owner;
	uint32_t flags, padding;
};
struct fuse_out_header {
	uint32_t len;
	int32_t error;
	uint64_t unique;
};
struct fuse_write_out {
	uint32_t size, padding;
};
#define REQ_HDR (sizeof(struct fuse_in_header) + sizeof(struct fuse_io_in))
#define PAGE 4096u
/* libfuse 3's receive size (se->bufsize: FUSE_MAX_MAX_PAGES pages + FUSE_BUFFER_HEADER_SIZE). */
#define RECV_BYTES ((256u + 1u) * PAGE)
#define HUGE (2u << 20)
#define RECV_MAP (2 * HUGE)

/* struct fuse_args and the 3.12 struct fuse_cmdline_opts (fuse_lowlevel.h; room to spare). */
struct fuse_args {
	int argc;
	char **argv;
	int allocated;
};
struct cmdline_opts {
	int singlethread, foreground, debug, nodefault_subtype;
	char *mountpoint;
	int show_version, show_help, clone_fd;
	unsigned int max_idle_threads, max_threads;
	long spare[8];
};

/* libfuse's functions, by the names of dmtools._ffi.fastio.LOOP_FUNCTIONS, in that order. */
static struct {
	int (*parse_cmdline)(struct fuse_args *, struct cmdline_opts *);
	void *(*fuse_new)(struct fuse_args *, const void *, size_t, void *);
	int (*mount)(void *, const char *);
	int (*daemonize)(int);
	void *(*get_session)(void *);
	int (*set_signal_handlers)(void *);
	void (*remove_signal_handlers)(void *);
	void (*unmount)(void *);
	void (*destroy)(void *);
	void (*opt_free_args)(struct fuse_args *);
	int (*receive_buf)(void *, struct fuse_buf *);
	void (*process_buf)(void *, const struct fuse_buf *);
	int (*exited)(void *);
	void (*exit)(void *);
	int (*session_fd)(void *);
} g_fuse;

void dmf_loop_setup(void *const *fns, size_t n)
{
	if (n * sizeof(void *) == sizeof(g_fuse))
		memcpy(&g_fuse, fns, sizeof(g_fuse));
}

static void reply(void *se, uint64_t unique, const void *data, size_t n)
{
	struct fuse_out_header out = {(uint32_t)(sizeof(out) + n), 0, unique};
	struct iovec iov[2] = {{&out, sizeof(out)}, {(void *)data, n}};
	/* ENOENT: the request was interrupted meanwhile; the kernel has forgotten it (as libfuse). */
	while (writev(g_fuse.session_fd(se), iov, n ? 2 : 1) < 0 && errno == EINTR)
		;
}

/* Serve a read or write of a mapped device here; 0 when done, FALLBACK otherwise. */
static int serve(struct dmf_ctx *ctx, void *se, char *req, size_t got)
{
	const struct fuse_in_header *in = (const void *)req;
	if ((in->opcode != FUSE_READ_OP && in->opcode != FUSE_WRITE_OP) || got < REQ_HDR || in->total_extlen)
		return FALLBACK;
	const struct fuse_io_in *io = (const void *)(req + sizeof(*in));
	char *data = req + REQ_HDR; /* page-aligned */
	uint64_t unique = in->unique;
	size_t size = io->size;
	if (in->opcode == FUSE_WRITE_OP) {
		if (got != REQ_HDR + size)
			return FALLBACK;
		if (dmf_slot_write(ctx, io->fh, data, size, (off_t)io->offset) != (int)size)
			return FALLBACK;
		struct fuse_write_out w = {(uint32_t)size, 0};
		reply(se, unique, &w, sizeof(w));
		return 0;
	}
	if (size > RECV_BYTES - PAGE || dmf_slot_read(ctx, io->fh, data, size, (off_t)io->offset) != (int)size)
		return FALLBACK; /* the request's header, before data, is intact for libfuse */
	reply(se, unique, data, size);
	return 0;
}

struct worker {
	pthread_t tid;
	struct dmf_ctx *ctx;
	void *se;
	sem_t *done;
	char *base; /* its receive buffer's mapping (RECV_MAP bytes): unmapped once it is joined */
	int err;
};

/* CPython's thread-state functions (dmf_py_setup), so that each worker keeps one Python thread
 * state for its life: ctypes runs a Python callback under PyGILState_Ensure/Release, which makes
 * and frees a thread state on every call in a thread that has none. */
static struct {
	int (*ensure)(void);		  /* PyGILState_Ensure */
	void (*release)(int);		  /* PyGILState_Release */
	void *(*save)(void);		  /* PyEval_SaveThread */
	void (*restore)(void *);	  /* PyEval_RestoreThread */
	int (*finalizing)(void);	  /* Py_IsFinalizing */
} g_py;

void dmf_py_setup(void *const *fns, size_t n)
{
	if (n * sizeof(void *) == sizeof(g_py))
		memcpy(&g_py, fns, sizeof(g_py));
}

struct py_kept {
	int gil;
	void *tstate; /* NULL: none kept */
};

static void py_keep(struct py_kept *k)
{
	k->tstate = NULL;
	if (!g_py.ensure || g_py.finalizing())
		return;
	k->gil = g_py.ensure();
	k->tstate = g_py.save(); /* the GIL given back; the thread state stays this thread's */
}

/* The worker ends (or is cancelled waiting for a request): its thread state freed, unless the
 * interpreter is finalizing (a thread taking the GIL then would never come back). */
static void py_drop(void *arg)
{
	struct py_kept *k = arg;
	if (!k->tstate || g_py.finalizing())
		return;
	g_py.restore(k->tstate);
	g_py.release(k->gil);
}

static void *work(void *arg)
{
	struct worker *w = arg;
	struct py_kept kept;
	py_keep(&kept);
	pthread_cleanup_push(py_drop, &kept);
	/* The receive buffer: REQ_HDR bytes before a page boundary, RECV_BYTES from there on, on a
	 * huge page where the kernel gives one (O_DIRECT pins one folio instead of 256 pages). */
	char *base = w->base;
	char *huge = (char *)(((uintptr_t)base + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
	madvise(huge, HUGE, MADV_HUGEPAGE);
	struct fuse_buf buf;
	memset(&buf, 0, sizeof(buf));
	buf.mem = huge + PAGE - REQ_HDR;
	while (!g_fuse.exited(w->se)) {
		buf.size = RECV_BYTES;
		buf.flags = 0;
		pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, NULL);
		int res = g_fuse.receive_buf(w->se, &buf);
		pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
		if (res == -EINTR)
			continue;
		if (res <= 0) {
			if (res < 0) {
				g_fuse.exit(w->se);
				w->err = res;
			}
			break;
		}
		if (buf.flags & FUSE_BUF_IS_FD || serve(w->ctx, w->se, buf.mem, (size_t)res) == FALLBACK) {
			g_tried = 1;
			g_fuse.process_buf(w->se, &buf);
			g_tried = 0;
		}
	}
	pthread_cleanup_pop(1);
	sem_post(w->done);
	return NULL;
}

/* Run the session's workers until it ends (fuse_session_loop_mt, with a fixed number of them:
 * a worker ending ends the others, which are cancelled only while they wait for a request). */
static int loop(struct dmf_ctx *ctx, void *se, unsigned int nthreads)
{
	struct worker *ws = calloc(nthreads, sizeof(*ws));
	sem_t done;
	if (!ws)
		return -ENOMEM;
	sem_init(&done, 0, 0);
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGHUP);
	sigaddset(&block, SIGQUIT);
	pthread_sigmask(SIG_BLOCK, &block, &old); /* the workers take no signals, as libfuse's */
	unsigned int started = 0;
	for (; started < nthreads; started++) {
		char *base = mmap(NULL, RECV_MAP, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (base == MAP_FAILED)
			break;
		ws[started] = (struct worker){.ctx = ctx, .se = se, .done = &done, .base = base};
		if (pthread_create(&ws[started].tid, NULL, work, &ws[started])) {
			munmap(base, RECV_MAP);
			break;
		}
		pthread_setname_np(ws[started].tid, "dmtools-fuse");
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	int err = started ? 0 : -ENOMEM;
	if (started) {
		while (sem_wait(&done) < 0 && errno == EINTR && !g_fuse.exited(se))
			; /* a signal handler of libfuse's ends the session too */
		g_fuse.exit(se);
		for (unsigned int i = 0; i < started; i++)
			pthread_cancel(ws[i].tid);
		for (unsigned int i = 0; i < started; i++) {
			pthread_join(ws[i].tid, NULL);
			munmap(ws[i].base, RECV_MAP);
			if (ws[i].err && !err)
				err = ws[i].err;
		}
	}
	sem_destroy(&done);
	free(ws);
	return err;
}

/* fuse_main_real (libfuse 3.14, lib/helper.c) with the loop above; the same exit codes. */
int dmf_main(int argc, char **argv, const void *ops, size_t ops_size, void *ctx)
{
	if (!g_fuse.session_fd)
		return 1;
	struct fuse_args args = {argc, argv, 0};
	struct cmdline_opts opts;
	memset(&opts, 0, sizeof(opts));
	if (g_fuse.parse_cmdline(&args, &opts) != 0)
		return 1;
	int res = 1;
	void *f = NULL, *se;
	if (opts.show_version || opts.show_help || !opts.mountpoint)
		goto out1;
	res = 3;
	if (!(f = g_fuse.fuse_new(&args, ops, ops_size, ctx)))
		goto out1;
	res = 4;
	if (g_fuse.mount(f, opts.mountpoint) != 0)
		goto out2;
	res = 5;
	if (g_fuse.daemonize(opts.foreground) != 0)
		goto out3;
	se = g_fuse.get_session(f);
	res = 6;
	if (g_fuse.set_signal_handlers(se) != 0)
		goto out3;
	res = loop(ctx, se, opts.singlethread ? 1 : opts.max_threads ? opts.max_threads : 10) ? 7 : 0;
	g_fuse.remove_signal_handlers(se);
out3:
	g_fuse.unmount(f);
out2:
	g_fuse.destroy(f);
out1:
	free(opts.mountpoint);
	g_fuse.opt_free_args(&args);
	return res;
}

/* --- kcopyd's lean path: one small job copied between plain descriptors -------------------
 *
 * kcopyd.inline runs a job of at most one sub-job on the caller's thread. When every region's
 * endpoint says its I/O is a plain pread/pwrite on a descriptor at the same byte offset
 * (Endpoint.plain_fd), the job is done here, without the GIL: the checks the Python path makes
 * before any I/O (each region inside its file or device, no two regions sharing bytes), then one
 * read of the source into a buffer and one write of it to each destination, short reads and
 * writes continued. Anything else -- a region past its device's end, regions sharing bytes (the
 * Python path refuses or orders them), a descriptor that is neither a regular file nor a block
 * device, no memory, a read error when the job ignores errors (the Python path salvages what it
 * can) -- returns KC_FALLBACK before any byte is written, and the Python path does the job.
 */
#define KC_FALLBACK (-1)
#define KC_READ_ERR (-2)
#define KC_MAX_DESTS 8    /* kcopyd.region.MAX_REGIONS */

/* What a region's descriptor is: the key two regions share bytes by (kcopyd.overlap._key) and
 * its size (BLKGETSIZE64, st_size). */
struct kc_file {
	int fd, blk;
	uint64_t k0, k1, size;
};

static int kc_file_of(int fd, struct kc_file *f)
{
	struct stat st;
	if (fstat(fd, &st) != 0)
		return -1;
	f->fd = fd;
	f->blk = S_ISBLK(st.st_mode);
	if (f->blk) {
		f->k0 = st.st_rdev;
		f->k1 = 0;
		return ioctl(fd, BLKGETSIZE64, &f->size) == 0 ? 0 : -1;
	}
	if (!S_ISREG(st.st_mode))
		return -1;
	f->k0 = st.st_dev;
	f->k1 = st.st_ino;
	f->size = (uint64_t)st.st_size;
	return 0;
}

static int kc_share(const struct kc_file *a, uint64_t aoff, const struct kc_file *b, uint64_t boff, uint64_t n)
{
	return a->blk == b->blk && a->k0 == b->k0 && a->k1 == b->k1 && aoff < boff + n && boff < aoff + n;
}

/* A test's seam: each pread/pwrite asks for at most this many bytes (0: all that is left), so
 * that short transfers are seen on files, which give whole ones. */
static uint64_t kc_max_io;

void dmk_set_max_io(uint64_t n) { kc_max_io = n; }

/* All n bytes read or written at off; -1 on an error or the end of the file (the caller's
 * checks made that one a file shrinking meanwhile). */
static int kc_all(int fd, int write, char *buf, uint64_t n, uint64_t off)
{
	while (n) {
		size_t want = kc_max_io && kc_max_io < n ? kc_max_io : n;
		ssize_t k = write ? pwrite(fd, buf, want, (off_t)off) : pread(fd, buf, want, (off_t)off);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		buf += k;
		off += (uint64_t)k;
		n -= (uint64_t)k;
	}
	return 0;
}

/* Copy n bytes at soff of sfd to each of the nd (descriptor, offset) pairs of d (fd, off, fd,
 * off...). ignore_error: nonzero when the job has IGNORE_ERROR. Returns the write_err bits of
 * the destinations that failed (0: all written), KC_READ_ERR when the source could not be read
 * (nothing written) or KC_FALLBACK (nothing done). */
int dmk_copy(int sfd, int64_t soff, const int64_t *d, int nd, int64_t n, int ignore_error)
{
	struct kc_file files[1 + KC_MAX_DESTS];
	uint64_t offs[1 + KC_MAX_DESTS];
	if (nd < 1 || nd > KC_MAX_DESTS || soff < 0 || n < 0)
		return KC_FALLBACK;
	for (int i = 0; i <= nd; i++) {
		int fd = i ? (int)d[2 * (i - 1)] : sfd;
		int64_t off = i ? d[2 * (i - 1) + 1] : soff;
		if (fd < 0 || off < 0)
			return KC_FALLBACK;
		offs[i] = (uint64_t)off;
		int known = -1; /* a descriptor met before is asked once */
		for (int j = 0; j < i && known < 0; j++)
			if (files[j].fd == fd)
				known = j;
		if (known >= 0)
			files[i] = files[known];
		else if (kc_file_of(fd, &files[i]) != 0)
			return KC_FALLBACK;
		if (offs[i] + (uint64_t)n > files[i].size)
			return KC_FALLBACK; /* past the device's end: the Python path raises InvalidArgument */
		for (int j = 0; j < i; j++)
			if (kc_share(&files[j], offs[j], &files[i], offs[i], (uint64_t)n))
				return KC_FALLBACK;
	}
	if (!n)
		return 0;
	char *buf = malloc((size_t)n);
	if (!buf)
		return KC_FALLBACK;
	int ret = 0;
	if (kc_all(sfd, 0, buf, (uint64_t)n, offs[0]) != 0) {
		ret = ignore_error ? KC_FALLBACK : KC_READ_ERR;
	} else {
		for (int i = 1; i <= nd; i++)
			if (kc_all(files[i].fd, 1, buf, (uint64_t)n, offs[i]) != 0)
				ret |= 1 << (i - 1);
	}
	free(buf);
	return ret;
}

/* dmk_copy with one destination (a thin pool breaking sharing of a block). */
int dmk_copy1(int sfd, int64_t soff, int dfd, int64_t doff, int64_t n, int ignore_error)
{
	int64_t d[2] = {dfd, doff};
	return dmk_copy(sfd, soff, d, 1, n, ignore_error);
}
