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
#include <linux/fuse.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <sched.h>
#include <time.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <linux/openat2.h>
#include <sys/xattr.h>
#include <limits.h>

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
typedef int (*reply_attr_fn)(fuse_req_t, const struct stat *, double);
typedef int (*reply_entry_fn)(fuse_req_t, const struct fuse_entry_param *);
typedef int (*reply_create_fn)(fuse_req_t, const struct fuse_entry_param *, const struct fuse_file_info *);
typedef int (*reply_write_fn)(fuse_req_t, size_t);
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
static reply_attr_fn real_reply_attr;
static reply_entry_fn real_reply_entry;
static reply_create_fn real_reply_create;
static reply_write_fn real_reply_write;
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
    uint64_t xattr_absent;    /* GETXATTR requests answered ENODATA for a name declared absent */
    uint64_t reader_forwarded; /* requests the shim read from the device and gave pyfuse3 (queued, or handed off) */
    uint64_t reader_served;   /* requests it read and answered itself (READ on a registered descriptor, absent
                                 xattr), in the reader thread or, the device handed off, in pyfuse3's */
    uint64_t write_native;    /* WRITE requests served on a registered descriptor, without Python */
    uint64_t fallocate;       /* FALLOCATE requests (all served here: Python has no handler) */
    uint64_t lseek;           /* LSEEK requests (SEEK_DATA, SEEK_HOLE) */
    uint64_t copy_file_range; /* COPY_FILE_RANGE requests */
    uint64_t copy_bytes;      /* bytes copied by them */
    uint64_t data_unregistered; /* requests of the three above on a handle with no registered descriptor */
    uint64_t opendir_enosys;  /* OPENDIR answered ENOSYS (open-less directories: the kernel stops asking) */
    uint64_t dir_openless;    /* READDIR(PLUS) and FSYNCDIR requests of directories opened without OPENDIR */
    uint64_t attr_kept;       /* directory attributes kept (OPT_DIR_ATTRS) */
    uint64_t attr_served;     /* GETATTR requests answered from them */
    uint64_t attr_untracked;  /* changes the table of pending requests could not hold (keeping stopped) */
    uint64_t fsync_native;    /* FSYNC requests served on a registered descriptor (OPT_FSYNC), without Python */
    uint64_t open_native;     /* read-only OPEN requests answered here from a kept recipe (OPT_OPENS) */
    uint64_t open_missed;     /* ... that had a live recipe but went to Python (the file was not what it named) */
    uint64_t release_native;  /* RELEASE requests of handles opened here, answered here */
    uint64_t adopted;         /* handles opened here that the shell took over (unionfs_native_adopt) */
    uint64_t recipes_kept;    /* recipes kept (unionfs_native_openable) */
    uint64_t xattr_checked;   /* GETXATTR requests answered ENODATA after the reader checked the file (a recipe's) */
    uint64_t read_pooled;     /* READ requests (of those served natively) answered by the pool of read threads */
    uint64_t listing_ends;    /* READDIR(PLUS) requests at the known end of an open-less listing, answered empty */
    uint64_t dirs_prefetched; /* layer directories the prefetch threads opened and read (unionfs_native_prefetch) */
    uint64_t handoffs;        /* times the reader let pyfuse3 read the device itself (a run of Python's requests) */
    uint64_t handoff_served;  /* requests pyfuse3's thread read from the device and the shim answered there */
    uint64_t read_spins;      /* small READs in a burst, after which the reader polled for the next request */
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
    OPT_OWN_READER = 4,    /* a thread of the shim reads /dev/fuse and answers data requests itself; default off */
    OPT_DATA_OPS = 5,      /* FALLOCATE, LSEEK and COPY_FILE_RANGE served on registered descriptors; default off */
    OPT_OPENLESS_DIRS = 6, /* OPENDIR answered ENOSYS: no OPENDIR/RELEASEDIR at all, listings cached; default off */
    OPT_DIR_ATTRS = 7,     /* GETATTR of a directory answered from the attributes Python gave last; default off */
    OPT_FSYNC = 8,         /* FSYNC of a handle with a registered descriptor served here; default off */
    OPT_OPENS = 9,         /* read-only OPEN and its RELEASE answered by the reader from recipes; default off */
    OPT_PREFETCH = 10,     /* directories named by unionfs_native_prefetch are read ahead; default off */
};

static struct unionfs_native_counters g_counters;
static struct unionfs_native_conn g_conn;
static atomic_int g_opt_tune = 1;
static atomic_int g_opt_prefetch;
static atomic_int g_opt_cache_dirs;
static atomic_int g_opt_rdplus_auto;
static atomic_int g_opt_own_reader;
static atomic_int g_opt_data_ops;
static atomic_int g_opt_openless;
static atomic_int g_opt_fsync;
static atomic_int g_opt_opens;
/* The open-less setting of the session being created. */
static int g_session_openless;
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
enum { KIND_NONE = 0, KIND_OPENDIR = 1, KIND_PLAIN_READDIR = 2, KIND_ATTR = 3, KIND_CHANGE = 4 };
#define PENDING_SLOTS 1024

static struct {
    fuse_req_t req;
    int kind;
    uint64_t gen; /* KIND_ATTR: the attribute generation at dispatch */
    uint64_t ino; /* KIND_ATTR: the inode a GETATTR asked of */
} g_pending[PENDING_SLOTS];
static atomic_int g_pending_count;
static atomic_int g_changes_pending; /* KIND_CHANGE entries: changes dispatched and not yet replied */
static pthread_mutex_t g_pending_lock = PTHREAD_MUTEX_INITIALIZER;

static int pending_add_attr(fuse_req_t req, int kind, uint64_t gen, uint64_t ino)
{
    int added = 0;
    pthread_mutex_lock(&g_pending_lock);
    for (int i = 0; i < PENDING_SLOTS; i++) {
        if (g_pending[i].req == NULL) {
            g_pending[i].req = req;
            g_pending[i].kind = kind;
            g_pending[i].gen = gen;
            g_pending[i].ino = ino;
            atomic_fetch_add(&g_pending_count, 1);
            added = 1;
            break;
        }
    }
    pthread_mutex_unlock(&g_pending_lock);
    return added;
}

static int pending_add(fuse_req_t req, int kind)
{
    return pending_add_attr(req, kind, 0, 0);
}

/* The kind ``req`` was registered with (KIND_NONE if none), and its gen and ino (when not NULL); ``take``
 * removes it. */
static int pending_get(fuse_req_t req, int take, uint64_t *gen, uint64_t *ino)
{
    int kind = KIND_NONE;
    if (atomic_load(&g_pending_count) == 0)
        return KIND_NONE;
    pthread_mutex_lock(&g_pending_lock);
    for (int i = 0; i < PENDING_SLOTS; i++) {
        if (g_pending[i].req == req) {
            kind = g_pending[i].kind;
            if (gen)
                *gen = g_pending[i].gen;
            if (ino)
                *ino = g_pending[i].ino;
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

static int pending_find(fuse_req_t req, int take)
{
    return pending_get(req, take, NULL, NULL);
}

static void pending_clear(void)
{
    pthread_mutex_lock(&g_pending_lock);
    memset(g_pending, 0, sizeof g_pending);
    atomic_store(&g_pending_count, 0);
    atomic_store(&g_changes_pending, 0);
    pthread_mutex_unlock(&g_pending_lock);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static struct fuse_lowlevel_ops g_inner; /* pyfuse3's handlers */
static struct fuse_lowlevel_ops g_outer; /* what libfuse gets */

/* -- the inode numbers replies show -----------------------------------------------------------------------------
 * Each name of a hard-linked lower file is an inode of its own, so that a change through one name copies up
 * that name alone; all of them show the lower file's number all the same, as on the kernel's overlay. pyfuse3
 * puts the node's number in every reply's st_ino; the shim puts there the number the shell named for that
 * node (unionfs_native_show), where it named one. Few nodes have one: the table is empty nearly always. */
struct shown_slot {
    uint64_t ino; /* 0: a free slot */
    uint64_t shown;
};
static struct shown_slot *g_shown;
static unsigned g_shown_slots, g_shown_used;
static atomic_int g_shown_count;
static pthread_mutex_t g_shown_lock = PTHREAD_MUTEX_INITIALIZER;

static unsigned shown_home(uint64_t ino, unsigned n)
{
    return (unsigned)((ino * UINT64_C(0x9E3779B97F4A7C15)) >> 40) & (n - 1);
}

/* The slot of ``ino`` in ``slots`` (n a power of two), or the free one where it would go. */
static struct shown_slot *shown_at(struct shown_slot *slots, unsigned n, uint64_t ino)
{
    unsigned at = shown_home(ino, n);
    while (slots[at].ino && slots[at].ino != ino)
        at = (at + 1) & (n - 1);
    return &slots[at];
}

/* The number replies show for inode ``ino``: ``ino`` itself unless the shell named another. */
static uint64_t shown_number(uint64_t ino)
{
    uint64_t shown = ino;
    if (atomic_load(&g_shown_count) == 0)
        return ino;
    pthread_mutex_lock(&g_shown_lock);
    if (g_shown != NULL) {
        struct shown_slot *slot = shown_at(g_shown, g_shown_slots, ino);
        if (slot->ino)
            shown = slot->shown;
    }
    pthread_mutex_unlock(&g_shown_lock);
    return shown;
}

/* A new session starts with no numbers named (a spare's server has its parent's table: fork). */
static void shown_clear(void)
{
    pthread_mutex_lock(&g_shown_lock);
    free(g_shown);
    g_shown = NULL;
    g_shown_slots = g_shown_used = 0;
    atomic_store(&g_shown_count, 0);
    pthread_mutex_unlock(&g_shown_lock);
}

/* Empty the slot ``at``, moving back the entries after it that would no longer be found (linear probing). */
static void shown_remove_locked(unsigned at)
{
    unsigned n = g_shown_slots, hole = at, next = at;
    for (;;) {
        next = (next + 1) & (n - 1);
        if (!g_shown[next].ino)
            break;
        unsigned home = shown_home(g_shown[next].ino, n);
        /* (an entry may fill the hole unless its home lies cyclically in (hole, next]) */
        int between = hole <= next ? (home > hole && home <= next) : (home > hole || home <= next);
        if (!between) {
            g_shown[hole] = g_shown[next];
            hole = next;
        }
    }
    g_shown[hole].ino = 0;
    g_shown[hole].shown = 0;
    g_shown_used--;
}

/* Replies show ``shown`` for inode ``ino`` from now on (0 or ``ino``: its own number): 0 or -ENOMEM. */
static int shown_set_locked(uint64_t ino, uint64_t shown)
{
    if (ino == 0)
        return 0;
    if (shown == 0 || shown == ino) {
        if (g_shown != NULL) {
            struct shown_slot *slot = shown_at(g_shown, g_shown_slots, ino);
            if (slot->ino)
                shown_remove_locked((unsigned)(slot - g_shown));
        }
        return 0;
    }
    if ((g_shown_used + 1) * 2 > g_shown_slots) {
        unsigned n = g_shown_slots ? g_shown_slots * 2 : 256;
        struct shown_slot *slots = calloc(n, sizeof *slots);
        if (slots == NULL)
            return -ENOMEM;
        for (unsigned i = 0; i < g_shown_slots; i++)
            if (g_shown[i].ino)
                *shown_at(slots, n, g_shown[i].ino) = g_shown[i];
        free(g_shown);
        g_shown = slots;
        g_shown_slots = n;
    }
    struct shown_slot *slot = shown_at(g_shown, g_shown_slots, ino);
    if (!slot->ino) {
        slot->ino = ino;
        g_shown_used++;
    }
    slot->shown = shown;
    return 0;
}

/* -- attributes of directories, for GETATTR -------------------------------------------------------------------
 *
 * The kernel asks GETATTR of a directory again after each READDIR it could not serve from its cached listing (it
 * drops the directory's atime then): a warm `find` sends one per directory. With OPT_DIR_ATTRS the shim keeps
 * the attributes Python last gave for each directory (a LOOKUP or GETATTR reply, or unionfs_native_dir_attr after
 * Python read the directory's layers) and answers GETATTR from them for as long as Python gave them for. What
 * Python says is only kept while nothing can have changed meanwhile: every request that may change anything
 * (all but the ones that only look: LOOKUP, GETATTR, READLINK, READ, READDIR, GETXATTR, LISTXATTR, STATFS, ACCESS,
 * a read-only OPEN and its RELEASE, FLUSH, FSYNC) ends the generation at its dispatch and again at its reply, and
 * a reply is kept only when the generation it was asked in still holds. A forgotten inode's attributes go. */

#define ATTR_SLOTS 16384u /* a power of two */
#define ATTR_PROBE 8u

struct attr_slot {
    uint64_t ino;
    uint64_t gen;     /* live while equal to g_attr_gen */
    uint64_t expires; /* now_ns() deadline */
    struct fuse_attr attr;
    uint64_t listing_end; /* open-less directory: 1 + the offset a READDIR(PLUS) at the listing's end asks; 0: none */
};

static struct attr_slot *g_attr;
static pthread_mutex_t g_attr_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic uint64_t g_attr_gen = 1;
static atomic_int g_opt_dir_attrs;
/* The dir-attrs setting of the session (and whether it still holds: a change the table could not track ends it). */
static atomic_int g_session_dir_attrs;

static void attr_bump(void)
{
    atomic_fetch_add(&g_attr_gen, 1);
}

static unsigned attr_hash(uint64_t ino)
{
    return (unsigned)((ino * UINT64_C(0x9E3779B97F4A7C15)) >> 40) & (ATTR_SLOTS - 1);
}

static void attr_drop(uint64_t ino)
{
    if (!atomic_load(&g_session_dir_attrs) || g_attr == NULL)
        return;
    pthread_mutex_lock(&g_attr_lock);
    for (unsigned i = 0, at = attr_hash(ino); i < ATTR_PROBE; i++, at = (at + 1) & (ATTR_SLOTS - 1))
        if (g_attr[at].ino == ino)
            g_attr[at].gen = 0;
    pthread_mutex_unlock(&g_attr_lock);
}

static void attr_from_stat(struct fuse_attr *a, const struct stat *st)
{
    memset(a, 0, sizeof *a);
    a->ino = st->st_ino;
    a->mode = st->st_mode;
    a->nlink = (uint32_t)st->st_nlink;
    a->uid = st->st_uid;
    a->gid = st->st_gid;
    a->rdev = (uint32_t)st->st_rdev;
    a->size = (uint64_t)st->st_size;
    a->blksize = (uint32_t)st->st_blksize;
    a->blocks = (uint64_t)st->st_blocks;
    a->atime = (uint64_t)st->st_atim.tv_sec;
    a->mtime = (uint64_t)st->st_mtim.tv_sec;
    a->ctime = (uint64_t)st->st_ctim.tv_sec;
    a->atimensec = (uint32_t)st->st_atim.tv_nsec;
    a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
    a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
}

static void attr_to_stat(struct stat *st, const struct fuse_attr *a)
{
    memset(st, 0, sizeof *st);
    st->st_ino = a->ino;
    st->st_mode = a->mode;
    st->st_nlink = a->nlink;
    st->st_uid = a->uid;
    st->st_gid = a->gid;
    st->st_rdev = a->rdev;
    st->st_size = (off_t)a->size;
    st->st_blksize = a->blksize;
    st->st_blocks = (blkcnt_t)a->blocks;
    st->st_atim.tv_sec = (time_t)a->atime;
    st->st_mtim.tv_sec = (time_t)a->mtime;
    st->st_ctim.tv_sec = (time_t)a->ctime;
    st->st_atim.tv_nsec = a->atimensec;
    st->st_mtim.tv_nsec = a->mtimensec;
    st->st_ctim.tv_nsec = a->ctimensec;
}

/* Keep directory ``ino``'s attributes for ``timeout`` seconds if generation ``gen`` still holds (1: kept);
 * attributes of anything else, or not to be cached, drop what was kept of ``ino``. */
static int attr_put(uint64_t gen, uint64_t ino, const struct fuse_attr *a, double timeout)
{
    if (!atomic_load(&g_session_dir_attrs) || ino == 0)
        return 0;
    if (!S_ISDIR(a->mode) || !(timeout > 0)) {
        attr_drop(ino);
        return 0;
    }
    uint64_t expires = now_ns() + (uint64_t)(timeout < 1e6 ? timeout * 1e9 : 1e15);
    pthread_mutex_lock(&g_attr_lock);
    if (g_attr == NULL)
        g_attr = calloc(ATTR_SLOTS, sizeof *g_attr);
    uint64_t now = atomic_load(&g_attr_gen);
    if (g_attr == NULL || gen != now) {
        pthread_mutex_unlock(&g_attr_lock);
        return 0;
    }
    struct attr_slot *take = NULL;
    unsigned first = attr_hash(ino);
    for (unsigned i = 0, at = first; i < ATTR_PROBE; i++, at = (at + 1) & (ATTR_SLOTS - 1)) {
        struct attr_slot *slot = &g_attr[at];
        if (slot->ino == ino && slot->gen == now) {
            take = slot; /* the one live entry of ino */
            break;
        }
        if (take == NULL && slot->gen != now)
            take = slot;
    }
    if (take == NULL)
        take = &g_attr[first]; /* all live: the first gives way */
    /* no other live entry of ino is left in the window: a live one would have been found first */
    if (take->ino != ino || take->gen != now)
        take->listing_end = 0; /* (an end known in this generation stays known) */
    take->ino = ino;
    take->gen = now;
    take->expires = expires;
    take->attr = *a;
    take->attr.ino = ino;
    pthread_mutex_unlock(&g_attr_lock);
    COUNT(attr_kept);
    return 1;
}

/* The kept attributes of ``ino`` and how many nanoseconds they remain valid; 0 when none are kept. */
/* The live slot of ``ino`` in generation ``now``, or NULL; the caller holds g_attr_lock. */
static struct attr_slot *attr_live_locked(uint64_t ino, uint64_t now)
{
    for (unsigned i = 0, at = attr_hash(ino); i < ATTR_PROBE; i++, at = (at + 1) & (ATTR_SLOTS - 1))
        if (g_attr[at].ino == ino && g_attr[at].gen == now)
            return &g_attr[at];
    return NULL;
}

static uint64_t attr_get(uint64_t ino, struct fuse_attr *out)
{
    if (!atomic_load(&g_session_dir_attrs) || g_attr == NULL)
        return 0;
    uint64_t left = 0;
    uint64_t t = now_ns();
    pthread_mutex_lock(&g_attr_lock);
    struct attr_slot *slot = attr_live_locked(ino, atomic_load(&g_attr_gen));
    if (slot != NULL && slot->expires > t) {
        *out = slot->attr;
        left = slot->expires - t;
    }
    pthread_mutex_unlock(&g_attr_lock);
    return left;
}

/* Python served an open-less directory's listing to its end, as read since generation ``gen``: a READDIR(PLUS) of
 * ``ino`` at ``offset`` (where the kernel goes on after the last entry it had) finds nothing more while nothing may
 * have changed. Kept with the directory's attributes (and gone with them): 1 when kept. */
static int attr_listing_end(uint64_t gen, uint64_t ino, uint64_t offset)
{
    if (!atomic_load(&g_session_dir_attrs) || g_attr == NULL)
        return 0;
    pthread_mutex_lock(&g_attr_lock);
    uint64_t now = atomic_load(&g_attr_gen);
    struct attr_slot *slot = gen == now ? attr_live_locked(ino, now) : NULL;
    if (slot != NULL)
        slot->listing_end = offset + 1;
    pthread_mutex_unlock(&g_attr_lock);
    return slot != NULL;
}

/* Whether a READDIR(PLUS) of ``ino`` at ``offset`` is known to find nothing (attr_listing_end). */
static int attr_listing_ended(uint64_t ino, uint64_t offset)
{
    if (!atomic_load(&g_session_dir_attrs) || g_attr == NULL)
        return 0;
    pthread_mutex_lock(&g_attr_lock);
    struct attr_slot *slot = attr_live_locked(ino, atomic_load(&g_attr_gen));
    int ended = slot != NULL && slot->listing_end == offset + 1;
    pthread_mutex_unlock(&g_attr_lock);
    return ended;
}

static void attr_clear(void)
{
    attr_bump();
    pthread_mutex_lock(&g_attr_lock);
    if (g_attr != NULL)
        memset(g_attr, 0, ATTR_SLOTS * sizeof *g_attr);
    pthread_mutex_unlock(&g_attr_lock);
}

/* A request that may change something was dispatched: the generation ends, and again at its reply. */
static void change_begin(fuse_req_t req)
{
    if (!atomic_load(&g_session_dir_attrs))
        return;
    attr_bump();
    if (pending_add(req, KIND_CHANGE)) {
        atomic_fetch_add(&g_changes_pending, 1);
    } else {
        /* (its reply could not be told from another's: nothing is kept for the rest of the session) */
        atomic_store(&g_session_dir_attrs, 0);
        COUNT(attr_untracked);
    }
}

/* A request that gives attributes (LOOKUP, GETATTR) was dispatched: its reply may be kept. */
static void attr_asked(fuse_req_t req, uint64_t ino)
{
    if (atomic_load(&g_session_dir_attrs))
        pending_add_attr(req, KIND_ATTR, atomic_load(&g_attr_gen), ino);
}

/* Every reply: ends a change; keeps the attributes of a LOOKUP or GETATTR reply (``a``, NULL for other replies;
 * ``ino`` 0: the inode the request named). Returns the kind the request was registered with. */
static int reply_seen(fuse_req_t req, const struct fuse_attr *a, uint64_t ino, double timeout)
{
    if (atomic_load(&g_pending_count) == 0)
        return KIND_NONE;
    uint64_t gen = 0, asked = 0;
    int kind = pending_get(req, 1, &gen, &asked);
    if (kind == KIND_CHANGE) {
        attr_bump();
        atomic_fetch_sub(&g_changes_pending, 1);
    }
    else if (kind == KIND_ATTR && a != NULL)
        attr_put(gen, ino ? ino : asked, a, timeout);
    else if (kind == KIND_ATTR)
        attr_drop(asked); /* (an error: ESTALE, ENOENT of an unlinked node, ...) */
    return kind;
}

/* The wrapped handlers of requests that give attributes, may change something, or forget. */
static void shim_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    attr_asked(req, 0);
    g_inner.lookup(req, parent, name);
}

static void shim_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fuse_attr a;
    uint64_t left = attr_get(ino, &a);
    if (left) {
        struct stat st;
        attr_to_stat(&st, &a);
        COUNT(attr_served);
        real_reply_attr(req, &st, (double)left / 1e9);
        return;
    }
    attr_asked(req, ino);
    g_inner.getattr(req, ino, fi);
}

static void recipe_drop(uint64_t ino);

static void shim_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    attr_drop(ino);
    recipe_drop(ino);
    g_inner.forget(req, ino, nlookup);
}

static void shim_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    for (size_t i = 0; i < count; i++) {
        attr_drop(forgets[i].ino);
        recipe_drop(forgets[i].ino);
    }
    g_inner.forget_multi(req, count, forgets);
}

static void shim_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
    change_begin(req);
    g_inner.setattr(req, ino, attr, to_set, fi);
}

static void shim_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    change_begin(req);
    g_inner.mknod(req, parent, name, mode, rdev);
}

static void shim_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    change_begin(req);
    g_inner.mkdir(req, parent, name, mode);
}

static void shim_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    change_begin(req);
    g_inner.unlink(req, parent, name);
}

static void shim_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    change_begin(req);
    g_inner.rmdir(req, parent, name);
}

static void shim_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name)
{
    change_begin(req);
    g_inner.symlink(req, link, parent, name);
}

static void shim_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                        const char *newname, unsigned int flags)
{
    change_begin(req);
    g_inner.rename(req, parent, name, newparent, newname, flags);
}

static void shim_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname)
{
    change_begin(req);
    g_inner.link(req, ino, newparent, newname);
}

/* An open for writing may copy up (or truncate); one for reading only looks. */
static int opens_to_change(const struct fuse_file_info *fi)
{
    return (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC);
}

static void shim_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (opens_to_change(fi))
        change_begin(req);
    g_inner.open(req, ino, fi);
}

static void shim_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (opens_to_change(fi))
        change_begin(req);
    g_inner.release(req, ino, fi);
}

static void shim_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
    change_begin(req);
    g_inner.create(req, parent, name, mode, fi);
}

static void shim_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
    change_begin(req);
    g_inner.removexattr(req, ino, name);
}

/* -- the operations table ------------------------------------------------------------------------------------ */


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

/* With open-less directories the first OPENDIR is answered ENOSYS: the kernel then opens every directory of the
 * connection itself, with keep_cache and cache_readdir (its defaults without OPENDIR), never sends OPENDIR or
 * RELEASEDIR again, and sends fh 0 in READDIR(PLUS) and FSYNCDIR, for which the handlers below pass the inode
 * number instead (dir_handle). Access was checked by the kernel (default_permissions). */
static void shim_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    COUNT(opendir);
    if (g_session_openless) {
        COUNT(opendir_enosys);
        real_reply_err(req, ENOSYS);
        return;
    }
    if (atomic_load(&g_opt_cache_dirs) && !pending_add(req, KIND_OPENDIR))
        COUNT(dir_untracked);
    g_inner.opendir(req, ino, fi);
}

/* The handle Python gets for a directory request: in a session with open-less directories (where the kernel
 * sends fh 0 for every directory: it never sent an OPENDIR Python answered), the directory's inode number. */
static uint64_t dir_handle(fuse_ino_t ino, const struct fuse_file_info *fi)
{
    if (g_session_openless) {
        COUNT(dir_openless);
        return (uint64_t)ino;
    }
    return fi->fh;
}

/* A plain READDIR: pyfuse3's readdirplus handler fills the buffer, fuse_add_direntry_plus writes plain entries
 * for it, and the file handle Python sees carries PLAIN_READDIR_BIT (the kernel takes no lookup reference for
 * plain entries: Python must not count one; inode numbers are below that bit). */
static void shim_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    struct fuse_file_info copy = *fi;
    copy.fh = dir_handle(ino, fi);
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
    struct fuse_file_info copy = *fi;
    copy.fh = dir_handle(ino, fi);
    COUNT(readdirplus);
    g_inner.readdirplus(req, ino, size, off, &copy);
}

static void shim_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    struct fuse_file_info copy = *fi;
    copy.fh = dir_handle(ino, fi);
    g_inner.fsyncdir(req, ino, datasync, &copy);
}

/* -- extended attribute names no file of the mount has (declared by the shell) ----------------------------- */

#define ABSENT_SLOTS 8
#define ABSENT_NAME 64
static char g_absent[ABSENT_SLOTS][ABSENT_NAME];
static atomic_int g_absent_count;
static pthread_mutex_t g_absent_lock = PTHREAD_MUTEX_INITIALIZER;

static int absent_has(const char *name)
{
    int found = 0;
    if (atomic_load(&g_absent_count) == 0)
        return 0;
    pthread_mutex_lock(&g_absent_lock);
    for (int i = 0; i < ABSENT_SLOTS && !found; i++)
        found = g_absent[i][0] && strcmp(g_absent[i], name) == 0;
    pthread_mutex_unlock(&g_absent_lock);
    return found;
}

/* 0; -ENOSPC when the table is full; -ENAMETOOLONG. */
static int absent_set(const char *name, int absent)
{
    int ret = absent ? -ENOSPC : 0;
    if (strlen(name) >= ABSENT_NAME || !name[0])
        return -ENAMETOOLONG;
    pthread_mutex_lock(&g_absent_lock);
    for (int i = 0; i < ABSENT_SLOTS; i++) {
        if (g_absent[i][0] && strcmp(g_absent[i], name) == 0) {
            if (!absent) {
                g_absent[i][0] = 0;
                atomic_fetch_sub(&g_absent_count, 1);
            }
            ret = 0;
            goto out;
        }
    }
    for (int i = 0; absent && i < ABSENT_SLOTS; i++) {
        if (!g_absent[i][0]) {
            memcpy(g_absent[i], name, strlen(name) + 1);
            atomic_fetch_add(&g_absent_count, 1);
            ret = 0;
            break;
        }
    }
out:
    pthread_mutex_unlock(&g_absent_lock);
    return ret;
}

/* -- extended attribute names one inode lacks (told by the shell when it found them missing) ---------------- */

/* inode -> a bit per name of g_obj_names, open addressing (no removal: the shell empties the table at every change
 * that may give an object an xattr, as its own memory is forgotten then). */
#define OBJ_NAMES 8
#define OBJ_SLOTS_MIN 1024
#define OBJ_MAX (1u << 20)
struct obj_slot {
    uint64_t ino;
    uint32_t names; /* 0: a free slot */
};
static char g_obj_names[OBJ_NAMES][ABSENT_NAME];
static struct obj_slot *g_obj;
static unsigned g_obj_slots, g_obj_used;
static atomic_int g_obj_count;
static pthread_mutex_t g_obj_lock = PTHREAD_MUTEX_INITIALIZER;

static void obj_clear_locked(void)
{
    free(g_obj);
    g_obj = NULL;
    g_obj_slots = g_obj_used = 0;
    atomic_store(&g_obj_count, 0);
}

static void obj_clear(void)
{
    if (atomic_load(&g_obj_count) == 0)
        return;
    pthread_mutex_lock(&g_obj_lock);
    obj_clear_locked();
    pthread_mutex_unlock(&g_obj_lock);
}

/* The slot of ``ino`` in ``slots`` (n a power of two), or the free one where it would go. */
static struct obj_slot *obj_at(struct obj_slot *slots, unsigned n, uint64_t ino)
{
    unsigned at = (unsigned)((ino * UINT64_C(0x9E3779B97F4A7C15)) >> 40) & (n - 1);
    while (slots[at].names && slots[at].ino != ino)
        at = (at + 1) & (n - 1);
    return &slots[at];
}

/* The bit of ``name`` (added when ``add``), 0 when it has none. The caller holds g_obj_lock. */
static uint32_t obj_name_bit_locked(const char *name, int add)
{
    for (int i = 0; i < OBJ_NAMES; i++)
        if (g_obj_names[i][0] && strcmp(g_obj_names[i], name) == 0)
            return 1u << i;
    if (!add || strlen(name) >= ABSENT_NAME || !name[0])
        return 0;
    for (int i = 0; i < OBJ_NAMES; i++) {
        if (!g_obj_names[i][0]) {
            memcpy(g_obj_names[i], name, strlen(name) + 1);
            return 1u << i;
        }
    }
    return 0;
}

static int obj_absent(uint64_t ino, const char *name)
{
    int found = 0;
    if (atomic_load(&g_obj_count) == 0)
        return 0;
    pthread_mutex_lock(&g_obj_lock);
    uint32_t bit = obj_name_bit_locked(name, 0);
    if (bit && g_obj != NULL)
        found = (obj_at(g_obj, g_obj_slots, ino)->names & bit) != 0;
    pthread_mutex_unlock(&g_obj_lock);
    return found;
}

/* ``ino`` has no xattr ``name``: 0, or -ENOSPC (more names than OBJ_NAMES), -ENOMEM. */
static int obj_set_absent(uint64_t ino, const char *name)
{
    int ret = 0;
    pthread_mutex_lock(&g_obj_lock);
    uint32_t bit = obj_name_bit_locked(name, 1);
    if (!bit) {
        ret = -ENOSPC;
        goto out;
    }
    if (g_obj_used >= OBJ_MAX)
        obj_clear_locked();
    if ((g_obj_used + 1) * 4 > g_obj_slots * 3) {
        unsigned n = g_obj_slots ? g_obj_slots * 2 : OBJ_SLOTS_MIN;
        struct obj_slot *slots = calloc(n, sizeof *slots);
        if (slots == NULL) {
            ret = -ENOMEM;
            goto out;
        }
        for (unsigned i = 0; i < g_obj_slots; i++)
            if (g_obj[i].names)
                *obj_at(slots, n, g_obj[i].ino) = g_obj[i];
        free(g_obj);
        g_obj = slots;
        g_obj_slots = n;
    }
    struct obj_slot *slot = obj_at(g_obj, g_obj_slots, ino);
    if (!slot->names) {
        slot->ino = ino;
        g_obj_used++;
        atomic_store(&g_obj_count, (int)g_obj_used);
    }
    slot->names |= bit;
out:
    pthread_mutex_unlock(&g_obj_lock);
    return ret;
}

static int recipe_lacks_xattr(uint64_t ino, const char *name);

static void shim_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    if (absent_has(name) || obj_absent(ino, name)) {
        COUNT(xattr_absent);
        real_reply_err(req, ENODATA);
        return;
    }
    if (recipe_lacks_xattr(ino, name)) {
        COUNT(xattr_checked);
        real_reply_err(req, ENODATA);
        return;
    }
    g_inner.getxattr(req, ino, name, size);
}

/* A name set through the mount is no longer absent: the shim stops answering for it before Python sets it. */
static void shim_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size,
                          int flags)
{
    change_begin(req);
    if (absent_has(name))
        absent_set(name, 0);
    obj_clear();
    g_inner.setxattr(req, ino, name, value, size, flags);
}

/* -- descriptors the shell registered for its file handles (the data path: READ and WRITE) ------------------ */

/* fh -> descriptor and what it serves (FD_READ, FD_WRITE), open addressing; a removed slot keeps FD_GONE so
 * that probing goes on past it. The table doubles (and drops its FD_GONE slots) when three quarters of it are in
 * use, so every handle the shell opens can be registered. */
#define FD_SLOTS_MIN 4096
#define FD_FREE (-1)
#define FD_GONE (-2)
#define FD_READ 1
#define FD_WRITE 2
#define FD_HERE 4 /* opened by the reader (native opens): closed by it at RELEASE unless adopted */
#define FD_DIRECT 8 /* a handle opened with FOPEN_DIRECT_IO: its WRITEs drop privileges here (direct_write_kill) */
struct fd_slot {
    uint64_t fh;
    uint64_t ino;  /* FD_HERE: the inode it was opened for */
    int fd;
    int modes;
    unsigned layer; /* FD_HERE: the layer it is a file of */
};
static struct fd_slot g_fds_initial[FD_SLOTS_MIN];
static struct fd_slot *g_fds = g_fds_initial;
static unsigned g_fd_slots = FD_SLOTS_MIN;
static unsigned g_fd_used; /* slots not FD_FREE (FD_GONE included) */
static atomic_int g_fd_count;
static atomic_int g_native_open_count; /* FD_HERE slots: handles opened here, not yet released nor adopted */
static pthread_mutex_t g_fd_lock = PTHREAD_MUTEX_INITIALIZER;

static void fd_slots_clear(struct fd_slot *slots, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        slots[i].fh = 0;
        slots[i].ino = 0;
        slots[i].fd = FD_FREE;
        slots[i].modes = 0;
        slots[i].layer = 0;
    }
}

static void fd_table_clear(void)
{
    pthread_mutex_lock(&g_fd_lock);
    for (unsigned i = 0; i < g_fd_slots; i++)
        if (g_fds[i].fd >= 0 && (g_fds[i].modes & FD_HERE))
            close(g_fds[i].fd); /* (opened by the reader for a session that ended) */
    atomic_store(&g_native_open_count, 0);
    if (g_fds != g_fds_initial)
        free(g_fds);
    g_fds = g_fds_initial;
    g_fd_slots = FD_SLOTS_MIN;
    fd_slots_clear(g_fds, g_fd_slots);
    g_fd_used = 0;
    atomic_store(&g_fd_count, 0);
    pthread_mutex_unlock(&g_fd_lock);
}

static unsigned fd_hash(uint64_t fh, unsigned slots)
{
    return (unsigned)((fh * UINT64_C(0x9E3779B97F4A7C15)) >> 32) % slots;
}

/* The live slot of fh, or NULL; the caller holds g_fd_lock. */
static struct fd_slot *fd_slot_locked(uint64_t fh)
{
    for (unsigned i = 0, at = fd_hash(fh, g_fd_slots); i < g_fd_slots; i++, at = (at + 1) % g_fd_slots) {
        if (g_fds[at].fd == FD_FREE)
            return NULL;
        if (g_fds[at].fd >= 0 && g_fds[at].fh == fh)
            return &g_fds[at];
    }
    return NULL;
}

/* The descriptor registered for fh serving ``mode``, or -1; the caller holds g_fd_lock. */
static int fd_find_locked(uint64_t fh, int mode)
{
    for (unsigned i = 0, at = fd_hash(fh, g_fd_slots); i < g_fd_slots; i++, at = (at + 1) % g_fd_slots) {
        if (g_fds[at].fd == FD_FREE)
            return -1;
        if (g_fds[at].fd >= 0 && g_fds[at].fh == fh)
            return (g_fds[at].modes & mode) ? g_fds[at].fd : -1;
    }
    return -1;
}

/* Put a copy of ``from`` in a free slot of ``slots`` (known to have one). */
static void fd_place(struct fd_slot *slots, unsigned n, const struct fd_slot *from)
{
    unsigned at = fd_hash(from->fh, n);
    while (slots[at].fd != FD_FREE)
        at = (at + 1) % n;
    slots[at] = *from;
}

/* Make room for one more registration: a table at three quarters is rebuilt, twice as large when the live
 * entries need it. 0, or -ENOMEM (the table stays as it was). The caller holds g_fd_lock. */
static int fd_room_locked(void)
{
    if ((g_fd_used + 1) * 4 <= g_fd_slots * 3)
        return 0;
    unsigned live = (unsigned)atomic_load(&g_fd_count);
    unsigned n = (live + 1) * 2 <= g_fd_slots ? g_fd_slots : g_fd_slots * 2;
    struct fd_slot *slots = malloc(sizeof *slots * n);
    if (slots == NULL)
        return -ENOMEM;
    fd_slots_clear(slots, n);
    for (unsigned i = 0; i < g_fd_slots; i++)
        if (g_fds[i].fd >= 0)
            fd_place(slots, n, &g_fds[i]);
    if (g_fds != g_fds_initial)
        free(g_fds);
    g_fds = slots;
    g_fd_slots = n;
    g_fd_used = live;
    return 0;
}

/* Register (fd >= 0, modes != 0) or forget (fd < 0) the descriptor of fh: 0, or -ENOMEM. The caller holds
 * g_fd_lock. A new registration names ``ino`` and ``layer`` (kept by a registration again). */
static int fd_register_locked(uint64_t fh, int fd, int modes, uint64_t ino, unsigned layer)
{
    int ret = 0;
    if (fd >= 0 && modes == 0)
        fd = -1;
    for (unsigned i = 0, at = fd_hash(fh, g_fd_slots); i < g_fd_slots; i++, at = (at + 1) % g_fd_slots) {
        if (g_fds[at].fd == FD_FREE)
            break;
        if (g_fds[at].fd >= 0 && g_fds[at].fh == fh) {
            if (fd >= 0) {
                g_fds[at].fd = fd;
                g_fds[at].modes = modes;
            } else {
                g_fds[at].fd = FD_GONE;
                g_fds[at].modes = 0;
                atomic_fetch_sub(&g_fd_count, 1);
            }
            return 0;
        }
    }
    if (fd >= 0) {
        ret = fd_room_locked();
        if (ret == 0) {
            unsigned at = fd_hash(fh, g_fd_slots);
            while (g_fds[at].fd >= 0) /* a FD_GONE slot is reused */
                at = (at + 1) % g_fd_slots;
            if (g_fds[at].fd == FD_FREE)
                g_fd_used++;
            g_fds[at].fh = fh;
            g_fds[at].ino = ino;
            g_fds[at].fd = fd;
            g_fds[at].modes = modes;
            g_fds[at].layer = layer;
            atomic_fetch_add(&g_fd_count, 1);
        }
    }
    return ret;
}

static int fd_register(uint64_t fh, int fd, int modes)
{
    pthread_mutex_lock(&g_fd_lock);
    int ret = fd_register_locked(fh, fd, modes, 0, 0);
    pthread_mutex_unlock(&g_fd_lock);
    return ret;
}

/* -- read-only opens answered by the reader (OPT_OPENS) ------------------------------------------------------ *
 *
 * For an inode it hands the kernel (a LOOKUP reply, a READDIRPLUS entry, a read-only open), Python may say where
 * its file is, as of an attribute generation: a layer, the path beneath the layer's directory, and the file's
 * device and inode number (a recipe; unionfs_native_openable). Python gives one only when opening the inode
 * read-only needs no decision of its own but that place (the kernel checked access: default_permissions). While
 * that generation holds (nothing that may change anything was asked since: the rule directory attributes keep),
 * the reader answers a read-only OPEN of the inode itself: it opens the path beneath the layer's directory without
 * following symlinks, checks that what it opened is the file named, registers the descriptor for the data
 * requests under a handle of its own (NATIVE_FH_BIT) and replies as Python would (keep_cache); it answers that
 * handle's RELEASE by closing it. Anything else goes to Python, whose answer is the same. A handle the shell must
 * know of (its file was copied up: it must read the copy; its file was unlinked: its attributes are reached
 * through it) is taken over by the shell (unionfs_native_adopt): its RELEASE goes to Python from then on.
 * Checking the generation and registering the handle happen under g_fd_lock, which adopting takes too: a handle
 * opened on a recipe that a change then ended is always registered by the time the shell, after that change,
 * takes over the inode's handles. The recipes have a lock of their own (taken after g_fd_lock, never before),
 * so that naming files does not wait for a read the reader makes under g_fd_lock. */
#define NATIVE_FH_BIT (UINT64_C(1) << 62)
#define RECIPE_SLOTS 65536u /* a power of two */
#define RECIPE_PROBE 8u
/* The kernel's O_LARGEFILE, which every open on a 64-bit system carries (the C library's is 0 there). */
#if defined(__aarch64__) || defined(__arm__)
#define KERNEL_O_LARGEFILE 0400000
#elif defined(__powerpc__)
#define KERNEL_O_LARGEFILE 0200000
#else
#define KERNEL_O_LARGEFILE 0100000
#endif
/* the OPEN flags a recipe serves: a read-only open without O_TRUNC, O_DIRECT, O_SYNC, ... (__FMODE_EXEC: 0x20) */
#define RECIPE_OPEN_FLAGS                                                                                            \
    (O_ACCMODE | KERNEL_O_LARGEFILE | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOATIME | O_NOCTTY | 0x20)

struct recipe {
    uint64_t ino;
    uint64_t gen; /* live while equal to g_attr_gen */
    uint64_t dev, st_ino;
    unsigned layer;
    char *path;
};

/* Under g_recipe_lock. */
static struct recipe *g_recipes;
static int *g_layer_fds;
static unsigned g_layer_count;
static pthread_mutex_t g_recipe_lock = PTHREAD_MUTEX_INITIALIZER;
/* Under g_fd_lock. */
static uint64_t g_native_fh_next;
/* The native-opens setting of the session (it needs directory attributes' change tracking). */
static atomic_int g_session_opens;

static unsigned recipe_hash(uint64_t ino)
{
    return (unsigned)((ino * UINT64_C(0x9E3779B97F4A7C15)) >> 40) & (RECIPE_SLOTS - 1);
}

static void recipes_clear_locked(void)
{
    if (g_recipes == NULL)
        return;
    for (unsigned i = 0; i < RECIPE_SLOTS; i++)
        free(g_recipes[i].path);
    memset(g_recipes, 0, RECIPE_SLOTS * sizeof *g_recipes);
}

/* The live recipe of ``ino``, or NULL; the caller holds g_recipe_lock. */
static struct recipe *recipe_find_locked(uint64_t ino)
{
    if (g_recipes == NULL)
        return NULL;
    uint64_t now = atomic_load(&g_attr_gen);
    for (unsigned i = 0, at = recipe_hash(ino); i < RECIPE_PROBE; i++, at = (at + 1) & (RECIPE_SLOTS - 1))
        if (g_recipes[at].ino == ino && g_recipes[at].gen == now)
            return &g_recipes[at];
    return NULL;
}

/* Keep the recipe of ``ino`` if generation ``gen`` still holds: 1 when kept. */
static int recipe_put(uint64_t gen, uint64_t ino, uint64_t dev, uint64_t st_ino, unsigned layer, const char *path)
{
    /* (not while a change is under way: what was named may be what it changes, before its reply ends the
     * generation) */
    if (!atomic_load(&g_session_opens) || !atomic_load(&g_session_dir_attrs) || ino == 0 ||
        atomic_load(&g_changes_pending) > 0)
        return 0;
    size_t len = strlen(path);
    if (len == 0 || len >= PATH_MAX)
        return 0;
    char *copy = malloc(len + 1);
    if (copy == NULL)
        return 0;
    memcpy(copy, path, len + 1);
    pthread_mutex_lock(&g_recipe_lock);
    if (g_recipes == NULL)
        g_recipes = calloc(RECIPE_SLOTS, sizeof *g_recipes);
    uint64_t now = atomic_load(&g_attr_gen);
    if (g_recipes == NULL || gen != now || layer >= g_layer_count) {
        pthread_mutex_unlock(&g_recipe_lock);
        free(copy);
        return 0;
    }
    struct recipe *take = NULL;
    unsigned first = recipe_hash(ino);
    for (unsigned i = 0, at = first; i < RECIPE_PROBE; i++, at = (at + 1) & (RECIPE_SLOTS - 1)) {
        struct recipe *r = &g_recipes[at];
        if (r->ino == ino && r->gen == now) {
            take = r;
            break;
        }
        if (take == NULL && r->gen != now)
            take = r;
    }
    if (take == NULL)
        take = &g_recipes[first]; /* all live: the first gives way */
    free(take->path);
    take->ino = ino;
    take->gen = now;
    take->dev = dev;
    take->st_ino = st_ino;
    take->layer = layer;
    take->path = copy;
    pthread_mutex_unlock(&g_recipe_lock);
    COUNT(recipes_kept);
    return 1;
}

/* A forgotten inode's recipe goes (its number may come back for another object). */
static void recipe_drop(uint64_t ino)
{
    pthread_mutex_lock(&g_recipe_lock);
    if (g_recipes != NULL)
        for (unsigned i = 0, at = recipe_hash(ino); i < RECIPE_PROBE; i++, at = (at + 1) & (RECIPE_SLOTS - 1))
            if (g_recipes[at].ino == ino) {
                g_recipes[at].gen = 0; /* (never found again: the generation is never 0) */
                free(g_recipes[at].path);
                g_recipes[at].path = NULL;
            }
    pthread_mutex_unlock(&g_recipe_lock);
}

static int rx_devfd(void);

/* Open ``path`` beneath the layer directory ``dirfd`` with ``flags`` (following no symlink) and check that it is
 * the regular file a recipe named by device and inode number: the descriptor, or -1 (nothing left open). */
static int recipe_file(int dirfd, const char *path, uint64_t flags, uint64_t dev, uint64_t st_ino)
{
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = flags | O_CLOEXEC | O_NOFOLLOW;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    int fd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    struct stat st;
    if (fd >= 0 && !(fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_dev == dev &&
                     (uint64_t)st.st_ino == st_ino)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* -- reading ahead the directories a listing names ------------------------------------------------------------
 *
 * A cold `find` waits at the disk for each directory of each layer in turn, since Python reads a directory's
 * layers only when the kernel asks for its listing. After Python merged a listing it names the directories its
 * subdirectories are made of (unionfs_native_prefetch: a layer and a path beneath it, as recipes do); two threads
 * open each (beneath the layer's directory, no symbolic link followed, O_NOATIME: the layer shows no access the
 * client did not make, and a directory that cannot be opened so is skipped; nor one on another mount), read its
 * entries and stat up to PF_STATS of them, so that their blocks are in the cache when the kernel asks. Advisory only: a full queue drops
 * paths, a failure is ignored, nothing is kept but the kernel's caches. With OPT_PREFETCH (at once). */
#define PF_QUEUE 4096
#define PF_THREADS 2
#define PF_STATS 256

static struct {
    pthread_mutex_t lock;
    pthread_cond_t ready;
    struct {
        unsigned layer;
        char *path;
    } queue[PF_QUEUE];
    unsigned head, count;
    int threads;
    int stopping;
    pthread_t thread[PF_THREADS];
} g_pf = {.lock = PTHREAD_MUTEX_INITIALIZER, .ready = PTHREAD_COND_INITIALIZER};
static atomic_int g_pf_stop; /* pf_stop: a thread leaves the directory it is reading */

struct pf_dirent {
    uint64_t ino;
    int64_t off;
    unsigned short reclen;
    unsigned char type;
    char name[];
};

static void pf_read(unsigned layer, const char *path)
{
    pthread_mutex_lock(&g_recipe_lock);
    int dirfd = layer < g_layer_count ? fcntl(g_layer_fds[layer], F_DUPFD_CLOEXEC, 3) : -1;
    pthread_mutex_unlock(&g_recipe_lock);
    if (dirfd < 0)
        return;
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_NOATIME | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV;
    int fd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    close(dirfd);
    if (fd < 0)
        return;
    COUNT(dirs_prefetched);
    static __thread char buf[32768];
    unsigned stats = 0;
    long n;
    while (!atomic_load(&g_pf_stop) && (n = syscall(SYS_getdents64, fd, buf, sizeof buf)) > 0) {
        for (long at = 0; at < n && !atomic_load(&g_pf_stop);) {
            const struct pf_dirent *d = (const struct pf_dirent *)(buf + at);
            at += d->reclen;
            if (stats < PF_STATS && strcmp(d->name, ".") != 0 && strcmp(d->name, "..") != 0) {
                struct stat st;
                (void)fstatat(fd, d->name, &st, AT_SYMLINK_NOFOLLOW);
                stats++;
            }
        }
    }
    close(fd);
}

static void *pf_main(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&g_pf.lock);
    for (;;) {
        while (g_pf.count == 0 && !g_pf.stopping)
            pthread_cond_wait(&g_pf.ready, &g_pf.lock);
        if (g_pf.stopping)
            break;
        unsigned layer = g_pf.queue[g_pf.head].layer;
        char *path = g_pf.queue[g_pf.head].path;
        g_pf.head = (g_pf.head + 1) % PF_QUEUE;
        g_pf.count--;
        pthread_mutex_unlock(&g_pf.lock);
        pf_read(layer, path);
        free(path);
        pthread_mutex_lock(&g_pf.lock);
    }
    pthread_mutex_unlock(&g_pf.lock);
    return NULL;
}

/* Queue (the caller holds g_pf.lock) one path, starting the threads first if need be: 1 when queued. */
static int pf_queue_locked(unsigned layer, const char *path, size_t len)
{
    if (g_pf.stopping || g_pf.count == PF_QUEUE)
        return 0;
    while (g_pf.threads < PF_THREADS && pthread_create(&g_pf.thread[g_pf.threads], NULL, pf_main, NULL) == 0)
        g_pf.threads++;
    if (g_pf.threads == 0)
        return 0;
    char *copy = malloc(len + 1);
    if (copy == NULL)
        return 0;
    memcpy(copy, path, len);
    copy[len] = 0;
    unsigned at = (g_pf.head + g_pf.count) % PF_QUEUE;
    g_pf.queue[at].layer = layer;
    g_pf.queue[at].path = copy;
    g_pf.count++;
    pthread_cond_signal(&g_pf.ready);
    return 1;
}

/* Drop what is queued (the caller holds g_pf.lock). */
static void pf_drop_queued_locked(void)
{
    for (; g_pf.count > 0; g_pf.count--, g_pf.head = (g_pf.head + 1) % PF_QUEUE)
        free(g_pf.queue[g_pf.head].path);
}

/* The threads end (what is queued is dropped); a later prefetch starts them again. */
static void pf_stop(void)
{
    atomic_store(&g_pf_stop, 1);
    pthread_mutex_lock(&g_pf.lock);
    g_pf.stopping = 1;
    pthread_cond_broadcast(&g_pf.ready);
    pthread_mutex_unlock(&g_pf.lock);
    for (int i = 0; i < g_pf.threads; i++)
        pthread_join(g_pf.thread[i], NULL);
    pthread_mutex_lock(&g_pf.lock);
    pf_drop_queued_locked();
    g_pf.threads = 0;
    g_pf.stopping = 0;
    atomic_store(&g_pf_stop, 0);
    pthread_mutex_unlock(&g_pf.lock);
}

/* A forked child has none of the parent's threads. (The forking thread holds the lock: rx_before_fork.) */
static void pf_after_fork_child(void)
{
    pf_drop_queued_locked(); /* (before the unlock: the child is alone, but the order stays the rule's) */
    pthread_mutex_unlock(&g_pf.lock);
    pthread_cond_init(&g_pf.ready, NULL);
    g_pf.threads = 0;
    g_pf.stopping = 0;
    atomic_store(&g_pf_stop, 0);
}

/* Answer a read-only OPEN (``unique``) of ``ino`` with ``flags`` from its live recipe: open the file, register it
 * under a new handle and reply, all under g_fd_lock (the handle cannot be taken over before the kernel has it). 1
 * when answered, 0 when not (no live recipe, the open failed, or it is not the file the recipe named). */
static int recipe_open(uint64_t ino, uint32_t flags, uint64_t unique)
{
    if ((flags & O_ACCMODE) != O_RDONLY || (flags & ~(uint32_t)RECIPE_OPEN_FLAGS))
        return 0;
    char path[PATH_MAX];
    uint64_t dev = 0, st_ino = 0;
    unsigned layer = 0;
    int dirfd = -1;
    pthread_mutex_lock(&g_fd_lock); /* (held from the generation's check to the reply) */
    pthread_mutex_lock(&g_recipe_lock);
    struct recipe *r = recipe_find_locked(ino);
    if (r != NULL) {
        memcpy(path, r->path, strlen(r->path) + 1);
        dev = r->dev;
        st_ino = r->st_ino;
        layer = r->layer;
        dirfd = g_layer_fds[layer];
    }
    pthread_mutex_unlock(&g_recipe_lock);
    if (dirfd < 0) {
        pthread_mutex_unlock(&g_fd_lock);
        return 0;
    }
    uint64_t fh = 0;
    /* (O_NONBLOCK until it is known to be the regular file named: a FIFO put there must not block the reader) */
    int fd = recipe_file(dirfd, path, (uint64_t)(O_RDONLY | O_NOCTTY | O_NONBLOCK | (int)(flags & O_NOATIME)), dev,
                         st_ino);
    if (fd >= 0 && ((flags & O_NONBLOCK) || fcntl(fd, F_SETFL, 0) == 0)) {
        uint64_t candidate = NATIVE_FH_BIT | ++g_native_fh_next;
        if (fd_register_locked(candidate, fd, FD_READ | FD_HERE, ino, layer) == 0)
            fh = candidate;
    }
    if (fh == 0) {
        pthread_mutex_unlock(&g_fd_lock);
        COUNT(open_missed);
        if (fd >= 0)
            close(fd);
        return 0;
    }
    struct {
        struct fuse_out_header head;
        struct fuse_open_out body;
    } out;
    memset(&out, 0, sizeof out);
    out.head.len = sizeof out;
    out.head.unique = unique;
    out.body.fh = fh;
    out.body.open_flags = FOPEN_KEEP_CACHE;
    ssize_t n;
    while ((n = write(rx_devfd(), &out, sizeof out)) < 0 && errno == EINTR) {
    }
    if (n < 0) { /* (ENOENT: the open was interrupted, the kernel has no use for the handle) */
        fd_register_locked(fh, -1, 0, 0, 0);
        pthread_mutex_unlock(&g_fd_lock);
        close(fd);
        return 1;
    }
    atomic_fetch_add(&g_native_open_count, 1);
    pthread_mutex_unlock(&g_fd_lock);
    COUNT(open_native);
    return 1;
}

/* Unregister handle ``fh`` if it is one the reader opened and still owns: its descriptor (for the caller to
 * close), or -1. */
static int recipe_release(uint64_t fh)
{
    if (!(fh & NATIVE_FH_BIT) || atomic_load(&g_native_open_count) == 0)
        return -1;
    int fd = -1;
    pthread_mutex_lock(&g_fd_lock);
    struct fd_slot *slot = fd_slot_locked(fh);
    if (slot != NULL && (slot->modes & FD_HERE)) {
        fd = slot->fd;
        slot->fd = FD_GONE;
        slot->modes = 0;
        atomic_fetch_sub(&g_fd_count, 1);
        atomic_fetch_sub(&g_native_open_count, 1);
    }
    pthread_mutex_unlock(&g_fd_lock);
    return fd;
}

/* -- xattrs a file lacks, checked on the file its recipe names ---------------------------------------------- *
 *
 * For a name the shell declared checkable (unionfs_native_checkable_xattr: the names on disk whose absence from a
 * regular file means the merged file lacks it, as the union decides), the reader answers the first GETXATTR of an
 * inode with a live recipe itself: it opens the recipe's file (O_PATH, beneath the layer, no symlinks), checks it
 * is the file named, and answers ENODATA when the file has none of those names; anything else goes to Python,
 * whose answer that is. The inode is then remembered as lacking the name (as when Python tells it), unless the
 * generation ended meanwhile. */
#define CHECKABLE_SLOTS 8
#define CHECKABLE_DISK 2
struct checkable {
    char name[ABSENT_NAME];
    char disk[CHECKABLE_DISK][ABSENT_NAME + 32];
};
static struct checkable g_checkable[CHECKABLE_SLOTS];
static atomic_int g_checkable_count;
static pthread_mutex_t g_checkable_lock = PTHREAD_MUTEX_INITIALIZER;

/* Copy the on-disk names of checkable ``name`` to ``disk``: 1, or 0 when it is not checkable. */
static int checkable_find(const char *name, char disk[CHECKABLE_DISK][ABSENT_NAME + 32])
{
    int found = 0;
    if (atomic_load(&g_checkable_count) == 0)
        return 0;
    pthread_mutex_lock(&g_checkable_lock);
    for (int i = 0; i < CHECKABLE_SLOTS && !found; i++)
        if (g_checkable[i].name[0] && strcmp(g_checkable[i].name, name) == 0) {
            memcpy(disk, g_checkable[i].disk, sizeof g_checkable[i].disk);
            found = 1;
        }
    pthread_mutex_unlock(&g_checkable_lock);
    return found;
}

static int checkable_set(const char *name, const char *const *disk, unsigned count)
{
    if (!name[0] || strlen(name) >= ABSENT_NAME || count == 0 || count > CHECKABLE_DISK)
        return -EINVAL;
    for (unsigned d = 0; d < count; d++)
        if (!disk[d][0] || strlen(disk[d]) >= ABSENT_NAME + 32)
            return -EINVAL;
    int ret = -ENOSPC;
    pthread_mutex_lock(&g_checkable_lock);
    struct checkable *slot = NULL;
    for (int i = 0; i < CHECKABLE_SLOTS; i++)
        if (g_checkable[i].name[0] && strcmp(g_checkable[i].name, name) == 0)
            slot = &g_checkable[i];
    for (int i = 0; i < CHECKABLE_SLOTS && slot == NULL; i++)
        if (!g_checkable[i].name[0]) {
            slot = &g_checkable[i];
            atomic_fetch_add(&g_checkable_count, 1);
        }
    if (slot != NULL) {
        memset(slot->disk, 0, sizeof slot->disk);
        for (unsigned d = 0; d < count; d++)
            memcpy(slot->disk[d], disk[d], strlen(disk[d]) + 1);
        memcpy(slot->name, name, strlen(name) + 1);
        ret = 0;
    }
    pthread_mutex_unlock(&g_checkable_lock);
    return ret;
}

static int recipe_lacks_xattr(uint64_t ino, const char *name)
{
    char disk[CHECKABLE_DISK][ABSENT_NAME + 32];
    if (!checkable_find(name, disk))
        return 0;
    uint64_t gen = 0;
    int fd = -1;
    pthread_mutex_lock(&g_recipe_lock); /* (held while opening: the layers' descriptors stay open) */
    struct recipe *r = recipe_find_locked(ino);
    if (r != NULL && r->path != NULL) {
        gen = r->gen;
        fd = recipe_file(g_layer_fds[r->layer], r->path, O_PATH, r->dev, r->st_ino);
    }
    pthread_mutex_unlock(&g_recipe_lock);
    if (fd < 0)
        return 0;
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    int lacks = 1;
    for (unsigned d = 0; d < CHECKABLE_DISK && lacks && disk[d][0]; d++)
        lacks = getxattr(proc, disk[d], NULL, 0) < 0 && errno == ENODATA;
    close(fd);
    if (lacks && atomic_load(&g_attr_gen) == gen)
        obj_set_absent(ino, name);
    return lacks;
}

/* The Python C API's GIL functions, when this process has them: a READ served here runs inside pyfuse3's call
 * of fuse_session_process_buf, which holds the GIL; it is released around the disk read and the reply. */
typedef void *(*save_thread_fn)(void);
typedef void (*restore_thread_fn)(void *);
typedef int (*gil_check_fn)(void);
static save_thread_fn py_save_thread;
static restore_thread_fn py_restore_thread;
static gil_check_fn py_gil_check;

/* The descriptor registered for fh serving ``mode`` with g_fd_lock held (the caller unlocks once done with it, so
 * that the shell's unregistering, then closing, waits), or -1 with the lock not held. */
static int fd_take(uint64_t fh, int mode)
{
    if (atomic_load(&g_fd_count) == 0)
        return -1;
    pthread_mutex_lock(&g_fd_lock);
    int fd = fd_find_locked(fh, mode);
    if (fd < 0)
        pthread_mutex_unlock(&g_fd_lock);
    return fd;
}

/* Release the GIL if this thread holds it (a handler called by pyfuse3's fuse_session_process_buf does). */
static void *gil_release(int *released)
{
    *released = py_gil_check && py_save_thread && py_restore_thread && py_gil_check();
    return *released ? py_save_thread() : NULL;
}

/* The end of a request served on a descriptor fd_take gave: the table's lock is let go, then the GIL taken back
 * if gil_release let it go. */
static void fd_give_back(int released, void *state)
{
    pthread_mutex_unlock(&g_fd_lock);
    if (released)
        py_restore_thread(state);
}

static void shim_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    COUNT(read);
    note_max(&g_counters.read_max, size);
    int fd = fd_take(fi->fh, FD_READ);
    if (fd < 0) {
        g_inner.read(req, ino, size, off, fi);
        return;
    }
    COUNT(read_native);
    struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
    buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    buf.buf[0].fd = fd;
    buf.buf[0].pos = off;
    int released;
    void *state = gil_release(&released);
    /* fuse_reply_data answers an error of the read itself, and frees the request in every case */
    real_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
    fd_give_back(released, state);
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
    int fd = fd_take(fi->fh, FD_WRITE);
    if (fd < 0) {
        g_inner.write_buf(req, ino, bufv, off, fi);
        return;
    }
    COUNT(write_native);
    struct fuse_bufvec dst = FUSE_BUFVEC_INIT(size);
    dst.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
    dst.buf[0].fd = fd;
    dst.buf[0].pos = off;
    int released;
    void *state = gil_release(&released);
    ssize_t n = fuse_buf_copy(&dst, bufv, 0);
    if (n < 0)
        real_reply_err(req, (int)-n);
    else
        fuse_reply_write(req, (size_t)n);
    fd_give_back(released, state);
}

static void shim_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    COUNT(write);
    ADD(write_bytes, size);
    note_max(&g_counters.write_max, size);
    g_inner.write(req, ino, buf, size, off, fi);
}

/* FALLOCATE, LSEEK and COPY_FILE_RANGE (OPT_DATA_OPS): pyfuse3 has no handlers for them, so every such request
 * is answered here, on the descriptors the shell registered. The kernel asks FALLOCATE only of a handle open for
 * writing (a registered FD_WRITE descriptor is the upper file's: the open copied up first); a handle with no
 * descriptor (none is, while the shell serves them) is answered EOPNOTSUPP, never ENOSYS, which would switch the
 * request off for the whole connection. */

/* Longest copy one COPY_FILE_RANGE makes (the caller asks again for the rest; the loop waits meanwhile). */
#define COPY_CHUNK (8u * MIB)

/* Answer a request of a handle with no descriptor serving it: EOPNOTSUPP. */
static void refuse(fuse_req_t req)
{
    COUNT(data_unregistered);
    real_reply_err(req, EOPNOTSUPP);
}

/* fd_take, or -1 once the request is refused (a handle with no descriptor serving ``mode``). */
static int fd_take_or_refuse(fuse_req_t req, uint64_t fh, int mode)
{
    int fd = fd_take(fh, mode);
    if (fd < 0)
        refuse(req);
    return fd;
}

static void shim_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                           struct fuse_file_info *fi)
{
    (void)ino;
    COUNT(fallocate);
    int fd = fd_take_or_refuse(req, fi->fh, FD_WRITE);
    if (fd < 0)
        return;
    int released;
    void *state = gil_release(&released);
    real_reply_err(req, fallocate(fd, mode, offset, length) < 0 ? errno : 0);
    fd_give_back(released, state);
}

static void shim_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, struct fuse_file_info *fi)
{
    (void)ino;
    COUNT(lseek);
    int fd = fd_take_or_refuse(req, fi->fh, FD_READ | FD_WRITE);
    if (fd < 0)
        return;
    int released;
    void *state = gil_release(&released);
    off_t at = lseek(fd, off, whence);
    if (at < 0)
        real_reply_err(req, errno);
    else
        fuse_reply_lseek(req, at);
    fd_give_back(released, state);
}

static void shim_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t off_in, struct fuse_file_info *fi_in,
                                 fuse_ino_t ino_out, off_t off_out, struct fuse_file_info *fi_out, size_t len,
                                 int flags)
{
    (void)ino_in;
    (void)ino_out;
    COUNT(copy_file_range);
    int in = fd_take_or_refuse(req, fi_in->fh, FD_READ);
    if (in < 0)
        return;
    int out = fd_find_locked(fi_out->fh, FD_WRITE);
    if (out < 0) {
        pthread_mutex_unlock(&g_fd_lock);
        refuse(req);
        return;
    }
    int released;
    void *state = gil_release(&released);
    loff_t from = off_in, to = off_out;
    ssize_t n = copy_file_range(in, &from, out, &to, len < COPY_CHUNK ? len : COPY_CHUNK, (unsigned)flags);
    /* EXDEV (layers on two file systems) and EOPNOTSUPP: the kernel copies through READ and WRITE itself */
    if (n < 0)
        real_reply_err(req, errno);
    else {
        ADD(copy_bytes, (uint64_t)n);
        fuse_reply_write(req, (size_t)n);
    }
    fd_give_back(released, state);
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
    C(write_bytes); C(readdirplus); C(read_native); C(xattr_absent); C(reader_forwarded); C(reader_served);
    C(write_native); C(fallocate); C(lseek); C(copy_file_range); C(copy_bytes); C(data_unregistered);
    C(opendir_enosys); C(dir_openless); C(attr_kept); C(attr_served); C(attr_untracked);
    C(fsync_native); C(open_native); C(open_missed); C(release_native); C(adopted); C(recipes_kept);
    C(xattr_checked); C(read_pooled); C(listing_ends); C(dirs_prefetched);
    C(handoffs); C(handoff_served); C(read_spins);
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

/* -- FSYNC on the registered descriptor ------------------------------------------------------------------------
 *
 * With OPT_FSYNC an FSYNC of a handle with a registered descriptor is made on a duplicate of it, in a thread of
 * its own (it may take long: neither the reader nor pyfuse3's loop waits for it), which replies. */

struct fsync_job {
    fuse_req_t req;  /* the request (a handler's), or NULL: the reader's, replied by ``unique`` on ``devfd`` */
    uint64_t unique;
    int devfd;       /* the reader's: a duplicate of its device descriptor, valid after the session ends */
    int fd;
    int datasync;
};

static void rx_reply_error(uint64_t unique, int err);
static void dev_reply_error(int devfd, uint64_t unique, int err);
static int rx_devfd(void);

static void *fsync_main(void *arg)
{
    struct fsync_job *job = arg;
    int err = (job->datasync ? fdatasync(job->fd) : fsync(job->fd)) < 0 ? errno : 0;
    close(job->fd);
    if (job->req != NULL) {
        real_reply_err(job->req, err);
    } else {
        dev_reply_error(job->devfd, job->unique, err);
        close(job->devfd);
    }
    free(job);
    return NULL;
}

/* Start the FSYNC of handle ``fh``; 0 when it is not served here (no descriptor, no thread: Python serves it). */
static int fsync_start(fuse_req_t req, uint64_t unique, uint64_t fh, int datasync)
{
    if (!atomic_load(&g_opt_fsync) || atomic_load(&g_fd_count) == 0)
        return 0;
    pthread_mutex_lock(&g_fd_lock);
    int fd = fd_find_locked(fh, FD_READ | FD_WRITE);
    int copy = fd < 0 ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 0);
    pthread_mutex_unlock(&g_fd_lock);
    if (copy < 0)
        return 0;
    int devfd = req == NULL ? fcntl(rx_devfd(), F_DUPFD_CLOEXEC, 0) : -1;
    struct fsync_job *job = malloc(sizeof *job);
    pthread_attr_t attr;
    pthread_t thread;
    int started = 0;
    if (job != NULL && (req != NULL || devfd >= 0) && pthread_attr_init(&attr) == 0) {
        *job = (struct fsync_job){.req = req, .unique = unique, .devfd = devfd, .fd = copy, .datasync = datasync};
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        started = pthread_create(&thread, &attr, fsync_main, job) == 0;
        pthread_attr_destroy(&attr);
    }
    if (!started) {
        close(copy);
        if (devfd >= 0)
            close(devfd);
        free(job);
        return 0;
    }
    COUNT(fsync_native);
    return 1;
}

/* FSYNC of a handle the reader opened and still owns, made in the calling thread when fsync_start could not start
 * one (Python has no such handle): 0 or an errno, -1 for any other handle. */
static int fsync_here(uint64_t fh, int datasync)
{
    if (!(fh & NATIVE_FH_BIT))
        return -1;
    int err = -1;
    pthread_mutex_lock(&g_fd_lock);
    struct fd_slot *slot = fd_slot_locked(fh);
    if (slot != NULL && (slot->modes & FD_HERE))
        err = (datasync ? fdatasync(slot->fd) : fsync(slot->fd)) == 0 ? 0 : errno;
    pthread_mutex_unlock(&g_fd_lock);
    return err;
}

static void shim_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    if (fsync_start(req, 0, fi->fh, datasync))
        return;
    int err = fsync_here(fi->fh, datasync);
    if (err >= 0)
        real_reply_err(req, err);
    else
        g_inner.fsync(req, ino, datasync, fi);
}

static int rx_fsync(const struct fuse_in_header *in, const struct fuse_fsync_in *arg)
{
    if (fsync_start(NULL, in->unique, arg->fh, arg->fsync_flags & 1))
        return 1;
    int err = fsync_here(arg->fh, arg->fsync_flags & 1);
    if (err < 0)
        return 0;
    rx_reply_error(in->unique, err);
    return 1;
}

/* -- the shim's own reader of /dev/fuse ------------------------------------------------------------------------
 *
 * pyfuse3 spends most of a request's cost in its trio loop (waiting for the device, receiving, dispatching), not
 * in the handler. With OPT_OWN_READER a thread of the shim reads every request; it answers READ on a registered
 * descriptor and GETXATTR of a name declared absent itself (writing the reply to the device, no libfuse request,
 * no Python, no GIL), and queues everything else. pyfuse3 is given an eventfd as the session's descriptor (it only
 * waits on it) and its fuse_session_receive_buf takes the next queued buffer (handed over, not copied).
 */

#define RX_BUFSIZE (256u * 4096u + 4096u) /* libfuse's own: FUSE_MAX_MAX_PAGES pages and a header page */
#define RX_QUEUE 1024

static struct {
    int active;
    int devfd;            /* /dev/fuse */
    int eventfd;          /* one count per queued request, one more at the end */
    int epollfd;          /* what pyfuse3 waits on: the eventfd, and the device while it is handed off */
    int stopfd;           /* wakes the thread at fuse_session_destroy */
    int resumefd;         /* wakes the thread when pyfuse3 hands the device back */
    atomic_int handoff;   /* 1: pyfuse3's thread reads the device, the reader waits */
    unsigned score;       /* (pyfuse3's thread, handed off) Python's requests lately, less the shim's */
    struct fuse_session *se;
    pthread_t thread;
    pthread_mutex_t lock;
    struct {
        char *mem;
        size_t size;
    } queue[RX_QUEUE];
    unsigned head, count;
    int ended;            /* the device said ENODEV (unmounted) or failed */
    char *spare[16];      /* buffers to reuse */
    int spares;
} g_rx = {.devfd = -1, .eventfd = -1, .epollfd = -1, .stopfd = -1, .resumefd = -1,
        .lock = PTHREAD_MUTEX_INITIALIZER};

typedef int (*session_fd_fn)(struct fuse_session *);
typedef int (*session_mount_fn)(struct fuse_session *, const char *);
typedef int (*receive_buf_fn)(struct fuse_session *, struct fuse_buf *);
typedef void (*session_exit_fn)(struct fuse_session *);
static session_fd_fn real_session_fd;
static session_mount_fn real_session_mount;
static receive_buf_fn real_receive_buf;
static session_exit_fn real_session_exit;

static char *rx_buffer(void)
{
    char *mem = NULL;
    pthread_mutex_lock(&g_rx.lock);
    if (g_rx.spares > 0)
        mem = g_rx.spare[--g_rx.spares];
    pthread_mutex_unlock(&g_rx.lock);
    return mem ? mem : malloc(RX_BUFSIZE);
}

static void rx_recycle(char *mem)
{
    if (mem == NULL)
        return;
    pthread_mutex_lock(&g_rx.lock);
    if (g_rx.spares < (int)(sizeof g_rx.spare / sizeof g_rx.spare[0])) {
        g_rx.spare[g_rx.spares++] = mem;
        mem = NULL;
    }
    pthread_mutex_unlock(&g_rx.lock);
    free(mem);
}

static void rx_signal(void)
{
    uint64_t one = 1;
    while (write(g_rx.eventfd, &one, sizeof one) < 0 && errno == EINTR) {
    }
}

static void dev_reply_error(int devfd, uint64_t unique, int err)
{
    struct fuse_out_header out = {.len = sizeof out, .error = -err, .unique = unique};
    /* ENOENT: the request was interrupted meanwhile; nothing to do */
    while (write(devfd, &out, sizeof out) < 0 && errno == EINTR) {
    }
}

static void rx_reply_error(uint64_t unique, int err)
{
    dev_reply_error(g_rx.devfd, unique, err);
}

/* pread ``size`` bytes at ``offset`` of ``fd`` into ``data``: how many, or -errno. */
static ssize_t rx_pread(int fd, char *data, size_t size, uint64_t offset)
{
    ssize_t n;
    do
        n = pread(fd, data, size, (off_t)offset);
    while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : n;
}

/* Reply to READ ``unique`` with what rx_pread gave. */
static void rx_reply_read(uint64_t unique, const char *data, ssize_t n)
{
    if (n < 0) {
        rx_reply_error(unique, (int)-n);
        return;
    }
    struct fuse_out_header out = {.len = (uint32_t)(sizeof out + (size_t)n), .error = 0, .unique = unique};
    struct iovec iov[2] = {{&out, sizeof out}, {(void *)data, (size_t)n}};
    while (writev(g_rx.devfd, iov, 2) < 0 && errno == EINTR) {
    }
}

/* -- large READs served by a few threads ----------------------------------------------------------------------
 *
 * The kernel sends a file's readahead as several READs at once (background requests, up to max_background). One
 * reader answering them in turn keeps one of them at the disk at a time; a small pool of threads answers READs of
 * RX_POOL_MIN bytes or more side by side, each on a duplicate of the registered descriptor (so that the shell may
 * close its own meanwhile: the kernel holds the file open until every READ of it is answered, and a READ that
 * raced a copy-up reads what it would have read a moment earlier). Smaller READs (a random 4 KiB read waits for
 * its reply alone) stay with the reader: handing them over would add a thread's wake-up to each.
 * UNIONFS_NATIVE_READ_THREADS sets the number of threads (0: none, every READ answered by the reader). */
#define RX_POOL_MAX 8
#define RX_POOL_DEFAULT 4
#define RX_POOL_QUEUE 64
#define RX_POOL_MIN (64u * 1024u)

struct rx_read_job {
    uint64_t unique;
    uint64_t offset;
    size_t size;
    int fd;
};

static struct {
    int threads; /* started */
    int stopping;
    pthread_t thread[RX_POOL_MAX];
    pthread_mutex_t lock;
    pthread_cond_t ready;
    struct rx_read_job queue[RX_POOL_QUEUE];
    unsigned head, count;
} g_pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .ready = PTHREAD_COND_INITIALIZER};

static void *pool_main(void *unused)
{
    (void)unused;
    char *data = malloc(RX_BUFSIZE);
    pthread_mutex_lock(&g_pool.lock);
    for (;;) {
        while (g_pool.count == 0 && !g_pool.stopping)
            pthread_cond_wait(&g_pool.ready, &g_pool.lock);
        if (g_pool.count == 0)
            break;
        struct rx_read_job job = g_pool.queue[g_pool.head];
        g_pool.head = (g_pool.head + 1) % RX_POOL_QUEUE;
        g_pool.count--;
        pthread_mutex_unlock(&g_pool.lock);
        rx_reply_read(job.unique, data, data ? rx_pread(job.fd, data, job.size, job.offset) : -ENOMEM);
        close(job.fd);
        pthread_mutex_lock(&g_pool.lock);
    }
    pthread_mutex_unlock(&g_pool.lock);
    free(data);
    return NULL;
}

static void pool_start(void)
{
    const char *env = getenv("UNIONFS_NATIVE_READ_THREADS");
    long want = env && *env ? strtol(env, NULL, 10) : RX_POOL_DEFAULT;
    want = want < 0 ? 0 : want > RX_POOL_MAX ? RX_POOL_MAX : want;
    g_pool.stopping = 0;
    g_pool.head = g_pool.count = 0;
    g_pool.threads = 0;
    while (g_pool.threads < want && pthread_create(&g_pool.thread[g_pool.threads], NULL, pool_main, NULL) == 0)
        g_pool.threads++;
}

/* Every queued READ is answered (or fails on the unmounted device) before the threads end. */
static void pool_stop(void)
{
    pthread_mutex_lock(&g_pool.lock);
    g_pool.stopping = 1;
    pthread_cond_broadcast(&g_pool.ready);
    pthread_mutex_unlock(&g_pool.lock);
    for (int i = 0; i < g_pool.threads; i++)
        pthread_join(g_pool.thread[i], NULL);
    g_pool.threads = 0;
}

/* A forked child has none of the parent's threads: it forgets their queue, closing its copies of the descriptors.
 * (The forking thread holds the lock: rx_before_fork.) */
static void pool_after_fork_child(void)
{
    pthread_mutex_unlock(&g_pool.lock);
    pthread_cond_init(&g_pool.ready, NULL);
    for (unsigned i = 0; i < g_pool.count; i++)
        close(g_pool.queue[(g_pool.head + i) % RX_POOL_QUEUE].fd);
    g_pool.head = g_pool.count = 0;
    g_pool.threads = 0;
    g_pool.stopping = 0;
}

/* Hand a READ of ``fd`` (registered; the caller holds g_fd_lock) to the pool: 1 when queued. */
static int pool_offer_locked(uint64_t unique, int fd, size_t size, uint64_t offset)
{
    if (g_pool.threads == 0 || size < RX_POOL_MIN)
        return 0;
    pthread_mutex_lock(&g_pool.lock);
    int queued = 0;
    if (g_pool.count < RX_POOL_QUEUE && !g_pool.stopping) {
        int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (copy >= 0) {
            g_pool.queue[(g_pool.head + g_pool.count) % RX_POOL_QUEUE] =
                (struct rx_read_job){.unique = unique, .offset = offset, .size = size, .fd = copy};
            g_pool.count++;
            pthread_cond_signal(&g_pool.ready);
            queued = 1;
        }
    }
    pthread_mutex_unlock(&g_pool.lock);
    return queued;
}

/* Answer a READ on a registered descriptor; 0 when it is not one (the request goes to pyfuse3). */
static int rx_serve_read(const struct fuse_in_header *in, const struct fuse_read_in *arg)
{
    static char *data;
    if (data == NULL && (data = malloc(RX_BUFSIZE)) == NULL)
        return 0;
    /* The table's lock is held across the read, so the shell cannot close the descriptor under it. */
    if (atomic_load(&g_fd_count) == 0)
        return 0;
    pthread_mutex_lock(&g_fd_lock);
    int fd = fd_find_locked(arg->fh, FD_READ);
    if (fd < 0) {
        pthread_mutex_unlock(&g_fd_lock);
        return 0;
    }
    size_t size = arg->size < RX_BUFSIZE ? arg->size : RX_BUFSIZE;
    int pooled = pool_offer_locked(in->unique, fd, size, arg->offset);
    ssize_t n = pooled ? 0 : rx_pread(fd, data, size, arg->offset);
    pthread_mutex_unlock(&g_fd_lock);
    COUNT(read);
    COUNT(read_native);
    note_max(&g_counters.read_max, arg->size);
    if (pooled)
        COUNT(read_pooled);
    else
        rx_reply_read(in->unique, data, n);
    return 1;
}

/* Whether process `pid` is in group `gid` (its supplementary groups, from /proc; 0 when it cannot be told). */
static int pid_in_group(uint32_t pid, gid_t gid)
{
    char path[64], line[4096];
    snprintf(path, sizeof path, "/proc/%u/status", (unsigned)pid);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return 0;
    int found = 0;
    while (!found && fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "Groups:", 7) != 0)
            continue;
        for (char *at = line + 7, *end; *at; at = end) {
            unsigned long g = strtoul(at, &end, 10);
            if (end == at || (found = g == (unsigned long)gid))
                break;
        }
        break;
    }
    fclose(f);
    return found;
}

/* A WRITE of a FOPEN_DIRECT_IO handle skips the kernel's file_remove_privs(): it only flags the request
 * FUSE_WRITE_KILL_SUIDGID when the writer lacks CAP_FSETID. The server's own pwrite to the upper file does drop
 * security.capability (which goes whoever writes), but not the set-ID bits (the server may keep them). So those
 * go here on that flag, as overlayfs drops them before such a write: the set-user-ID bit, and the set-group-ID bit
 * when group execution is on or the writer is not in the file's group (the kernel's rule). 1 when the mode
 * changed (the kernel's attributes of the inode, which the write keeps but for size and times, must go). */
static int direct_write_kill(int fd, const struct fuse_in_header *in, uint32_t write_flags)
{
    struct stat st;
    if (!(write_flags & FUSE_WRITE_KILL_SUIDGID) || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
        !(st.st_mode & (S_ISUID | S_ISGID)))
        return 0;
    mode_t drop = st.st_mode & S_ISUID;
    if ((st.st_mode & S_ISGID) &&
        ((st.st_mode & S_IXGRP) || (in->gid != st.st_gid && !pid_in_group(in->pid, st.st_gid))))
        drop |= S_ISGID;
    return drop && fchmod(fd, st.st_mode & 07777 & ~drop) == 0;
}

/* Tell the kernel its attributes of inode `ino` are stale (FUSE_NOTIFY_INVAL_INODE, no page range). */
static void rx_notify_attrs(uint64_t ino)
{
    struct {
        struct fuse_out_header head;
        struct fuse_notify_inval_inode_out body;
    } msg = {{.len = sizeof msg, .error = FUSE_NOTIFY_INVAL_INODE, .unique = 0}, {.ino = ino, .off = -1, .len = 0}};
    while (write(g_rx.devfd, &msg, sizeof msg) < 0 && errno == EINTR) {
    }
}

/* Answer a WRITE on a registered descriptor; 0 when it is not one. */
static int rx_serve_write(const struct fuse_in_header *in, const struct fuse_write_in *arg, const char *data,
                          size_t avail)
{
    if (atomic_load(&g_fd_count) == 0 || arg->size > avail)
        return 0;
    pthread_mutex_lock(&g_fd_lock);
    struct fd_slot *slot = fd_slot_locked(arg->fh);
    int fd = slot != NULL && (slot->modes & FD_WRITE) ? slot->fd : -1;
    if (fd < 0) {
        pthread_mutex_unlock(&g_fd_lock);
        return 0;
    }
    int killed = (slot->modes & FD_DIRECT) && direct_write_kill(fd, in, arg->write_flags);
    ssize_t n;
    do
        n = pwrite(fd, data, arg->size, (off_t)arg->offset);
    while (n < 0 && errno == EINTR);
    int err = n < 0 ? errno : 0;
    pthread_mutex_unlock(&g_fd_lock);
    if (killed) /* (before the reply: a stat right after the write must not show the old mode) */
        rx_notify_attrs(in->nodeid);
    COUNT(write);
    COUNT(write_native);
    ADD(write_bytes, arg->size);
    note_max(&g_counters.write_max, arg->size);
    if (err) {
        rx_reply_error(in->unique, err);
        return 1;
    }
    struct {
        struct fuse_out_header head;
        struct fuse_write_out body;
    } out = {{.len = sizeof out, .error = 0, .unique = in->unique}, {.size = (uint32_t)n, .padding = 0}};
    while (write(g_rx.devfd, &out, sizeof out) < 0 && errno == EINTR) {
    }
    return 1;
}

/* What the reader does with one request: 1 when answered here. */
/* Answer a read-only OPEN from a recipe; 0 when there is none to answer it with. */
static int rx_serve_open(const struct fuse_in_header *in, const struct fuse_open_in *arg)
{
    if (!atomic_load(&g_session_opens) || !atomic_load(&g_session_dir_attrs))
        return 0;
    return recipe_open(in->nodeid, arg->flags, in->unique);
}

static int rx_devfd(void)
{
    return g_rx.devfd;
}

/* Answer the RELEASE of a handle the reader opened (and still owns); 0 for any other. */
static int rx_serve_release(const struct fuse_in_header *in, const struct fuse_release_in *arg)
{
    int fd = recipe_release(arg->fh);
    if (fd < 0)
        return 0;
    close(fd);
    COUNT(release_native);
    rx_reply_error(in->unique, 0);
    return 1;
}

static int rx_serve(const char *mem, size_t size)
{
    const struct fuse_in_header *in = (const struct fuse_in_header *)mem;
    if (size < sizeof *in)
        return 0;
    const char *arg = mem + sizeof *in;
    size_t left = size - sizeof *in;
    switch (in->opcode) {
    case FUSE_READ:
        return left >= sizeof(struct fuse_read_in) && rx_serve_read(in, (const struct fuse_read_in *)arg);
    case FUSE_WRITE:
        return left >= sizeof(struct fuse_write_in) &&
               rx_serve_write(in, (const struct fuse_write_in *)arg, arg + sizeof(struct fuse_write_in),
                              left - sizeof(struct fuse_write_in));
    case FUSE_OPEN:
        return left >= sizeof(struct fuse_open_in) && rx_serve_open(in, (const struct fuse_open_in *)arg);
    case FUSE_RELEASE:
        return left >= sizeof(struct fuse_release_in) && rx_serve_release(in, (const struct fuse_release_in *)arg);
    case FUSE_FSYNC:
        return left >= sizeof(struct fuse_fsync_in) && rx_fsync(in, (const struct fuse_fsync_in *)arg);
    case FUSE_GETATTR: {
        struct {
            struct fuse_out_header head;
            struct fuse_attr_out body;
        } out;
        memset(&out, 0, sizeof out);
        uint64_t valid = g_conn.proto_minor >= 9 ? attr_get(in->nodeid, &out.body.attr) : 0;
        if (!valid)
            return 0;
        out.head.len = sizeof out;
        out.head.unique = in->unique;
        out.body.attr_valid = valid / 1000000000u;
        out.body.attr_valid_nsec = (uint32_t)(valid % 1000000000u);
        COUNT(attr_served);
        while (write(g_rx.devfd, &out, sizeof out) < 0 && errno == EINTR) {
        }
        return 1;
    }
    case FUSE_READDIR:
    case FUSE_READDIRPLUS:
        /* the end of an open-less directory's listing (fh 0) that Python served to its end meanwhile: empty */
        if (left >= sizeof(struct fuse_read_in) && g_session_openless && ((const struct fuse_read_in *)arg)->fh == 0 &&
            attr_listing_ended(in->nodeid, ((const struct fuse_read_in *)arg)->offset)) {
            COUNT(listing_ends);
            rx_reply_error(in->unique, 0);
            return 1;
        }
        return 0;
    case FUSE_GETXATTR:
        if (left > sizeof(struct fuse_getxattr_in) && memchr(arg + 8, 0, left - 8) &&
            (absent_has(arg + 8) || obj_absent(in->nodeid, arg + 8))) {
            COUNT(xattr_absent);
            rx_reply_error(in->unique, ENODATA);
            return 1;
        }
        if (left > sizeof(struct fuse_getxattr_in) && memchr(arg + 8, 0, left - 8) &&
            recipe_lacks_xattr(in->nodeid, arg + 8)) {
            COUNT(xattr_checked);
            rx_reply_error(in->unique, ENODATA);
            return 1;
        }
        return 0;
    case FUSE_SETXATTR:
        /* the name follows an 8- or 16-byte header (FUSE_SETXATTR_EXT): a declared name in either place stops
         * being declared before the request is queued, so no later GETXATTR is answered for it */
        for (size_t at = 8; at <= 16; at += 8)
            if (left > at && memchr(arg + at, 0, left - at) && absent_has(arg + at))
                absent_set(arg + at, 0);
        obj_clear();
        return 0;
    default:
        return 0;
    }
}

/* After each request it answered itself, the reader polls the device without sleeping for this long
 * (UNIONFS_NATIVE_SPIN_US, 0: not at all), yielding the CPU to whatever else may run: the client's next request
 * of a burst (an `ls -l` asks one GETXATTR per file) is then taken without the thread being woken, which costs
 * most of a round trip on a machine whose idle CPUs halt (a virtual machine's). Not after a request handed to
 * pyfuse3: the client waits for Python's reply meanwhile, and a spinning thread would only take a CPU from
 * Python and the client (a cold `find` took 20% longer so on a 2-core machine). */
#define SPIN_NS_DEFAULT 50000u

/* Not after a file's OPEN or RELEASE either: a client reading files (`cat` of every file of a tree) does work of
 * its own between them, often at the disk, and the spinning thread took a CPU from it (reading 10,000 small files
 * took 1.77 s, median of 5, with polling after them and 1.50 s without; polling after GETXATTR and GETATTR alone
 * kept a warm `ls -lR` at 0.22 s, against 0.6-0.7 s without any). After a READ only in a burst of small READs
 * (under RX_POOL_MIN, which the reader answers itself): once READ_BURST of them in a row came each within the
 * spinning time of the reader's answer to the one before (a client reading a file in small pieces, fio's random
 * 4 KiB reads), whether it was spinning meanwhile or not. Any other request ends the burst. */
#define READ_BURST 2u
static uint64_t g_spin_ns = SPIN_NS_DEFAULT;

static int rx_spins_after(uint32_t opcode, unsigned read_burst)
{
    if (opcode == FUSE_READ)
        return read_burst >= READ_BURST;
    return opcode != FUSE_OPEN && opcode != FUSE_RELEASE;
}

/* (the reader) The burst a READ that came at `arrived` makes, the last READ's answer having been at `answered` (0:
 * the last request was not a READ the reader answered). */
static unsigned rx_read_burst(unsigned burst, uint64_t answered, uint64_t arrived)
{
    if (answered == 0 || arrived - answered > g_spin_ns)
        return 1;
    return burst < READ_BURST ? burst + 1 : READ_BURST;
}

static int rx_wait(struct pollfd *fds, uint64_t last)
{
    while (now_ns() - last < g_spin_ns) {
        int ready = poll(fds, 2, 0);
        if (ready != 0)
            return ready;
        sched_yield();
    }
    return poll(fds, 2, -1);
}

/* Handing the device to pyfuse3. A request only Python answers crosses two threads when the reader takes it (the
 * reader wakes, queues it, pyfuse3's thread wakes): copying up 500 files took 1.25 s so against 1.07 s in the pure
 * mode. Once Python's requests outnumber by HANDOFF_AFTER those the reader answered lately (UNIONFS_NATIVE_HANDOFF,
 * 0: never), the reader adds the device to what pyfuse3 waits on and stops reading it: pyfuse3's thread reads each
 * request itself, as without the shim, and answers there (without the GIL) those the reader would have answered,
 * each of which costs it more than the reader (a wake of pyfuse3's loop). It gives the device back once those
 * outnumber Python's by HANDOFF_SCORE (each of Python's counting once, up to HANDOFF_SCORE): copying up a file
 * (LOOKUP, OPEN, RELEASE for Python; WRITE, GETXATTR for the shim) keeps the device handed off, reading one
 * (LOOKUP; OPEN, READ, READ, RELEASE) or listing (GETXATTR after GETXATTR) gives it back. The device is
 * non-blocking, so that a thread finding nothing to read (a request interrupted meanwhile) waits again. */
#define HANDOFF_AFTER_DEFAULT 2u
#define HANDOFF_SCORE 4u
static unsigned g_handoff_after = HANDOFF_AFTER_DEFAULT;

/* (the reader) Hand the device over, then wait until it is given back (0) or the session ends (-1). */
static int rx_hand_off(void)
{
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = g_rx.devfd;
    g_rx.score = HANDOFF_SCORE;
    atomic_store(&g_rx.handoff, 1);
    if (epoll_ctl(g_rx.epollfd, EPOLL_CTL_ADD, g_rx.devfd, &ev) != 0) {
        atomic_store(&g_rx.handoff, 0);
        return 0; /* (kept: the reader goes on reading) */
    }
    COUNT(handoffs);
    struct pollfd fds[2] = {{.fd = g_rx.resumefd, .events = POLLIN}, {.fd = g_rx.stopfd, .events = POLLIN}};
    for (;;) {
        int ready = poll(fds, 2, -1);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready < 0 || fds[1].revents)
            return -1;
        uint64_t token;
        if (read(g_rx.resumefd, &token, sizeof token) == sizeof token)
            return 0;
    }
}

/* (pyfuse3's thread) Give the device back to the reader. */
static void rx_take_back(void)
{
    epoll_ctl(g_rx.epollfd, EPOLL_CTL_DEL, g_rx.devfd, NULL);
    atomic_store(&g_rx.handoff, 0);
    uint64_t one = 1;
    while (write(g_rx.resumefd, &one, sizeof one) < 0 && errno == EINTR) {
    }
}

static void *rx_main(void *unused)
{
    (void)unused;
    struct pollfd fds[2] = {{.fd = g_rx.devfd, .events = POLLIN}, {.fd = g_rx.stopfd, .events = POLLIN}};
    char *mem = NULL;
    uint64_t last = 0;
    uint64_t read_at = 0;    /* when it answered the last request, a READ (0: the last was no READ it answered) */
    unsigned read_burst = 0; /* READs in a row, each soon after the one before (up to READ_BURST) */
    unsigned forwarded = 0; /* Python's requests lately, less the reader's */
    const char *spin = getenv("UNIONFS_NATIVE_SPIN_US");
    g_spin_ns = spin && *spin ? (uint64_t)strtoul(spin, NULL, 10) * 1000u : SPIN_NS_DEFAULT;
    for (;;) {
        if (mem == NULL && (mem = rx_buffer()) == NULL)
            break;
        int ready = rx_wait(fds, last);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready < 0 || fds[1].revents)
            break;
        ssize_t n = read(g_rx.devfd, mem, RX_BUFSIZE);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == ENOENT))
            continue;
        if (n <= 0)
            break; /* ENODEV: unmounted */
        uint32_t opcode = ((const struct fuse_in_header *)mem)->opcode;
        const struct fuse_read_in *read_in = (const void *)(mem + sizeof(struct fuse_in_header));
        int small_read = opcode == FUSE_READ && read_in->size < RX_POOL_MIN;
        uint64_t arrived = small_read ? now_ns() : 0;
        if (rx_serve(mem, (size_t)n)) {
            COUNT(reader_served);
            uint64_t now = now_ns();
            read_burst = small_read ? rx_read_burst(read_burst, read_at, arrived) : 0;
            read_at = small_read ? now : 0;
            last = rx_spins_after(opcode, read_burst) ? now : 0;
            if (small_read && last)
                COUNT(read_spins);
            forwarded = forwarded > 0 ? forwarded - 1 : 0;
            continue;
        }
        last = read_at = 0;
        read_burst = 0;
        pthread_mutex_lock(&g_rx.lock);
        while (g_rx.count == RX_QUEUE) { /* pyfuse3 is that far behind: wait for it */
            pthread_mutex_unlock(&g_rx.lock);
            usleep(100);
            pthread_mutex_lock(&g_rx.lock);
        }
        unsigned at = (g_rx.head + g_rx.count) % RX_QUEUE;
        g_rx.queue[at].mem = mem;
        g_rx.queue[at].size = (size_t)n;
        g_rx.count++;
        rx_signal();
        pthread_mutex_unlock(&g_rx.lock);
        COUNT(reader_forwarded);
        mem = NULL;
        if (g_handoff_after && ++forwarded >= g_handoff_after) {
            forwarded = 0;
            if (rx_hand_off() < 0)
                break;
        }
    }
    rx_recycle(mem);
    pthread_mutex_lock(&g_rx.lock);
    g_rx.ended = 1;
    rx_signal();
    pthread_mutex_unlock(&g_rx.lock);
    return NULL;
}

/* Close the reader's descriptors (those it has) and forget its session. */
static void rx_close(void)
{
    int *fds[] = {&g_rx.devfd, &g_rx.eventfd, &g_rx.stopfd, &g_rx.resumefd, &g_rx.epollfd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
    g_rx.se = NULL;
}

/* The reader and the read threads use a descriptor of the device of their own: libfuse closes the session's at
 * unmount (fuse_session_unmount), before fuse_session_destroy stops them, and its number may be another file's by
 * the time they write a last reply. */
static void rx_start(struct fuse_session *se)
{
    g_rx.devfd = fcntl(real_session_fd(se), F_DUPFD_CLOEXEC, 3);
    g_rx.eventfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK | EFD_SEMAPHORE);
    g_rx.stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    g_rx.resumefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    g_rx.epollfd = epoll_create1(EPOLL_CLOEXEC);
    g_rx.se = se;
    g_rx.head = g_rx.count = 0;
    g_rx.ended = 0;
    atomic_store(&g_rx.handoff, 0);
    const char *handoff = getenv("UNIONFS_NATIVE_HANDOFF");
    g_handoff_after = handoff && *handoff ? (unsigned)strtoul(handoff, NULL, 10) : HANDOFF_AFTER_DEFAULT;
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = g_rx.eventfd;
    int flags = g_rx.devfd >= 0 ? fcntl(g_rx.devfd, F_GETFL) : -1;
    if (g_rx.devfd >= 0 && g_rx.eventfd >= 0 && g_rx.stopfd >= 0 && g_rx.resumefd >= 0 && g_rx.epollfd >= 0 &&
        epoll_ctl(g_rx.epollfd, EPOLL_CTL_ADD, g_rx.eventfd, &ev) == 0 && flags >= 0 &&
        fcntl(g_rx.devfd, F_SETFL, flags | O_NONBLOCK) == 0) {
        pool_start(); /* (before the reader, which hands it READs) */
        if (pthread_create(&g_rx.thread, NULL, rx_main, NULL) == 0) {
            g_rx.active = 1;
            return;
        }
        pool_stop();
    }
    rx_close();
}

static void rx_stop(void)
{
    if (!g_rx.active)
        return;
    uint64_t one = 1;
    while (write(g_rx.stopfd, &one, sizeof one) < 0 && errno == EINTR) {
    }
    pthread_join(g_rx.thread, NULL);
    pool_stop();
    g_rx.active = 0;
    for (unsigned i = 0; i < g_rx.count; i++)
        free(g_rx.queue[(g_rx.head + i) % RX_QUEUE].mem);
    g_rx.count = 0;
    while (g_rx.spares > 0)
        free(g_rx.spare[--g_rx.spares]);
    rx_close();
}

/* The queues of the read and prefetch threads are whole at a fork: the forking thread holds their locks across it
 * (neither is held across any I/O), so that the child finds every queued job intact to drop. */
static void rx_before_fork(void)
{
    pthread_mutex_lock(&g_pool.lock);
    pthread_mutex_lock(&g_pf.lock);
}

static void rx_after_fork_parent(void)
{
    pthread_mutex_unlock(&g_pf.lock);
    pthread_mutex_unlock(&g_pool.lock);
}

/* A process forked from a server (unionfs's spares) has no reader thread: it forgets the parent's (without
 * touching the descriptors it shares with the parent beyond closing its own copies) and may start its own for
 * the session it mounts next. Locks another thread held at the fork are made anew. */
static void rx_after_fork_child(void)
{
    pthread_mutex_init(&g_rx.lock, NULL);
    pthread_mutex_init(&g_fd_lock, NULL);
    pthread_mutex_init(&g_pending_lock, NULL);
    pthread_mutex_init(&g_absent_lock, NULL);
    pthread_mutex_init(&g_obj_lock, NULL);
    pthread_mutex_init(&g_recipe_lock, NULL);
    pthread_mutex_init(&g_attr_lock, NULL);
    pthread_mutex_init(&g_shown_lock, NULL);
    pool_after_fork_child();
    pf_after_fork_child();
    if (!g_rx.active)
        return;
    rx_close();
    g_rx.active = 0;
    g_rx.count = 0; /* the queued buffers are the parent's requests: never answered here */
}

EXPORT int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
    int ret = real_session_mount(se, mountpoint);
    if (ret == 0 && g_active && atomic_load(&g_opt_own_reader) && !g_rx.active)
        rx_start(se);
    return ret;
}

EXPORT int fuse_session_fd(struct fuse_session *se)
{
    if (g_rx.active && se == g_rx.se)
        return g_rx.epollfd;
    return real_session_fd(se);
}

/* pyfuse3's previous buffer is one of ours (it starts with none): reuse it, and give it ``mem``. */
static int rx_give(struct fuse_buf *buf, char *mem, size_t size)
{
    rx_recycle(buf->mem);
    buf->mem = mem;
    buf->size = size;
    buf->flags = 0;
    buf->pos = 0;
    return (int)size;
}

/* (pyfuse3's thread, the device handed to it) The next request for Python, or -EINTR when there was none or the
 * shim answered it; 0 once the session ended. */
static int rx_receive_handed(struct fuse_session *se, struct fuse_buf *buf)
{
    char *mem = rx_buffer();
    if (mem == NULL) {
        rx_take_back();
        return -EINTR;
    }
    ssize_t n = read(g_rx.devfd, mem, RX_BUFSIZE);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == ENOENT)) {
        rx_recycle(mem);
        return -EINTR;
    }
    if (n <= 0) { /* ENODEV: unmounted */
        rx_recycle(mem);
        pthread_mutex_lock(&g_rx.lock);
        g_rx.ended = 1;
        pthread_mutex_unlock(&g_rx.lock);
        real_session_exit(se);
        return 0;
    }
    int released;
    void *state = gil_release(&released);
    int served = rx_serve(mem, (size_t)n);
    if (released)
        py_restore_thread(state);
    if (served) {
        COUNT(reader_served);
        COUNT(handoff_served);
        rx_recycle(mem);
        if (--g_rx.score == 0)
            rx_take_back();
        return -EINTR;
    }
    if (g_rx.score < HANDOFF_SCORE)
        g_rx.score++;
    COUNT(reader_forwarded);
    return rx_give(buf, mem, (size_t)n);
}

EXPORT int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    if (!g_rx.active || se != g_rx.se)
        return real_receive_buf(se, buf);
    pthread_mutex_lock(&g_rx.lock);
    if (g_rx.count == 0) {
        int ended = g_rx.ended;
        pthread_mutex_unlock(&g_rx.lock);
        if (ended) {
            real_session_exit(se);
            return 0;
        }
        if (atomic_load(&g_rx.handoff))
            return rx_receive_handed(se, buf);
        return -EINTR; /* another of pyfuse3's tasks took it: wait again */
    }
    char *mem = g_rx.queue[g_rx.head].mem;
    size_t size = g_rx.queue[g_rx.head].size;
    g_rx.head = (g_rx.head + 1) % RX_QUEUE;
    g_rx.count--;
    uint64_t token;
    while (read(g_rx.eventfd, &token, sizeof token) < 0 && errno == EINTR) {
    }
    pthread_mutex_unlock(&g_rx.lock);
    return rx_give(buf, mem, size);
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
    obj_clear();
    shown_clear();
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
    g_session_openless = atomic_load(&g_opt_openless) && g_inner.opendir && g_inner.readdirplus;
    if (g_session_openless && g_inner.fsyncdir)
        g_outer.fsyncdir = shim_fsyncdir;
    /* Directory attributes: every handler that may change something is wrapped, or none is kept. */
    int attrs = atomic_load(&g_opt_dir_attrs) && g_inner.getattr && !g_inner.ioctl;
    atomic_store(&g_session_dir_attrs, attrs);
    attr_clear();
    pthread_mutex_lock(&g_recipe_lock);
    recipes_clear_locked();
    pthread_mutex_unlock(&g_recipe_lock);
    atomic_store(&g_session_opens, attrs && atomic_load(&g_opt_opens) && g_inner.open && g_inner.release);
    if (attrs) {
#define WRAP(op)                                                                                                   \
    if (g_inner.op)                                                                                                \
        g_outer.op = shim_##op;
        WRAP(lookup)
        WRAP(getattr)
        WRAP(forget)
        WRAP(forget_multi)
        WRAP(setattr)
        WRAP(mknod)
        WRAP(mkdir)
        WRAP(unlink)
        WRAP(rmdir)
        WRAP(symlink)
        WRAP(rename)
        WRAP(link)
        WRAP(open)
        WRAP(release)
        WRAP(create)
        WRAP(removexattr)
#undef WRAP
    }
    if (g_inner.getxattr)
        g_outer.getxattr = shim_getxattr;
    if (g_inner.setxattr)
        g_outer.setxattr = shim_setxattr;
    if (g_inner.read)
        g_outer.read = shim_read;
    if (g_inner.fsync)
        g_outer.fsync = shim_fsync;
    if (g_inner.write)
        g_outer.write = shim_write;
    if (g_inner.write_buf)
        g_outer.write_buf = shim_write_buf;
    if (atomic_load(&g_opt_data_ops)) {
        g_outer.fallocate = shim_fallocate;
        g_outer.lseek = shim_lseek;
        g_outer.copy_file_range = shim_copy_file_range;
    }
    memset(&g_conn, 0, sizeof g_conn);
    COUNT(session_wrapped);
    return real_session_new(args, &g_outer, sizeof g_outer, userdata);
}

EXPORT void fuse_session_destroy(struct fuse_session *se)
{
    if (se == g_rx.se)
        rx_stop();
    pf_stop();
    if (real_session_destroy)
        real_session_destroy(se);
    pending_clear();
    dump_to_environment();
}

EXPORT int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
    COUNT(reply_open);
    if (reply_seen(req, NULL, 0, 0) == KIND_OPENDIR) {
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
    reply_seen(req, NULL, 0, 0);
    return real_reply_err(req, err);
}

EXPORT int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size)
{
    reply_seen(req, NULL, 0, 0);
    return real_reply_buf(req, buf, size);
}

EXPORT int fuse_reply_attr(fuse_req_t req, const struct stat *attr, double attr_timeout)
{
    struct fuse_attr a;
    struct stat shown = *attr;
    shown.st_ino = (ino_t)shown_number((uint64_t)attr->st_ino);
    attr_from_stat(&a, &shown);
    reply_seen(req, &a, 0, attr_timeout);
    return real_reply_attr(req, &shown, attr_timeout);
}

EXPORT int fuse_reply_entry(fuse_req_t req, const struct fuse_entry_param *e)
{
    struct fuse_attr a;
    struct fuse_entry_param shown = *e;
    shown.attr.st_ino = (ino_t)shown_number(e->ino);
    attr_from_stat(&a, &shown.attr);
    reply_seen(req, &a, e->ino, e->attr_timeout);
    return real_reply_entry(req, &shown);
}

EXPORT int fuse_reply_create(fuse_req_t req, const struct fuse_entry_param *e, const struct fuse_file_info *fi)
{
    struct fuse_entry_param shown = *e;
    shown.attr.st_ino = (ino_t)shown_number(e->ino);
    reply_seen(req, NULL, 0, 0);
    return real_reply_create(req, &shown, fi);
}

EXPORT int fuse_reply_write(fuse_req_t req, size_t count)
{
    reply_seen(req, NULL, 0, 0);
    return real_reply_write(req, count);
}

EXPORT size_t fuse_add_direntry_plus(fuse_req_t req, char *buf, size_t bufsize, const char *name,
                                     const struct fuse_entry_param *e, off_t off)
{
    struct fuse_entry_param shown = *e;
    shown.attr.st_ino = (ino_t)shown_number(e->ino);
    if (pending_find(req, 0) == KIND_PLAIN_READDIR) {
        size_t len = real_add_direntry(req, buf, bufsize, name, &shown.attr, off);
        if (len <= bufsize)
            COUNT(entries_plain);
        return len;
    }
    return real_add_direntry_plus(req, buf, bufsize, name, &shown, off);
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

/* The flag of an option (unionfs_native_set), NULL for an unknown one. */
static atomic_int *option_flag(int option)
{
    switch (option) {
    case OPT_TUNE_CONN:
        return &g_opt_tune;
    case OPT_CACHE_DIRS:
        return &g_opt_cache_dirs;
    case OPT_READDIRPLUS_AUTO:
        return &g_opt_rdplus_auto;
    case OPT_OWN_READER:
        return &g_opt_own_reader;
    case OPT_DATA_OPS:
        return &g_opt_data_ops;
    case OPT_OPENLESS_DIRS:
        return &g_opt_openless;
    case OPT_DIR_ATTRS:
        return &g_opt_dir_attrs;
    case OPT_FSYNC:
        return &g_opt_fsync;
    case OPT_OPENS:
        return &g_opt_opens;
    case OPT_PREFETCH:
        return &g_opt_prefetch;
    default:
        return NULL;
    }
}

/* 0, or -EINVAL for an unknown option. Takes effect at the next fuse_session_new (cached listings: at once). */
EXPORT int unionfs_native_set(int option, int value)
{
    atomic_int *flag = option_flag(option);
    if (flag == NULL)
        return -EINVAL;
    atomic_store(flag, value != 0);
    return 0;
}

EXPORT int unionfs_native_get(int option)
{
    atomic_int *flag = option_flag(option);
    return flag == NULL ? -EINVAL : atomic_load(flag);
}

/* Serve READ (modes & 1) and WRITE (modes & 2; with 8, of a direct_io handle) requests on file handle ``fh`` on
 * descriptor ``fd`` (pread, pwrite, no Python); fd < 0 stops it. The caller keeps fd open until it has
 * unregistered it (the shim holds its lock across every use, so unregistering waits for a request of it under
 * way; a READ handed to the read threads is made on a duplicate, which the caller's close leaves alone). 0, or
 * -ENOMEM. */
EXPORT int unionfs_native_set_fd(uint64_t fh, int fd, int modes)
{
    return fd_register(fh, fd, modes & (FD_READ | FD_WRITE | FD_DIRECT));
}

/* Declare (absent != 0) or withdraw that no file of the mount has the extended attribute ``name``: GETXATTR of
 * it is answered ENODATA without Python while declared; a SETXATTR of it through the mount withdraws it. */
EXPORT int unionfs_native_absent_xattr(const char *name, int absent)
{
    return absent_set(name, absent);
}

/* Inode ``ino`` has no extended attribute ``name`` (the shell found it missing): GETXATTR of it is answered
 * ENODATA until unionfs_native_absent_clear() or a SETXATTR through the mount. 0, -ENOSPC, -ENOMEM. */
EXPORT int unionfs_native_absent_at(uint64_t ino, const char *name)
{
    return obj_set_absent(ino, name);
}

/* Declare ``name`` checkable on a recipe's file (see "xattrs a file lacks"): ``disk`` holds ``count`` (1 or 2)
 * names whose absence from the file means the merged file lacks it. 0, -EINVAL, or -ENOSPC (8 names held). */
EXPORT int unionfs_native_checkable_xattr(const char *name, const char *const *disk, unsigned count)
{
    return checkable_set(name, disk, count);
}

/* Forget every inode's absent names (an object may have gained one). */
EXPORT void unionfs_native_absent_clear(void)
{
    obj_clear();
}

/* The PLAIN_READDIR_BIT (Python strips it from the handle of a plain READDIR). */
EXPORT uint64_t unionfs_native_plain_readdir_bit(void)
{
    return PLAIN_READDIR_BIT;
}

/* Whether the session has open-less directories (OPT_OPENLESS_DIRS when it started): the handle of each of its
 * directory requests is then the directory's inode number. */
EXPORT int unionfs_native_session_openless(void)
{
    return g_session_openless;
}

/* The generation of directory attributes now: what unionfs_native_dir_attr is given is kept only while it holds
 * (nothing that may change anything was asked since). */
EXPORT uint64_t unionfs_native_attr_gen(void)
{
    return atomic_load(&g_attr_gen);
}

/* The shell served open-less directory ``ino``'s listing, as read since generation ``gen``, to its end: a READDIR
 * or READDIRPLUS at ``offset`` is answered empty by the reader while nothing may have changed. 1 when kept. */
EXPORT int unionfs_native_listing_end(uint64_t gen, uint64_t ino, uint64_t offset)
{
    return attr_listing_end(gen, ino, offset);
}

/* Directory ``ino``'s attributes as the shell gives them, fresh since generation ``gen`` (after it read the
 * directory's layers, which may have moved its atime), valid for ``timeout`` seconds: kept as a reply would be.
 * 1 when kept, 0 when not (another generation, not a directory, not keeping attributes). */
EXPORT int unionfs_native_dir_attr(uint64_t gen, uint64_t ino, uint32_t mode, uint32_t nlink, uint32_t uid,
                                   uint32_t gid, uint64_t rdev, uint64_t size, uint32_t blksize, uint64_t blocks,
                                   int64_t atime_ns, int64_t mtime_ns, int64_t ctime_ns, double timeout)
{
    struct stat st;
    memset(&st, 0, sizeof st);
    st.st_ino = ino;
    st.st_mode = mode;
    st.st_nlink = nlink;
    st.st_uid = uid;
    st.st_gid = gid;
    st.st_rdev = rdev;
    st.st_size = (off_t)size;
    st.st_blksize = blksize;
    st.st_blocks = (blkcnt_t)blocks;
    int64_t ns[3] = {atime_ns, mtime_ns, ctime_ns};
    struct timespec *ts[3] = {&st.st_atim, &st.st_mtim, &st.st_ctim};
    for (int i = 0; i < 3; i++) {
        int64_t sec = ns[i] / 1000000000, rest = ns[i] % 1000000000;
        if (rest < 0) {
            rest += 1000000000;
            sec -= 1;
        }
        ts[i]->tv_sec = (time_t)sec;
        ts[i]->tv_nsec = (long)rest;
    }
    struct fuse_attr a;
    attr_from_stat(&a, &st);
    return attr_put(gen, ino, &a, timeout);
}

/* The directories of the layers, by index (0: the upper layer), that recipes name paths beneath: duplicated
 * (the caller keeps its own). 0, or -errno (the layers are as before). */
EXPORT int unionfs_native_layers(const int *fds, unsigned count)
{
    int *dups = calloc(count ? count : 1, sizeof *dups);
    if (dups == NULL)
        return -ENOMEM;
    for (unsigned i = 0; i < count; i++) {
        dups[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
        if (dups[i] < 0) {
            int err = errno;
            while (i-- > 0)
                close(dups[i]);
            free(dups);
            return -err;
        }
    }
    pthread_mutex_lock(&g_recipe_lock);
    int *old = g_layer_fds;
    unsigned old_count = g_layer_count;
    g_layer_fds = dups;
    g_layer_count = count;
    recipes_clear_locked(); /* (they named the old layers) */
    pthread_mutex_unlock(&g_recipe_lock);
    for (unsigned i = 0; i < old_count; i++)
        close(old[i]);
    free(old);
    return 0;
}

/* Directories to read ahead (see "reading ahead the directories a listing names"): ``buf`` holds ``len`` bytes of
 * records, each the layer and the length of a path beneath the layer's directory (two uint32, this machine's byte
 * order), then the path's bytes (no NUL). How many were queued; a record cut short ends the list. */
EXPORT int unionfs_native_prefetch(const char *buf, size_t len)
{
    int queued = 0;
    if (!atomic_load(&g_opt_prefetch))
        return 0;
    pthread_mutex_lock(&g_pf.lock);
    for (size_t at = 0; at + 8 <= len;) {
        uint32_t head[2];
        memcpy(head, buf + at, sizeof head);
        if (head[1] == 0 || at + 8 + head[1] > len)
            break;
        if (head[1] < PATH_MAX && memchr(buf + at + 8, 0, head[1]) == NULL) /* (a longer path is skipped) */
            queued += pf_queue_locked(head[0], buf + at + 8, head[1]);
        at += 8 + head[1];
    }
    pthread_mutex_unlock(&g_pf.lock);
    return queued;
}

/* Recipes (see "read-only opens answered by the reader"), as of generation ``gen``: ``buf`` holds ``len`` bytes
 * of records, one per inode (all the entries of a READDIRPLUS reply at once), each its inode number, the device
 * and inode number of its file (three uint64), the layer and the length of the path beneath the layer's directory
 * (two uint32), all in this machine's byte order, then the path's bytes (no NUL). How many were kept; a record
 * cut short ends the list. */
#define RECIPE_RECORD 32u
EXPORT int unionfs_native_openable(uint64_t gen, const char *buf, size_t len)
{
    int kept = 0;
    char path[PATH_MAX];
    for (size_t at = 0; len - at >= RECIPE_RECORD;) {
        uint64_t ino, dev, st_ino;
        uint32_t layer, size;
        memcpy(&ino, buf + at, 8);
        memcpy(&dev, buf + at + 8, 8);
        memcpy(&st_ino, buf + at + 16, 8);
        memcpy(&layer, buf + at + 24, 4);
        memcpy(&size, buf + at + 28, 4);
        at += RECIPE_RECORD;
        if (size > len - at)
            break;
        if (size > 0 && size < sizeof path && memchr(buf + at, 0, size) == NULL) {
            memcpy(path, buf + at, size);
            path[size] = 0;
            kept += recipe_put(gen, ino, dev, st_ino, layer, path);
        }
        at += size;
    }
    return kept;
}

/* Take over the handles the reader opened for inode ``ino`` and still owns: up to ``max`` of them are written
 * (handle, descriptor, layer) and their RELEASE goes to Python from now on, which closes the descriptor; the
 * descriptor stays registered for the data requests as it was. The inode's recipe goes. How many were written
 * (call again while it is ``max``). */
EXPORT int unionfs_native_adopt(uint64_t ino, uint64_t *fhs, int *fds, unsigned *layers, int max)
{
    int n = 0;
    /* (always under the lock, even with no handle of the reader's: one may be being opened, see above) */
    pthread_mutex_lock(&g_fd_lock);
    recipe_drop(ino); /* (a recipe named while a change was under way must not outlive its taking over) */
    for (unsigned i = 0; i < g_fd_slots && n < max; i++) {
        struct fd_slot *slot = &g_fds[i];
        if (slot->fd >= 0 && (slot->modes & FD_HERE) && slot->ino == ino) {
            slot->modes &= ~FD_HERE;
            fhs[n] = slot->fh;
            fds[n] = slot->fd;
            layers[n] = slot->layer;
            n++;
            atomic_fetch_sub(&g_native_open_count, 1);
            COUNT(adopted);
        }
    }
    pthread_mutex_unlock(&g_fd_lock);
    return n;
}

/* How many handles the reader opened and still owns (not released, not adopted). */
EXPORT int unionfs_native_show(const uint64_t *pairs, unsigned count)
{
    int ret = 0;
    pthread_mutex_lock(&g_shown_lock);
    for (unsigned i = 0; i < count && ret == 0; i++)
        ret = shown_set_locked(pairs[2 * i], pairs[2 * i + 1]);
    atomic_store(&g_shown_count, (int)g_shown_used);
    pthread_mutex_unlock(&g_shown_lock);
    return ret;
}

EXPORT uint64_t unionfs_native_shown(uint64_t ino)
{
    return shown_number(ino);
}

EXPORT int unionfs_native_open_count(void)
{
    return atomic_load(&g_native_open_count);
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
 * notune, cache_dirs, readdirplus_auto, own_reader, data_ops, openless_dirs, dir_attrs, fsync, absent_xattr=NAME. */
static void read_environment(void)
{
    const char *conf = getenv("UNIONFS_NATIVE_CONFIG");
    char word[96];
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
            else if (strcmp(word, "own_reader") == 0)
                atomic_store(&g_opt_own_reader, 1);
            else if (strcmp(word, "data_ops") == 0)
                atomic_store(&g_opt_data_ops, 1);
            else if (strcmp(word, "openless_dirs") == 0)
                atomic_store(&g_opt_openless, 1);
            else if (strcmp(word, "dir_attrs") == 0)
                atomic_store(&g_opt_dir_attrs, 1);
            else if (strcmp(word, "fsync") == 0)
                atomic_store(&g_opt_fsync, 1);
            else if (strncmp(word, "absent_xattr=", 13) == 0)
                absent_set(word + 13, 1);
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
    real_reply_attr = (reply_attr_fn)lookup("fuse_reply_attr");
    real_reply_entry = (reply_entry_fn)lookup("fuse_reply_entry");
    real_reply_create = (reply_create_fn)lookup("fuse_reply_create");
    real_reply_write = (reply_write_fn)lookup("fuse_reply_write");
    real_add_direntry_plus = (add_direntry_plus_fn)lookup("fuse_add_direntry_plus");
    real_add_direntry = (add_direntry_fn)lookup("fuse_add_direntry");
    real_reply_data = (reply_data_fn)lookup("fuse_reply_data");
    real_session_fd = (session_fd_fn)lookup("fuse_session_fd");
    real_session_mount = (session_mount_fn)lookup("fuse_session_mount");
    real_receive_buf = (receive_buf_fn)lookup("fuse_session_receive_buf");
    real_session_exit = (session_exit_fn)lookup("fuse_session_exit");
    real_version = (version_fn)lookup("fuse_version");
    py_save_thread = (save_thread_fn)dlsym(RTLD_DEFAULT, "PyEval_SaveThread");
    py_restore_thread = (restore_thread_fn)dlsym(RTLD_DEFAULT, "PyEval_RestoreThread");
    py_gil_check = (gil_check_fn)dlsym(RTLD_DEFAULT, "PyGILState_Check");
    fd_table_clear();
    real_pkgversion = (pkgversion_fn)lookup("fuse_pkgversion");
    pthread_atfork(rx_before_fork, rx_after_fork_parent, rx_after_fork_child);
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
