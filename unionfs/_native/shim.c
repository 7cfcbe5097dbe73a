/*
 * unionfs native shim: a shared library loaded (RTLD_GLOBAL, or LD_PRELOAD) before pyfuse3, so that pyfuse3's
 * calls into libfuse's low-level API reach these definitions first.
 *
 * What it does, and only when asked:
 *   - fuse_session_new: copies pyfuse3's operations table, puts its own init (connection flags), opendir
 *     (cached listings), readdir (plain READDIR when the kernel's adaptive readdirplus asks for it) and two
 *     observers (read, write_buf: request sizes) in front of pyfuse3's handlers, then calls libfuse's function;
 *   - fuse_reply_open / fuse_reply_err / fuse_reply_buf: finish what the wrapped handlers started for a request
 *     (the reply of a directory open carries cache_readdir and keep_cache);
 *   - fuse_add_direntry_plus: writes a plain entry when the request is a plain READDIR.
 * Every other request goes to pyfuse3's handler untouched. libfuse's own functions are found with dlvsym at the
 * version pyfuse3 binds (FUSE_3.0); the shim's definitions carry that version too (see shim.map).
 *
 * State is per process: pyfuse3 has one session at a time.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 31

#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SHIM_VERSION "0.1"
#define EXPORT __attribute__((visibility("default")))
#define MIB (1024u * 1024u)

/* The bit of a file handle that marks a plain READDIR (pyfuse3 hands fi->fh to Python unchanged). */
#define PLAIN_READDIR_BIT (UINT64_C(1) << 63)

/* -- libfuse's own functions ------------------------------------------------------------------------------ */

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
                                               void *);
typedef void (*session_destroy_fn)(struct fuse_session *);
typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);
typedef int (*reply_err_fn)(fuse_req_t, int);
typedef int (*reply_buf_fn)(fuse_req_t, const char *, size_t);
typedef size_t (*add_direntry_plus_fn)(fuse_req_t, char *, size_t, const char *, const struct fuse_entry_param *,
                                       off_t);
typedef size_t (*add_direntry_fn)(fuse_req_t, char *, size_t, const char *, const struct stat *, off_t);
typedef int (*reply_data_fn)(fuse_req_t, struct fuse_bufvec *, enum fuse_buf_copy_flags);
typedef int (*version_fn)(void);
typedef const char *(*pkgversion_fn)(void);

static session_new_fn real_session_new;
static session_destroy_fn real_session_destroy;
static reply_open_fn real_reply_open;
static reply_err_fn real_reply_err;
static reply_buf_fn real_reply_buf;
static add_direntry_plus_fn real_add_direntry_plus;
static add_direntry_fn real_add_direntry;
static reply_data_fn real_reply_data;
static version_fn real_version;
static pkgversion_fn real_pkgversion;

/* Why the shim passes everything through (empty when it is active). */
static char g_reason[160];
static int g_active;

/* -- what Python reads -------------------------------------------------------------------------------------- */

/* Mirrored by unionfs/_native/__init__.py (Counters): append only. */
struct unionfs_native_counters {
    uint64_t session_new;     /* fuse_session_new calls seen */
    uint64_t session_wrapped; /* ... of which got the shim's operations table */
    uint64_t init;            /* init callbacks */
    uint64_t opendir;         /* OPENDIR requests */
    uint64_t dir_cached;      /* opendir replies sent with cache_readdir + keep_cache */
    uint64_t dir_untracked;   /* directory opens not flagged: the table of pending requests was full */
    uint64_t reply_open;      /* fuse_reply_open calls (files and directories) */
    uint64_t reply_err;       /* fuse_reply_err calls */
    uint64_t readdir_plain;   /* plain READDIR requests */
    uint64_t entries_plain;   /* entries written as plain dirents */
    uint64_t read;            /* READ requests */
    uint64_t read_max;        /* largest READ size asked */
    uint64_t write;           /* WRITE requests */
    uint64_t write_max;       /* largest WRITE size received */
    uint64_t write_bytes;     /* bytes received in WRITE requests */
    uint64_t readdirplus;     /* READDIRPLUS requests */
    uint64_t read_native;     /* READ requests served on a registered descriptor, without Python */
};

/* Mirrored by unionfs/_native/__init__.py (Connection): append only. */
struct unionfs_native_conn {
    uint32_t valid;                           /* 1 once an init callback ran */
    uint32_t proto_major, proto_minor;
    uint32_t capable;                         /* what the kernel offered */
    uint32_t offered_max_write;               /* libfuse's value before init (its own limit) */
    uint32_t offered_max_readahead;           /* the kernel's offer */
    uint32_t offered_max_read;
    uint32_t want_libfuse;                    /* conn->want as libfuse prepared it */
    uint32_t want_pyfuse3;                    /* ... after pyfuse3's init */
    uint32_t want;                            /* ... after the shim's */
    uint32_t max_write;                       /* what the shim left in conn */
    uint32_t max_readahead;
    uint32_t max_background;
    uint32_t congestion_threshold;
    uint32_t time_gran;
};

/* Options (unionfs_native_set). */
enum {
    OPT_TUNE_CONN = 1,     /* max_write 1 MiB, max_readahead as offered; default on */
    OPT_CACHE_DIRS = 2,    /* cache_readdir + keep_cache on opendir replies; default off */
    OPT_READDIRPLUS_AUTO = 3, /* FUSE_CAP_READDIRPLUS_AUTO, plain READDIR served; default off */
};

static struct unionfs_native_counters g_counters;
static struct unionfs_native_conn g_conn;
static atomic_int g_opt_tune = 1;
static atomic_int g_opt_cache_dirs;
static atomic_int g_opt_rdplus_auto;
/* The readdirplus_auto setting of the session being created (the init callback decides with it). */
static int g_session_rdplus_auto;

static void dump_to_environment(void);

#define COUNT(field) __atomic_add_fetch(&g_counters.field, 1, __ATOMIC_RELAXED)
#define ADD(field, n) __atomic_add_fetch(&g_counters.field, (n), __ATOMIC_RELAXED)

static void note_max(uint64_t *field, uint64_t value)
{
    uint64_t seen = __atomic_load_n(field, __ATOMIC_RELAXED);
    while (value > seen && !__atomic_compare_exchange_n(field, &seen, value, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}

/* -- requests a wrapped handler started and a reply must finish --------------------------------------------- */

/* pyfuse3 replies later (after its coroutine ran), from the thread that runs the loop; a request is known by its
 * fuse_req_t until its reply frees it. The table is small: it holds requests between dispatch and reply. */
enum { KIND_NONE = 0, KIND_OPENDIR = 1, KIND_PLAIN_READDIR = 2 };
#define PENDING_SLOTS 512

static struct {
    fuse_req_t req;
    int kind;
} g_pending[PENDING_SLOTS];
static atomic_int g_pending_count;
static pthread_mutex_t g_pending_lock = PTHREAD_MUTEX_INITIALIZER;

static int pending_add(fuse_req_t req, int kind)
{
    int added = 0;
    pthread_mutex_lock(&g_pending_lock);
    for (int i = 0; i < PENDING_SLOTS; i++) {
        if (g_pending[i].req == NULL) {
            g_pending[i].req = req;
            g_pending[i].kind = kind;
            atomic_fetch_add(&g_pending_count, 1);
            added = 1;
            break;
        }
    }
    pthread_mutex_unlock(&g_pending_lock);
    return added;
}

/* The kind ``req`` was registered with (KIND_NONE if none); ``take`` removes it. */
static int pending_find(fuse_req_t req, int take)
{
    int kind = KIND_NONE;
    if (atomic_load(&g_pending_count) == 0)
        return KIND_NONE;
    pthread_mutex_lock(&g_pending_lock);
    for (int i = 0; i < PENDING_SLOTS; i++) {
        if (g_pending[i].req == req) {
            kind = g_pending[i].kind;
            if (take) {
                g_pending[i].req = NULL;
                g_pending[i].kind = KIND_NONE;
                atomic_fetch_sub(&g_pending_count, 1);
            }
            break;
        }
    }
    pthread_mutex_unlock(&g_pending_lock);
    return kind;
}

static void pending_clear(void)
{
    pthread_mutex_lock(&g_pending_lock);
    memset(g_pending, 0, sizeof g_pending);
    atomic_store(&g_pending_count, 0);
    pthread_mutex_unlock(&g_pending_lock);
}

/* -- the operations table ------------------------------------------------------------------------------------ */

static struct fuse_lowlevel_ops g_inner; /* pyfuse3's handlers */
static struct fuse_lowlevel_ops g_outer; /* what libfuse gets */

static void shim_init(void *userdata, struct fuse_conn_info *conn)
{
    struct unionfs_native_conn c;
    memset(&c, 0, sizeof c);
    COUNT(init);
    c.proto_major = conn->proto_major;
    c.proto_minor = conn->proto_minor;
    c.capable = conn->capable;
    c.offered_max_write = conn->max_write;
    c.offered_max_readahead = conn->max_readahead;
    c.offered_max_read = conn->max_read;
    c.want_libfuse = conn->want;
    if (g_inner.init)
        g_inner.init(userdata, conn);
    c.want_pyfuse3 = conn->want;
    if (atomic_load(&g_opt_tune)) {
        /* libfuse lowers max_write to what its receive buffer holds after init; 1 MiB is that limit in 3.14. */
        conn->max_write = conn->max_write < MIB ? conn->max_write : MIB;
        conn->max_readahead = c.offered_max_readahead;
    }
    if (g_session_rdplus_auto && (conn->capable & FUSE_CAP_READDIRPLUS_AUTO) && (conn->want & FUSE_CAP_READDIRPLUS))
        conn->want |= FUSE_CAP_READDIRPLUS_AUTO;
    c.want = conn->want;
    c.max_write = conn->max_write;
    c.max_readahead = conn->max_readahead;
    c.max_background = conn->max_background;
    c.congestion_threshold = conn->congestion_threshold;
    c.time_gran = conn->time_gran;
    c.valid = 1;
    g_conn = c;
    dump_to_environment();
}

static void shim_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    COUNT(opendir);
    if (atomic_load(&g_opt_cache_dirs) && !pending_add(req, KIND_OPENDIR))
        COUNT(dir_untracked);
    g_inner.opendir(req, ino, fi);
}

/* A plain READDIR: pyfuse3's readdirplus handler fills the buffer, fuse_add_direntry_plus writes plain entries
 * for it, and the file handle Python sees carries PLAIN_READDIR_BIT (the kernel takes no lookup reference for
 * plain entries: Python must not count one). */
static void shim_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    struct fuse_file_info copy = *fi;
    COUNT(readdir_plain);
    if (!pending_add(req, KIND_PLAIN_READDIR)) {
        real_reply_err(req, EAGAIN);
        return;
    }
    copy.fh |= PLAIN_READDIR_BIT;
    g_inner.readdirplus(req, ino, size, off, &copy);
}

static void shim_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    COUNT(readdirplus);
    g_inner.readdirplus(req, ino, size, off, fi);
}

/* -- descriptors the shell registered for its file handles (the data path, reads only for now) -------------- */

/* fh -> descriptor, open addressing; a removed slot keeps FD_GONE so that probing goes on past it. */
#define FD_SLOTS 4096
#define FD_FREE (-1)
#define FD_GONE (-2)
static struct {
    uint64_t fh;
    int fd;
} g_fds[FD_SLOTS];
static atomic_int g_fd_count;
static pthread_mutex_t g_fd_lock = PTHREAD_MUTEX_INITIALIZER;

static void fd_table_clear(void)
{
    pthread_mutex_lock(&g_fd_lock);
    for (int i = 0; i < FD_SLOTS; i++) {
        g_fds[i].fh = 0;
        g_fds[i].fd = FD_FREE;
    }
    atomic_store(&g_fd_count, 0);
    pthread_mutex_unlock(&g_fd_lock);
}

static unsigned fd_hash(uint64_t fh)
{
    return (unsigned)((fh * UINT64_C(0x9E3779B97F4A7C15)) >> 52) % FD_SLOTS;
}

/* The descriptor registered for fh, or -1. */
static int fd_lookup(uint64_t fh)
{
    int fd = -1;
    if (atomic_load(&g_fd_count) == 0)
        return -1;
    pthread_mutex_lock(&g_fd_lock);
    for (unsigned i = 0, at = fd_hash(fh); i < FD_SLOTS; i++, at = (at + 1) % FD_SLOTS) {
        if (g_fds[at].fd == FD_FREE)
            break;
        if (g_fds[at].fd >= 0 && g_fds[at].fh == fh) {
            fd = g_fds[at].fd;
            break;
        }
    }
    pthread_mutex_unlock(&g_fd_lock);
    return fd;
}

/* Register (fd >= 0) or forget (fd < 0) the descriptor of fh: 0, -ENOSPC when the table is full. */
static int fd_register(uint64_t fh, int fd)
{
    int ret = fd >= 0 ? -ENOSPC : 0;
    int reuse = -1;
    pthread_mutex_lock(&g_fd_lock);
    for (unsigned i = 0, at = fd_hash(fh); i < FD_SLOTS; i++, at = (at + 1) % FD_SLOTS) {
        if (g_fds[at].fd >= 0 && g_fds[at].fh == fh) {
            if (fd >= 0) {
                g_fds[at].fd = fd;
            } else {
                g_fds[at].fd = FD_GONE;
                atomic_fetch_sub(&g_fd_count, 1);
            }
            ret = 0;
            reuse = -2;
            break;
        }
        if (g_fds[at].fd == FD_GONE && reuse == -1)
            reuse = (int)at;
        if (g_fds[at].fd == FD_FREE) {
            if (reuse == -1)
                reuse = (int)at;
            break;
        }
    }
    if (fd >= 0 && reuse >= 0) {
        g_fds[reuse].fh = fh;
        g_fds[reuse].fd = fd;
        atomic_fetch_add(&g_fd_count, 1);
        ret = 0;
    }
    pthread_mutex_unlock(&g_fd_lock);
    return ret;
}

/* The Python C API's GIL functions, when this process has them: a READ served here runs inside pyfuse3's call
 * of fuse_session_process_buf, which holds the GIL; it is released around the disk read and the reply. */
typedef void *(*save_thread_fn)(void);
typedef void (*restore_thread_fn)(void *);
typedef int (*gil_check_fn)(void);
static save_thread_fn py_save_thread;
static restore_thread_fn py_restore_thread;
static gil_check_fn py_gil_check;

static void shim_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    COUNT(read);
    note_max(&g_counters.read_max, size);
    int fd = fd_lookup(fi->fh);
    if (fd < 0) {
        g_inner.read(req, ino, size, off, fi);
        return;
    }
    COUNT(read_native);
    struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
    buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    buf.buf[0].fd = fd;
    buf.buf[0].pos = off;
    void *state = NULL;
    int release = py_gil_check && py_save_thread && py_restore_thread && py_gil_check();
    if (release)
        state = py_save_thread();
    /* fuse_reply_data answers an error of the read itself, and frees the request in every case */
    real_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
    if (release)
        py_restore_thread(state);
}

static void shim_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                           struct fuse_file_info *fi)
{
    size_t size = 0;
    for (size_t i = bufv->idx; i < bufv->count; i++)
        size += bufv->buf[i].size;
    size -= bufv->off;
    COUNT(write);
    ADD(write_bytes, size);
    note_max(&g_counters.write_max, size);
    g_inner.write_buf(req, ino, bufv, off, fi);
}

static void shim_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    COUNT(write);
    ADD(write_bytes, size);
    note_max(&g_counters.write_max, size);
    g_inner.write(req, ino, buf, size, off, fi);
}

EXPORT size_t unionfs_native_counters(struct unionfs_native_counters *out, size_t size);

/* Writes the counters and the connection record as "name value" lines to ``path`` (replaced atomically). */
static int dump_stats(const char *path)
{
    char tmp[4096];
    struct unionfs_native_counters c;
    struct unionfs_native_conn k = g_conn;
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return -ENAMETOOLONG;
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return -errno;
    unionfs_native_counters(&c, sizeof c);
#define C(name) fprintf(f, #name " %llu\n", (unsigned long long)c.name)
#define K(name) fprintf(f, "conn." #name " %u\n", k.name)
    C(session_new); C(session_wrapped); C(init); C(opendir); C(dir_cached); C(dir_untracked); C(reply_open);
    C(reply_err); C(readdir_plain); C(entries_plain); C(read); C(read_max); C(write); C(write_max);
    C(write_bytes); C(readdirplus); C(read_native);
    K(valid); K(proto_major); K(proto_minor); K(capable); K(offered_max_write); K(offered_max_readahead);
    K(offered_max_read); K(want_libfuse); K(want_pyfuse3); K(want); K(max_write); K(max_readahead);
    K(max_background); K(congestion_threshold); K(time_gran);
#undef C
#undef K
    int bad = ferror(f);
    if (fclose(f) != 0 || bad || rename(tmp, path) != 0) {
        unlink(tmp);
        return -EIO;
    }
    return 0;
}

/* UNIONFS_NATIVE_STATS names a file the shim writes its counters to after init and when the session ends (a
 * server's counters, read by whoever started it). */
static void dump_to_environment(void)
{
    const char *path = getenv("UNIONFS_NATIVE_STATS");
    if (path && *path)
        dump_stats(path);
}

/* -- the wrapped libfuse functions --------------------------------------------------------------------------- */

EXPORT struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                             size_t op_size, void *userdata)
{
    COUNT(session_new);
    if (!g_active || op == NULL || op_size != sizeof(struct fuse_lowlevel_ops))
        return real_session_new ? real_session_new(args, op, op_size, userdata) : NULL;
    pending_clear();
    fd_table_clear();
    memcpy(&g_inner, op, sizeof g_inner);
    g_outer = g_inner;
    g_outer.init = shim_init;
    if (g_inner.opendir)
        g_outer.opendir = shim_opendir;
    g_session_rdplus_auto = atomic_load(&g_opt_rdplus_auto) && g_inner.readdirplus && !g_inner.readdir;
    if (g_session_rdplus_auto)
        g_outer.readdir = shim_readdir;
    if (g_inner.readdirplus)
        g_outer.readdirplus = shim_readdirplus;
    if (g_inner.read)
        g_outer.read = shim_read;
    if (g_inner.write)
        g_outer.write = shim_write;
    if (g_inner.write_buf)
        g_outer.write_buf = shim_write_buf;
    memset(&g_conn, 0, sizeof g_conn);
    COUNT(session_wrapped);
    return real_session_new(args, &g_outer, sizeof g_outer, userdata);
}

EXPORT void fuse_session_destroy(struct fuse_session *se)
{
    if (real_session_destroy)
        real_session_destroy(se);
    pending_clear();
    dump_to_environment();
}

EXPORT int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    COUNT(reply_open);
    if (pending_find(req, 1) == KIND_OPENDIR) {
        struct fuse_file_info copy = *fi;
        copy.cache_readdir = 1;
        copy.keep_cache = 1;
        COUNT(dir_cached);
        return real_reply_open(req, &copy);
    }
    return real_reply_open(req, fi);
}

EXPORT int fuse_reply_err(fuse_req_t req, int err)
{
    COUNT(reply_err);
    pending_find(req, 1);
    return real_reply_err(req, err);
}

EXPORT int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size)
{
    pending_find(req, 1);
    return real_reply_buf(req, buf, size);
}

EXPORT size_t fuse_add_direntry_plus(fuse_req_t req, char *buf, size_t bufsize, const char *name,
                                     const struct fuse_entry_param *e, off_t off)
{
    if (pending_find(req, 0) == KIND_PLAIN_READDIR) {
        size_t len = real_add_direntry(req, buf, bufsize, name, &e->attr, off);
        if (len <= bufsize)
            COUNT(entries_plain);
        return len;
    }
    return real_add_direntry_plus(req, buf, bufsize, name, e, off);
}

/* -- what Python calls (ctypes) ----------------------------------------------------------------------------- */

EXPORT const char *unionfs_native_version(void)
{
    static char text[128];
    if (!text[0])
        snprintf(text, sizeof text, "unionfs-native %s (libfuse %d.%d headers, %s at run time)", SHIM_VERSION,
                 FUSE_MAJOR_VERSION, FUSE_MINOR_VERSION, real_pkgversion ? real_pkgversion() : "none");
    return text;
}

EXPORT int unionfs_native_dump(const char *path)
{
    return dump_stats(path);
}

/* Empty when active; else why everything passes through. */
EXPORT const char *unionfs_native_reason(void)
{
    return g_reason;
}

EXPORT int unionfs_native_active(void)
{
    return g_active;
}

EXPORT size_t unionfs_native_counters(struct unionfs_native_counters *out, size_t size)
{
    size_t n = size < sizeof g_counters ? size : sizeof g_counters;
    uint64_t *src = (uint64_t *)&g_counters;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < n / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    return sizeof g_counters;
}

EXPORT size_t unionfs_native_connection(struct unionfs_native_conn *out, size_t size)
{
    memcpy(out, &g_conn, size < sizeof g_conn ? size : sizeof g_conn);
    return sizeof g_conn;
}

/* 0, or -EINVAL for an unknown option. Takes effect at the next fuse_session_new (cached listings: at once). */
EXPORT int unionfs_native_set(int option, int value)
{
    switch (option) {
    case OPT_TUNE_CONN:
        atomic_store(&g_opt_tune, value != 0);
        return 0;
    case OPT_CACHE_DIRS:
        atomic_store(&g_opt_cache_dirs, value != 0);
        return 0;
    case OPT_READDIRPLUS_AUTO:
        atomic_store(&g_opt_rdplus_auto, value != 0);
        return 0;
    default:
        return -EINVAL;
    }
}

EXPORT int unionfs_native_get(int option)
{
    switch (option) {
    case OPT_TUNE_CONN:
        return atomic_load(&g_opt_tune);
    case OPT_CACHE_DIRS:
        return atomic_load(&g_opt_cache_dirs);
    case OPT_READDIRPLUS_AUTO:
        return atomic_load(&g_opt_rdplus_auto);
    default:
        return -EINVAL;
    }
}

/* Serve READ requests on file handle ``fh`` from descriptor ``fd`` (pread, no Python); fd < 0 stops it. The
 * caller keeps fd open until it has unregistered it. 0, or -ENOSPC. */
EXPORT int unionfs_native_set_fd(uint64_t fh, int fd)
{
    return fd_register(fh, fd);
}

/* The PLAIN_READDIR_BIT (Python strips it from the handle of a plain READDIR). */
EXPORT uint64_t unionfs_native_plain_readdir_bit(void)
{
    return PLAIN_READDIR_BIT;
}

/* -- start-up --------------------------------------------------------------------------------------------------- */

static void *lookup(const char *name)
{
    /* The version pyfuse3 binds: RTLD_NEXT finds libfuse's (this library needs libfuse3.so.3, so it is next in
     * this library's scope, whether it was dlopen'ed or preloaded). */
    void *fn = dlvsym(RTLD_NEXT, name, "FUSE_3.0");
    if (fn == NULL && !g_reason[0])
        snprintf(g_reason, sizeof g_reason, "libfuse has no %s@FUSE_3.0", name);
    return fn;
}

/* Options for a server started without Python's help (LD_PRELOAD): UNIONFS_NATIVE_CONFIG=a,b with a, b among
 * notune, cache_dirs, readdirplus_auto. */
static void read_environment(void)
{
    const char *conf = getenv("UNIONFS_NATIVE_CONFIG");
    char word[32];
    while (conf && *conf) {
        size_t n = strcspn(conf, ",");
        if (n < sizeof word) {
            memcpy(word, conf, n);
            word[n] = 0;
            if (strcmp(word, "notune") == 0)
                atomic_store(&g_opt_tune, 0);
            else if (strcmp(word, "cache_dirs") == 0)
                atomic_store(&g_opt_cache_dirs, 1);
            else if (strcmp(word, "readdirplus_auto") == 0)
                atomic_store(&g_opt_rdplus_auto, 1);
        }
        conf += n;
        if (*conf == ',')
            conf++;
    }
}

__attribute__((constructor)) static void shim_start(void)
{
    real_session_new = (session_new_fn)lookup("fuse_session_new");
    real_session_destroy = (session_destroy_fn)lookup("fuse_session_destroy");
    real_reply_open = (reply_open_fn)lookup("fuse_reply_open");
    real_reply_err = (reply_err_fn)lookup("fuse_reply_err");
    real_reply_buf = (reply_buf_fn)lookup("fuse_reply_buf");
    real_add_direntry_plus = (add_direntry_plus_fn)lookup("fuse_add_direntry_plus");
    real_add_direntry = (add_direntry_fn)lookup("fuse_add_direntry");
    real_reply_data = (reply_data_fn)lookup("fuse_reply_data");
    real_version = (version_fn)lookup("fuse_version");
    py_save_thread = (save_thread_fn)dlsym(RTLD_DEFAULT, "PyEval_SaveThread");
    py_restore_thread = (restore_thread_fn)dlsym(RTLD_DEFAULT, "PyEval_RestoreThread");
    py_gil_check = (gil_check_fn)dlsym(RTLD_DEFAULT, "PyGILState_Check");
    fd_table_clear();
    real_pkgversion = (pkgversion_fn)lookup("fuse_pkgversion");
    read_environment();
    if (g_reason[0])
        return;
    /* The operations table and struct fuse_conn_info are those of the headers this was compiled with: a libfuse
     * of another major version, or older than the headers, may lay them out otherwise. */
    int v = real_version();
    if (v / 100 != FUSE_MAJOR_VERSION || v < FUSE_VERSION) {
        snprintf(g_reason, sizeof g_reason, "built for libfuse %d.%d, running with %s", FUSE_MAJOR_VERSION,
                 FUSE_MINOR_VERSION, real_pkgversion());
        return;
    }
    g_active = 1;
}
