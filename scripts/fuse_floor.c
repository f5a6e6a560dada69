/* The floor of the exposure's hops: a trivial FUSE server on the raw /dev/fuse protocol.
 *
 * scripts/bench_engine.py --floor builds and runs it. It serves one file, "f", of a given size,
 * with FUSE direct_io, and does the least a server can: a read or write is moved between its
 * receive buffer (where a write's data starts on a page, as in dmtools/_ffi/fastio.c) and the
 * backing file with one O_DIRECT pread/pwrite at the same offset, or (backing "-") not at all:
 * writes are dropped and reads answered with the buffer as it is. A loop device over "f" then
 * costs what loop + FUSE cost and nothing of the engine: its ratio to the backing file bounds any
 * server's from above. With "pt:BACKING" the file is opened in FUSE passthrough (Linux 6.9,
 * FUSE 7.40: FUSE_PASSTHROUGH, FUSE_DEV_IOC_BACKING_OPEN, FOPEN_PASSTHROUGH): the kernel moves
 * every byte between the FUSE file and BACKING, and the server sees no reads or writes at all.
 *
 * usage: fuse_floor MOUNTPOINT SIZE BACKING|pt:BACKING|- THREADS
 * Runs until the file system is unmounted. No libfuse: the protocol of linux/fuse.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE 4096u
#define MAX_WRITE (1u << 20)
#define HUGE (2u << 20)
#define HDR (sizeof(struct fuse_in_header) + sizeof(struct fuse_write_in))

/* FUSE 7.40 (Linux 6.9) passthrough, newer than this system's linux/fuse.h: init flag bit 37
 * (flags2 bit 5), fuse_init_out.max_stack_depth (the first unused word), the open flag, the
 * backing id (fuse_open_out's padding word) and the ioctl that registers a backing file. */
#define PASSTHROUGH_FLAG2 (1u << (37 - 32))
#define FOPEN_PASSTHROUGH_FLAG (1u << 7)
struct backing_map {
	int32_t fd;
	uint32_t flags;
	uint64_t padding;
};
#define BACKING_OPEN _IOW(229, 1, struct backing_map)

static int g_fd, g_backing = -1, g_passthrough, g_backing_id;
static uint64_t g_size;
static pthread_mutex_t g_open_lock = PTHREAD_MUTEX_INITIALIZER;

static void reply(uint64_t unique, int error, const void *data, size_t n)
{
	struct fuse_out_header out = {(uint32_t)(sizeof(out) + (error ? 0 : n)), -error, unique};
	struct iovec iov[2] = {{&out, sizeof(out)}, {(void *)data, n}};
	while (writev(g_fd, iov, error || !n ? 1 : 2) < 0 && errno == EINTR)
		;
}

static void attr(struct fuse_attr *a, uint64_t ino)
{
	memset(a, 0, sizeof(*a));
	a->ino = ino;
	a->mode = ino == FUSE_ROOT_ID ? S_IFDIR | 0700 : S_IFREG | 0600;
	a->nlink = ino == FUSE_ROOT_ID ? 2 : 1;
	a->size = ino == FUSE_ROOT_ID ? 0 : g_size;
	a->blocks = a->size / 512;
	a->blksize = PAGE;
}

static void serve(char *req, size_t got)
{
	struct fuse_in_header *in = (void *)req;
	void *arg = req + sizeof(*in);
	switch (in->opcode) {
	case FUSE_INIT: {
		struct fuse_init_in *ii = arg;
		struct fuse_init_out o = {.major = FUSE_KERNEL_VERSION, .minor = FUSE_KERNEL_MINOR_VERSION,
					  .max_readahead = ii->max_readahead, .max_background = 64,
					  .congestion_threshold = 48, .max_write = MAX_WRITE, .time_gran = 1,
					  .max_pages = MAX_WRITE / PAGE};
		o.flags = ii->flags & (FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_ASYNC_DIO | FUSE_ASYNC_READ);
		if (g_passthrough) {
			if (!(ii->flags & FUSE_INIT_EXT) || !(ii->flags2 & PASSTHROUGH_FLAG2)) {
				fprintf(stderr, "fuse_floor: the kernel offers no FUSE passthrough\n");
				exit(1);
			}
			o.flags |= FUSE_INIT_EXT;
			o.flags2 = PASSTHROUGH_FLAG2;
			o.unused[0] = 1; /* max_stack_depth: the backing file is on a plain file system */
		}
		reply(in->unique, 0, &o, sizeof(o));
		return;
	}
	case FUSE_LOOKUP: {
		if (strcmp(arg, "f") != 0 || in->nodeid != FUSE_ROOT_ID) {
			reply(in->unique, ENOENT, NULL, 0);
			return;
		}
		struct fuse_entry_out e = {.nodeid = 2, .generation = 1};
		attr(&e.attr, 2);
		reply(in->unique, 0, &e, sizeof(e));
		return;
	}
	case FUSE_GETATTR: {
		struct fuse_attr_out a = {0};
		attr(&a.attr, in->nodeid);
		reply(in->unique, 0, &a, sizeof(a));
		return;
	}
	case FUSE_OPEN:
	case FUSE_OPENDIR: {
		struct fuse_open_out o = {.fh = 1, .open_flags = in->opcode == FUSE_OPEN ? FOPEN_DIRECT_IO : 0};
		if (in->opcode == FUSE_OPEN && g_passthrough) {
			pthread_mutex_lock(&g_open_lock);
			if (!g_backing_id) {
				struct backing_map map = {.fd = g_backing};
				int id = ioctl(g_fd, BACKING_OPEN, &map);
				g_backing_id = id > 0 ? id : -errno;
			}
			pthread_mutex_unlock(&g_open_lock);
			if (g_backing_id < 0) {
				reply(in->unique, -g_backing_id, NULL, 0);
				return;
			}
			o.open_flags = FOPEN_PASSTHROUGH_FLAG;
			o.padding = (uint32_t)g_backing_id; /* backing_id */
		}
		reply(in->unique, 0, &o, sizeof(o));
		return;
	}
	case FUSE_WRITE: {
		struct fuse_write_in *w = arg;
		if (got != HDR + w->size || (g_backing >= 0 && pwrite(g_backing, req + HDR, w->size, (off_t)w->offset)
								   != (ssize_t)w->size)) {
			reply(in->unique, EIO, NULL, 0);
			return;
		}
		struct fuse_write_out o = {.size = w->size};
		reply(in->unique, 0, &o, sizeof(o));
		return;
	}
	case FUSE_READ: {
		struct fuse_read_in *r = arg;
		char *data = req + HDR; /* page-aligned; the header is no longer needed */
		if (r->size > MAX_WRITE || (g_backing >= 0 && pread(g_backing, data, r->size, (off_t)r->offset)
								  != (ssize_t)r->size)) {
			reply(in->unique, EIO, NULL, 0);
			return;
		}
		reply(in->unique, 0, data, r->size);
		return;
	}
	case FUSE_FSYNC:
		reply(in->unique, g_backing >= 0 && fdatasync(g_backing) ? errno : 0, NULL, 0);
		return;
	case FUSE_FLUSH:
	case FUSE_RELEASE:
	case FUSE_RELEASEDIR:
		reply(in->unique, 0, NULL, 0);
		return;
	case FUSE_FORGET:
	case FUSE_BATCH_FORGET:
	case FUSE_INTERRUPT:
		return;
	default:
		reply(in->unique, ENOSYS, NULL, 0);
	}
}

static void *work(void *unused)
{
	(void)unused;
	/* a write's data (after the in header and fuse_write_in) starts on a page of a huge page,
	 * where the kernel gives one (as fastio.c's receive buffers) */
	char *map = mmap(NULL, 2 * HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (map == MAP_FAILED)
		return NULL;
	char *huge = (char *)(((uintptr_t)map + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
	madvise(huge, HUGE, MADV_HUGEPAGE);
	char *req = huge + PAGE - HDR;
	for (;;) {
		ssize_t n = read(g_fd, req, MAX_WRITE + PAGE);
		if (n < 0 && (errno == EINTR || errno == ENOENT || errno == EAGAIN))
			continue;
		if (n <= 0)
			break; /* ENODEV: unmounted */
		serve(req, (size_t)n);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s MOUNTPOINT SIZE BACKING|- THREADS\n", argv[0]);
		return 2;
	}
	g_size = strtoull(argv[2], NULL, 0);
	int threads = atoi(argv[4]);
	const char *backing = argv[3];
	if (strncmp(backing, "pt:", 3) == 0) {
		g_passthrough = 1;
		backing += 3;
	}
	if (strcmp(backing, "-") != 0 && (g_backing = open(backing, O_RDWR | (g_passthrough ? 0 : O_DIRECT))) < 0) {
		perror(backing);
		return 1;
	}
	if ((g_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC)) < 0) {
		perror("/dev/fuse");
		return 1;
	}
	char opts[128];
	snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,group_id=0", g_fd);
	if (mount("fuse_floor", argv[1], "fuse.fuse_floor", MS_NOSUID | MS_NODEV, opts) != 0) {
		perror("mount");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	pthread_t tids[64];
	if (threads < 1 || threads > 64)
		threads = 1;
	for (int i = 1; i < threads; i++)
		pthread_create(&tids[i], NULL, work, NULL);
	work(NULL);
	return 0;
}
