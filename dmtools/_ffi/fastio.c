/* The exposure's C data path: FUSE write and read_buf served without Python.
 *
 * Installed by dmtools.engine.fastpath in place of mfusepy's `write`, `read_buf` and `init`
 * entries of libfuse 3's `struct fuse_operations` (fuse.h). Each FUSE file (one per exposed
 * device) has a slot; its open file handle (`fuse_file_info.fh`) is the slot's id. Python
 * installs in a slot a map of the device's live table when every segment maps straight onto
 * backing files (`linear`, `striped`), and removes it before the device's suspend gate closes.
 * A request whose slot holds a map is moved here, without the GIL (pwrite, or splice into a
 * per-thread pipe that libfuse splices into its reply); every other request, and every request
 * that meets an error, runs the original Python callback, which does it again and reports it
 * exactly as it always has.
 *
 * Each slot's map is read under a read lock held for the whole request: taking the write lock
 * (dmf_slot_set) waits for the requests in flight, so nothing passes a suspend once it returned.
 * Maps own duplicates of the backing descriptors: a table closing its files never leaves a map
 * with a descriptor number that was reused.
 *
 * Plain C (no Python headers): built with `cc -shared` and loaded with ctypes (dmtools._ffi.fastio).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define DMF_ABI 1
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

enum { ST_READS, ST_WRITES, ST_READ_BYTES, ST_WRITE_BYTES, ST_FALLBACKS, ST_ERRORS, DMF_NSTATS };

struct dmf_leg {
	int fd, rfd, dfd;
	uint64_t dalign, base;
};
struct dmf_seg {
	uint64_t start, end, chunk;
	uint32_t nlegs;
	struct dmf_leg *legs;
};
struct dmf_map {
	uint64_t size, direct_min, random_max;
	int readonly;
	uint32_t nseg;
	struct dmf_seg *segs;
};
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

/* --- per-thread buffers: the O_DIRECT bounce buffer and the read reply pipe ---------------- */
struct thread_bufs {
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

/* --- the mapping: one table's byte ranges onto (descriptor, offset) pieces ----------------- */
enum op { OP_WRITE, OP_READ, OP_SPLICE };

static int put(const struct dmf_map *m, const struct dmf_leg *l, const char *buf, size_t n, uint64_t off)
{
	/* As dmtools.engine.backing.BackingDevice.write: large aligned writes through O_DIRECT, from
	 * a bounce buffer (libfuse's request buffer is not aligned). */
	int fd = l->fd;
	if (l->dfd >= 0 && n >= m->direct_min && off % l->dalign == 0 && n % l->dalign == 0) {
		char *b = bounce(n);
		if (b) {
			memcpy(b, buf, n);
			buf = b;
			fd = l->dfd;
		}
	}
	size_t done = 0;
	while (done < n) {
		ssize_t k = pwrite(fd, buf + done, n - done, (off_t)(off + done));
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		done += (size_t)k;
	}
	return 0;
}

static int get(int fd, char *buf, size_t n, uint64_t off)
{
	size_t done = 0;
	while (done < n) {
		ssize_t k = pread(fd, buf + done, n - done, (off_t)(off + done));
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1; /* an error, or the end of the file: the Python path reports it */
		done += (size_t)k;
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

/* Reads of a request under random_max go through the descriptor without read-ahead: through
 * the other one each small random read would read ahead a window of the file. */
static int piece(const struct dmf_map *m, enum op op, const struct dmf_leg *l, char *buf, int pipe_w, size_t n,
		 uint64_t off, size_t request)
{
	int fd = request < m->random_max ? l->rfd : l->fd;
	switch (op) {
	case OP_WRITE:
		return put(m, l, buf, n, off);
	case OP_READ:
		return get(fd, buf, n, off);
	default:
		return splice_in(fd, pipe_w, n, off);
	}
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
	size_t pos = 0;
	for (uint32_t i = lo; pos < size && i < m->nseg; i++) {
		const struct dmf_seg *s = &m->segs[i];
		uint64_t here = off + pos;
		size_t len = (size_t)((s->end < off + size ? s->end : off + size) - here);
		uint64_t rel = here - s->start;
		size_t done = 0;
		while (done < len) {
			const struct dmf_leg *l = &s->legs[0];
			uint64_t dev_off;
			size_t n = len - done;
			if (s->chunk) {
				uint64_t at = rel + done, chunk = at / s->chunk, within = at % s->chunk;
				uint64_t row = chunk / s->nlegs, stripe = chunk % s->nlegs;
				if (n > s->chunk - within)
					n = (size_t)(s->chunk - within);
				l = &s->legs[stripe];
				dev_off = l->base + row * s->chunk + within;
			} else {
				dev_off = l->base + rel + done;
			}
			if (piece(m, op, l, buf ? buf + pos + done : NULL, pipe_w, n, dev_off, size))
				return -1;
			done += n;
		}
		pos += len;
	}
	return pos == size ? 0 : -1;
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
	struct dmf_slot *s = enter(ctx, id, size, off, 1);
	if (!s)
		return FALLBACK;
	int ok = map_io(s->map, OP_WRITE, (char *)buf, -1, size, (uint64_t)off) == 0;
	leave(s, ok, ST_WRITES, ST_WRITE_BYTES, size);
	return ok ? (int)size : FALLBACK;
}

/* Read through the slot's map into buf: size, or FALLBACK. */
int dmf_slot_read(struct dmf_ctx *ctx, uint64_t id, char *buf, size_t size, off_t off)
{
	struct dmf_slot *s = enter(ctx, id, size, off, 0);
	if (!s)
		return FALLBACK;
	int ok = map_io(s->map, OP_READ, buf, -1, size, (uint64_t)off) == 0;
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
	struct dmf_slot *s = enter(ctx, id, size, off, 0);
	if (!s) {
		free(vec);
		return FALLBACK;
	}
	vec->count = 1;
	int ok = 0;
	int *p = size >= ctx->pipe_min && size <= ctx->pipe_bytes ? reply_pipe(size, ctx->pipe_bytes) : NULL;
	if (p) {
		if (map_io(s->map, OP_SPLICE, NULL, p[1], size, (uint64_t)off) == 0) {
			vec->buf[0].fd = p[0];
			vec->buf[0].flags = FUSE_BUF_IS_FD;
			ok = 1;
		} else {
			close_pipe(thread_bufs()); /* holds part of the request */
		}
	}
	if (!ok) {
		char *mem = malloc(size);
		if (mem && map_io(s->map, OP_READ, mem, -1, size, (uint64_t)off) == 0) {
			vec->buf[0].mem = mem;
			ok = 1;
		} else {
			free(mem);
		}
	}
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
	int n = dmf_slot_write(ctx, handle_of(fi), buf, size, off);
	return n != FALLBACK ? n : ctx->py_write(path, buf, size, off, fi);
}

int dmf_op_read_buf(const char *path, struct fuse_bufvec **bufp, size_t size, off_t off, void *fi)
{
	struct dmf_ctx *ctx = current();
	if (slot_read_buf(ctx, handle_of(fi), bufp, size, off) == 0)
		return 0;
	return ctx->py_read_buf(path, bufp, size, off, fi);
}
