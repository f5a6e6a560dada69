"""The C surface of libdevmapper that dmtools uses, declared for cffi's ABI mode, and the few
functions of dmtools' own C library (``fastio.c``) called through cffi (their section at the end).

Only what is called is declared. Layouts follow ``libdm/libdevmapper.h`` of lvm2 (1.02.185 and
later); a wrong layout in ABI mode corrupts memory silently, so every struct read here is declared
in full. ``struct dm_info`` has the 12-field layout of symbol version ``DM_1_02_97``, the default
version that ``dlsym`` binds.
"""

from __future__ import annotations

import enum

#: Library names tried in order: Debian's SONAME, upstream's SONAME; then ``find_library``.
SONAMES: tuple[str, ...] = ("libdevmapper.so.1.02.1", "libdevmapper.so.1.02")


class TaskType(enum.IntEnum):
    """``DM_DEVICE_*`` task types (the anonymous enum of ``libdevmapper.h``)."""

    CREATE = 0
    RELOAD = 1
    REMOVE = 2
    REMOVE_ALL = 3
    SUSPEND = 4
    RESUME = 5
    INFO = 6
    DEPS = 7
    RENAME = 8
    VERSION = 9
    STATUS = 10
    TABLE = 11
    WAITEVENT = 12
    LIST = 13
    CLEAR = 14
    MKNODES = 15
    LIST_VERSIONS = 16
    TARGET_MSG = 17
    SET_GEOMETRY = 18
    ARM_POLL = 19
    GET_TARGET_VERSION = 20


# udev flags for dm_task_set_cookie (bottom of libdevmapper.h).
DM_UDEV_DISABLE_DM_RULES_FLAG = 0x0001
DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG = 0x0002
DM_UDEV_DISABLE_DISK_RULES_FLAG = 0x0004
DM_UDEV_DISABLE_OTHER_RULES_FLAG = 0x0008
DM_UDEV_LOW_PRIORITY_FLAG = 0x0010
DM_UDEV_DISABLE_LIBRARY_FALLBACK = 0x0020
DM_UDEV_PRIMARY_SOURCE_FLAG = 0x0040

# struct dm_name_list flags after the event number (include/uapi/linux/dm-ioctl.h, dm-ioctl 4.45+).
DM_NAME_LIST_FLAG_HAS_UUID = 1
DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID = 2

#: fastio.c's (dms.c's) copy-on-write of one chunk: the end of :data:`CDEF` (ABI mode), and on its own
#: the declarations of the API-mode extension :mod:`dmtools._ffi.dms` builds.
DMS_CDEF = """
int dms_copy_commit_chunk(int ofd, int64_t ooff, int64_t n, int cfd, int64_t coff, int cow_zeroed, char *area,
                          int64_t alen, int64_t aoff, int64_t index, uint64_t old, uint64_t new, int wfd,
                          const char *wbuf, int64_t wlen, int64_t woff);
int dms_commit_copy(const char *src, int64_t n, int cfd, int64_t coff, int cow_zeroed, char *area, int64_t alen,
                    int64_t aoff, int64_t index, uint64_t old, uint64_t new);
int64_t dms_last_flush_ns(void);            /* the mean time of the last call's flushes, or -1 */
void dms_set_fault(int step, int short_io); /* tests: the step-th system call of the next call fails */
int dms_last_ops(char *out, int n);          /* tests: the system calls of this thread's last call */
struct dms_snap;                             /* one snapshot's first writes in C (snapshot.store.fast) */
struct dms_snap *dms_snap_new(int64_t nchunks, int64_t cb, int64_t logmax);
void dms_snap_free(struct dms_snap *s);
void dms_snap_mark(struct dms_snap *s, int64_t old, int64_t count);
void dms_snap_mark_keys(struct dms_snap *s, const void *keys, int64_t n, int shift, int as_double);
void dms_snap_arm(struct dms_snap *s, int64_t next_free, int64_t stride, int64_t cow_chunks, int64_t zeroed_from,
                  int64_t zeroed_upto, int zero_limit, char *area, int64_t alen, int64_t aoff, int64_t committed,
                  int64_t slow_ns, int slow);
void dms_snap_hold(struct dms_snap *s, int hold);  /* tests: hold the mutex as a write in flight does */
void dms_snap_fence(struct dms_snap *s, int64_t *out);
int dms_snap_write(struct dms_snap *s, int64_t chunk, int ofd, int64_t ooff, int cfd, int64_t cbase, int64_t csize,
                   int wfd, const char *wbuf, int64_t wlen, int64_t woff);
"""

CDEF = """
struct dm_task;

struct dm_info {
    int exists;
    int suspended;
    int live_table;
    int inactive_table;
    int32_t open_count;
    uint32_t event_nr;
    uint32_t major;
    uint32_t minor;
    int read_only;
    int32_t target_count;
    int deferred_remove;
    int internal_suspend;
};

struct dm_deps {
    uint32_t count;
    uint32_t filler;
    uint64_t device[];
};

struct dm_names {
    uint64_t dev;
    uint32_t next;
    char name[];
};

struct dm_versions {
    uint32_t next;
    uint32_t version[3];
    char name[];
};

enum {
    DM_DEVICE_CREATE, DM_DEVICE_RELOAD, DM_DEVICE_REMOVE, DM_DEVICE_REMOVE_ALL,
    DM_DEVICE_SUSPEND, DM_DEVICE_RESUME, DM_DEVICE_INFO, DM_DEVICE_DEPS, DM_DEVICE_RENAME,
    DM_DEVICE_VERSION, DM_DEVICE_STATUS, DM_DEVICE_TABLE, DM_DEVICE_WAITEVENT, DM_DEVICE_LIST,
    DM_DEVICE_CLEAR, DM_DEVICE_MKNODES, DM_DEVICE_LIST_VERSIONS, DM_DEVICE_TARGET_MSG,
    DM_DEVICE_SET_GEOMETRY, DM_DEVICE_ARM_POLL, DM_DEVICE_GET_TARGET_VERSION
};

/* The legacy log hook: libdm formats every message itself and calls this as
   fn(level, file, line, "%s", text) (libdm-common.c _log_to_default_log). Declared with a fixed
   fifth argument because cffi cannot build variadic callbacks. */
typedef void (*dmtools_log_fn)(int level, const char *file, int line, const char *f,
                               const char *text);
void dm_log_init(dmtools_log_fn fn);
void dm_log_init_verbose(int level);

struct dm_task *dm_task_create(int type);
void dm_task_destroy(struct dm_task *dmt);
int dm_task_run(struct dm_task *dmt);
int dm_task_get_errno(struct dm_task *dmt);

int dm_task_set_name(struct dm_task *dmt, const char *name);
int dm_task_set_uuid(struct dm_task *dmt, const char *uuid);
int dm_task_set_major_minor(struct dm_task *dmt, int major, int minor,
                            int allow_default_major_fallback);
int dm_task_set_newname(struct dm_task *dmt, const char *newname);
int dm_task_set_ro(struct dm_task *dmt);
int dm_task_no_flush(struct dm_task *dmt);
int dm_task_deferred_remove(struct dm_task *dmt);
int dm_task_query_inactive_table(struct dm_task *dmt);
/* libdm 1.02.181+ (symbol version DM_1_02_181): resolved on first use, absent in older libdm. */
int dm_task_ima_measurement(struct dm_task *dmt);
int dm_task_set_message(struct dm_task *dmt, const char *message);
int dm_task_set_sector(struct dm_task *dmt, uint64_t sector);
int dm_task_add_target(struct dm_task *dmt, uint64_t start, uint64_t size, const char *ttype,
                       const char *params);

int dm_task_get_info(struct dm_task *dmt, struct dm_info *dmi);
const char *dm_task_get_name(const struct dm_task *dmt);
const char *dm_task_get_uuid(const struct dm_task *dmt);
struct dm_deps *dm_task_get_deps(struct dm_task *dmt);
struct dm_names *dm_task_get_names(struct dm_task *dmt);
struct dm_versions *dm_task_get_versions(struct dm_task *dmt);
const char *dm_task_get_message_response(struct dm_task *dmt);
int dm_task_get_driver_version(struct dm_task *dmt, char *version, size_t size);
void *dm_get_next_target(struct dm_task *dmt, void *next, uint64_t *start, uint64_t *length,
                         char **target_type, char **params);

int dm_get_library_version(char *version, size_t size);
int dm_driver_version(char *version, size_t size);

int dm_cookie_supported(void);
int dm_udev_create_cookie(uint32_t *cookie);
int dm_task_set_cookie(struct dm_task *dmt, uint32_t *cookie, uint16_t flags);
int dm_udev_wait(uint32_t cookie);
int dm_udev_wait_immediate(uint32_t cookie, int *ready);
int dm_udev_complete(uint32_t cookie);
void dm_udev_set_sync_support(int sync_with_udev);
int dm_udev_get_sync_support(void);
void dm_task_update_nodes(void);
void dm_lib_release(void);

/* --- kcopyd's lean path (kcopyd.inline._plain_copy): dmtools' own fastio.c, not libdevmapper,
   opened by dmtools._ffi.fastio.kcopyd_lib from the built fastio library. */
int dmk_copy(int sfd, int64_t soff, const int64_t *d, int nd, int64_t n, int ignore_error);
int dmk_copy1(int sfd, int64_t soff, int dfd, int64_t doff, int64_t n, int ignore_error);
void dmk_set_max_io(uint64_t n); /* tests: at most n bytes per pread/pwrite */

/* --- the classic snapshot's copy-on-write of one chunk (snapshot.route.copy_commit): fastio.c. */
""" + DMS_CDEF
