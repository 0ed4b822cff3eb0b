/* lot.c: idle established associations parked in C, for DtlsServer.
 *
 * A quiet peer costs the server Python objects (its _Peer, the engine
 * wrapper, the address, a timer entry: ~700 bytes, all tracked by the
 * cyclic GC) on top of the engine's own ~1 KB. Parked here it costs one
 * entry: the peer's address as bytes, when it was last heard from, what it
 * is counted as in the memory budget, and the association itself: on the
 * engine's record layer, exported (association.c) and sealed with the lot's
 * own random key, ~250 bytes, the pd_conn freed; otherwise (libssl's record
 * layer, or a last flight kept for a resend) the pd_conn as it is. The
 * server takes it back out (importing it, and building its Python objects
 * again) on its next datagram, a send() or any call that names it. The
 * export is a move with no sequence gap: the lot holds the only copy.
 *
 * Entries are found by key (the peer's address) and, for a peer with a
 * Connection ID, by that too, in hash tables keyed with a per-lot random
 * SipHash key (a peer chooses its address and CID), and kept in
 * a list ordered by last_seen, so the idle and eviction deadlines, the same
 * for every parked peer, are met by looking at the oldest only.
 * The lot owns what is parked: pd_lot_free frees (and cleanses) what is left.
 */
#include <stdint.h>
#include <openssl/rand.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

typedef struct pd_lot_entry {
    struct pd_lot_entry *hnext, *anext;   /* the next in its bucket, by key and by alt key */
    struct pd_lot_entry *older, *newer;   /* by last_seen */
    pd_conn *conn;                        /* NULL: the sealed association follows the keys */
    double last_seen;
    unsigned short key_len, alt_len, blob_len;
    unsigned char data[];                 /* key, alt key (a Connection ID), sealed association */
} pd_lot_entry;

typedef struct pd_lot {
    pd_lot_entry **buckets, **alts;       /* the same size, so they grow together */
    size_t mask;
    size_t count;
    pd_lot_entry *oldest, *newest;
    uint64_t k0, k1;
    SSL_CTX *ctx;                         /* borrowed: what imported associations belong to */
    unsigned int rto_initial_us, rto_max_us;
    unsigned char seal[36];               /* key id and key that seal parked associations */
} pd_lot;

#define PD_LOT_KEY_MAX 255
#define PD_LOT_MIN_BUCKETS 64

#define PD_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define PD_SIPROUND(v0, v1, v2, v3) do { \
    v0 += v1; v1 = PD_ROTL(v1, 13); v1 ^= v0; v0 = PD_ROTL(v0, 32); \
    v2 += v3; v3 = PD_ROTL(v3, 16); v3 ^= v2; \
    v0 += v3; v3 = PD_ROTL(v3, 21); v3 ^= v0; \
    v2 += v1; v1 = PD_ROTL(v1, 17); v1 ^= v2; v2 = PD_ROTL(v2, 32); } while (0)

/* SipHash-1-3: keys are short and a table only needs collisions to be unguessable
 * (the lot's, and fast.c's table of active peers) */
static uint64_t pd_siphash13(uint64_t k0, uint64_t k1, const unsigned char *p, size_t len)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    uint64_t m, b = (uint64_t)len << 56;
    size_t i, left = len & 7;

    for (i = 0; i + 8 <= len; i += 8) {
        memcpy(&m, p + i, 8);
        v3 ^= m;
        PD_SIPROUND(v0, v1, v2, v3);
        v0 ^= m;
    }
    for (m = 0; left > 0; left--)
        m |= (uint64_t)p[i + left - 1] << (8 * (left - 1));
    b |= m;
    v3 ^= b;
    PD_SIPROUND(v0, v1, v2, v3);
    v0 ^= b;
    v2 ^= 0xff;
    PD_SIPROUND(v0, v1, v2, v3);
    PD_SIPROUND(v0, v1, v2, v3);
    PD_SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

static pd_lot *pd_lot_new(SSL_CTX *ctx, unsigned int rto_initial_us, unsigned int rto_max_us)
{
    pd_lot *lot = calloc(1, sizeof(*lot));
    if (lot == NULL)
        return NULL;
    lot->ctx = ctx;
    lot->rto_initial_us = rto_initial_us;
    lot->rto_max_us = rto_max_us;
    lot->buckets = calloc(PD_LOT_MIN_BUCKETS, sizeof(*lot->buckets));
    lot->alts = calloc(PD_LOT_MIN_BUCKETS, sizeof(*lot->alts));
    if (lot->buckets == NULL || lot->alts == NULL
            || RAND_bytes((unsigned char *)&lot->k0, 8) != 1
            || RAND_bytes((unsigned char *)&lot->k1, 8) != 1
            || RAND_bytes(lot->seal, sizeof(lot->seal)) != 1) {
        ERR_clear_error();
        free(lot->buckets);
        free(lot->alts);
        free(lot);
        return NULL;
    }
    lot->mask = PD_LOT_MIN_BUCKETS - 1;
    return lot;
}

static size_t pd_lot_entry_size(const pd_lot_entry *e)
{
    return sizeof(*e) + e->key_len + e->alt_len + e->blob_len;
}

static void pd_lot_free(pd_lot *lot)
{
    pd_lot_entry *e, *next;
    if (lot == NULL)
        return;
    for (e = lot->oldest; e != NULL; e = next) {
        next = e->newer;
        pd_conn_free(e->conn);
        OPENSSL_cleanse(e, pd_lot_entry_size(e));
        free(e);
    }
    free(lot->buckets);
    free(lot->alts);
    OPENSSL_cleanse(lot->seal, sizeof(lot->seal));
    free(lot);
}

/* A sealed association is bound to the key it is parked under. */
static void pd_lot_binding(const unsigned char *key, size_t len, unsigned char out[32])
{
    SHA256(key, len, out);
}

static pd_lot_entry **pd_lot_slot(pd_lot *lot, const unsigned char *key, size_t len)
{
    pd_lot_entry **slot = &lot->buckets[pd_siphash13(lot->k0, lot->k1, key, len) & lot->mask];
    for (; *slot != NULL; slot = &(*slot)->hnext)
        if ((*slot)->key_len == len && memcmp((*slot)->data, key, len) == 0)
            break;
    return slot;
}

static pd_lot_entry **pd_lot_alt_slot(pd_lot *lot, const unsigned char *alt, size_t len)
{
    pd_lot_entry **slot = &lot->alts[pd_siphash13(lot->k0, lot->k1, alt, len) & lot->mask];
    for (; *slot != NULL; slot = &(*slot)->anext)
        if ((*slot)->alt_len == len && memcmp((*slot)->data + (*slot)->key_len, alt, len) == 0)
            break;
    return slot;
}

/* Rehash into tables of n buckets: doubled once they hold as many entries as
 * buckets, halved once a quarter (so an emptied lot gives its tables back); a
 * failed allocation keeps the old ones (other chain lengths, nothing lost). */
static void pd_lot_resize(pd_lot *lot, size_t n)
{
    pd_lot_entry **fresh = calloc(n, sizeof(*fresh)), **alts = calloc(n, sizeof(*alts)), *e;
    if (fresh == NULL || alts == NULL) {
        free(fresh);
        free(alts);
        return;
    }
    for (e = lot->oldest; e != NULL; e = e->newer) {
        size_t b = pd_siphash13(lot->k0, lot->k1, e->data, e->key_len) & (n - 1);
        e->hnext = fresh[b];
        fresh[b] = e;
        if (e->alt_len) {
            b = pd_siphash13(lot->k0, lot->k1, e->data + e->key_len, e->alt_len) & (n - 1);
            e->anext = alts[b];
            alts[b] = e;
        }
    }
    free(lot->buckets);
    free(lot->alts);
    lot->buckets = fresh;
    lot->alts = alts;
    lot->mask = n - 1;
}

/* What one parked entry costs, for the memory budget. */
static size_t pd_lot_entry_memory(const pd_lot_entry *e)
{
    return pd_chunk(pd_lot_entry_size(e)) + 2 * sizeof(pd_lot_entry *)
        + (e->conn != NULL ? pd_memory(e->conn) : 0);
}

/* Park conn under key (and alt, a Connection ID, when alt_len > 0), and take
 * ownership of it: the bytes it is counted as from now on. 0 when it cannot
 * be (no memory, a key too long, one already parked under either key, not
 * established): the caller still owns conn, unless the export went through
 * and the entry could not be allocated, which leaves conn failed. */
static size_t pd_lot_put(pd_lot *lot, const unsigned char *key, size_t len,
                         const unsigned char *alt, size_t alt_len, pd_conn *conn, double last_seen)
{
    unsigned char blob[PD_ASSOC_HEADER + PD_ASSOC_PLAIN_MAX + PD_ASSOC_TAG], binding[32];
    pd_lot_entry **slot, **aslot = NULL, *e, *at;
    long n = 0;
    if (len == 0 || len > PD_LOT_KEY_MAX || alt_len > PD_LOT_KEY_MAX || conn == NULL
            || conn->state != PD_STATE_ESTABLISHED)
        return 0;
    slot = pd_lot_slot(lot, key, len);
    if (*slot != NULL)
        return 0;
    if (alt_len) {
        aslot = pd_lot_alt_slot(lot, alt, alt_len);
        if (*aslot != NULL)
            return 0;
    }
    if (conn->rl != NULL && conn->rl->flight == NULL) {
        pd_lot_binding(key, len, binding);
        n = pd_export_association(conn, lot->seal + 4, lot->seal, binding, 0, blob, sizeof(blob));
        if (n < 0) {
            ERR_clear_error();
            n = 0;
        }
    }
    e = malloc(sizeof(*e) + len + alt_len + (size_t)n);
    if (e == NULL) {
        OPENSSL_cleanse(blob, (size_t)n);
        if (n > 0) /* exported, so gone from conn: the association ends here */
            conn->state = PD_STATE_FAILED;
        return 0;
    }
    e->key_len = (unsigned short)len;
    e->alt_len = (unsigned short)alt_len;
    e->blob_len = (unsigned short)n;
    memcpy(e->data, key, len);
    if (alt_len)
        memcpy(e->data + len, alt, alt_len);
    memcpy(e->data + len + alt_len, blob, (size_t)n);
    OPENSSL_cleanse(blob, (size_t)n);
    if (n > 0) {
        pd_conn_free(conn);
        conn = NULL;
    }
    e->conn = conn;
    e->last_seen = last_seen;
    e->hnext = e->anext = NULL;
    *slot = e;
    if (aslot != NULL)
        *aslot = e;
    /* in last_seen order: peers are parked in about that order, so from the newest end */
    for (at = lot->newest; at != NULL && at->last_seen > last_seen; at = at->older)
        ;
    e->older = at;
    e->newer = at != NULL ? at->newer : lot->oldest;
    if (e->newer != NULL)
        e->newer->older = e;
    else
        lot->newest = e;
    if (at != NULL)
        at->newer = e;
    else
        lot->oldest = e;
    if (++lot->count > lot->mask)
        pd_lot_resize(lot, (lot->mask + 1) * 2);
    return pd_lot_entry_memory(e);
}

/* Unpark e: its conn (imported if sealed; NULL only when that fails, which
 * takes memory running out), its key in key_out (PD_LOT_KEY_MAX bytes) when
 * asked; the entry is freed either way. */
static pd_conn *pd_lot_unlink(pd_lot *lot, pd_lot_entry *e, unsigned char *key_out,
                              size_t *key_len, double *last_seen, long long *mem)
{
    pd_lot_entry **slot = pd_lot_slot(lot, e->data, e->key_len);
    pd_conn *conn = e->conn;
    unsigned char binding[32];
    int err = 0;
    if (conn == NULL) {
        pd_lot_binding(e->data, e->key_len, binding);
        conn = pd_import_association(lot->ctx, lot->seal, 1, binding,
                                     e->data + e->key_len + e->alt_len, e->blob_len,
                                     lot->rto_initial_us, lot->rto_max_us, &err);
        ERR_clear_error();
    }
    *slot = e->hnext;
    if (e->alt_len) {
        slot = pd_lot_alt_slot(lot, e->data + e->key_len, e->alt_len);
        *slot = e->anext;
    }
    if (e->older != NULL)
        e->older->newer = e->newer;
    else
        lot->oldest = e->newer;
    if (e->newer != NULL)
        e->newer->older = e->older;
    else
        lot->newest = e->older;
    lot->count--;
    if (lot->mask + 1 > PD_LOT_MIN_BUCKETS && lot->count < (lot->mask + 1) / 4)
        pd_lot_resize(lot, (lot->mask + 1) / 2);
    if (key_out != NULL) {
        memcpy(key_out, e->data, e->key_len);
        *key_len = e->key_len;
    }
    *last_seen = e->last_seen;
    *mem = (long long)pd_lot_entry_memory(e); /* as at pd_lot_put: nothing parked changes */
    OPENSSL_cleanse(e, pd_lot_entry_size(e));
    free(e);
    return conn;
}

/* Take the conn parked under key, or under alt key when by_alt (the caller
 * owns it again; the key it was parked under goes to key_out when asked), or
 * NULL: none there (the count is unchanged) or lost (see pd_lot_unlink). */
static pd_conn *pd_lot_take(pd_lot *lot, int by_alt, const unsigned char *key, size_t len,
                            unsigned char *key_out, size_t *key_len,
                            double *last_seen, long long *mem)
{
    pd_lot_entry *e;
    if (len == 0 || len > PD_LOT_KEY_MAX)
        return NULL;
    e = by_alt ? *pd_lot_alt_slot(lot, key, len) : *pd_lot_slot(lot, key, len);
    return e == NULL ? NULL : pd_lot_unlink(lot, e, key_out, key_len, last_seen, mem);
}

static int pd_lot_has(pd_lot *lot, const unsigned char *key, size_t len)
{
    return len > 0 && len <= PD_LOT_KEY_MAX && *pd_lot_slot(lot, key, len) != NULL;
}

/* The oldest parked peer's last_seen, or -1 when the lot is empty. */
static double pd_lot_oldest_seen(const pd_lot *lot)
{
    return lot->oldest != NULL ? lot->oldest->last_seen : -1.0;
}

/* Take the oldest parked conn if it was last seen at or before `until`, its
 * key in key_out. NULL: none that old (the count is unchanged), or lost. */
static pd_conn *pd_lot_take_oldest(pd_lot *lot, double until, unsigned char *key_out,
                                   size_t *key_len, double *last_seen, long long *mem)
{
    pd_lot_entry *e = lot->oldest;
    if (e == NULL || e->last_seen > until)
        return NULL;
    return pd_lot_unlink(lot, e, key_out, key_len, last_seen, mem);
}

static size_t pd_lot_count(const pd_lot *lot)
{
    return lot->count;
}

/* Give freed heap pages back to the system (glibc keeps them otherwise). */
static void pd_trim_heap(void)
{
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}
