/* fast.c: DtlsServer's established peers on the engine's record layer, by raw
 * sockaddr, for the batched socket surfaces.
 *
 * Once a peer is established, most of its datagrams are one or more
 * application_data records, and most of its sends are one record. Done one
 * Python call at a time, those cost the server several times the crypto.
 * Here a whole recvmmsg batch is looked up, decrypted and laid out as
 * records (peer id, end offset) in one call, and every queued record of
 * every peer written through pd_fast_write leaves in as few sendmmsg calls
 * as it takes, one datagram per peer per round. Anything else (a stranger, a
 * handshake record, a CID record with another peer's CID, an association whose buffers were
 * released or that is not on the engine's record layer) stops the batch
 * untouched and the server's Python path takes that datagram: every rule
 * lives there once, and this only ever does what it would do.
 *
 * Slots are stable ids the server keeps beside its peers. The table borrows
 * each pd_conn: the server drops the slot before a peer's conn can go (when
 * it forgets the peer, moves it, or starts a replacement handshake). A slot
 * dropped while it waits to send keeps its id until the ring passes it.
 */
#define PD_FAST_ADDR 28            /* PD_IO_ADDR_LEN: a sockaddr_in6, zero-padded */
#define PD_FAST_CHUNK 64           /* datagrams per sendmmsg */
#define PD_FAST_SLOW (-100)        /* not for this path: the server's Python path takes it */
#define PD_FAST_FULL (-101)        /* past the caller's queue limit */
#define PD_FAST_NOT_ENGINE (-102)  /* pd_fast_put: not on the engine's record layer */

/* why pd_fast_input stopped (status[1]) */
#define PD_FAST_DONE 0
#define PD_FAST_UNTOUCHED 1        /* datagram [ret] was not fed: feed it the usual way */
#define PD_FAST_ROOM 2             /* out of room for records: take them, call again at [ret] */
#define PD_FAST_FED 3              /* datagram [ret] was fed (its records are out): the state
                                      changed or output came; status[2] = the slot */

typedef struct pd_fast_slot {
    pd_conn *conn;                 /* borrowed; NULL once dropped */
    unsigned char addr[PD_FAST_ADDR];
    unsigned char dirty, dropped;
} pd_fast_slot;

typedef struct pd_fast {
    uint64_t k0, k1;
    pd_fast_slot *slots;
    int nslots, slots_cap;
    int *free_ids;
    int nfree;
    int *index;                    /* open addressing: slot id, -1 empty, -2 deleted */
    size_t mask, used, live;       /* used counts deleted entries too */
    int *ring;                     /* slots waiting to send, oldest first */
    size_t ring_head, ring_len, ring_cap;
    /* datagrams pulled but not yet taken by the kernel (the socket buffer was full) */
    unsigned char *pend;
    size_t pend_cap, pend_used;
    int pend_n, pend_first;
    int pend_lens[PD_FAST_CHUNK];
    unsigned char pend_addrs[PD_FAST_CHUNK][PD_FAST_ADDR];
} pd_fast;

static pd_fast *pd_fast_new(void)
{
    pd_fast *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return NULL;
    f->index = malloc(64 * sizeof(int));
    if (f->index == NULL || RAND_bytes((unsigned char *)&f->k0, 8) != 1
            || RAND_bytes((unsigned char *)&f->k1, 8) != 1) {
        ERR_clear_error();
        free(f->index);
        free(f);
        return NULL;
    }
    memset(f->index, 0xff, 64 * sizeof(int));
    f->mask = 63;
    return f;
}

static void pd_fast_free(pd_fast *f)
{
    if (f == NULL)
        return;
    if (f->pend != NULL)
        OPENSSL_cleanse(f->pend, f->pend_cap);  /* ciphertext, but no need to leave it */
    free(f->pend);
    free(f->slots);
    free(f->free_ids);
    free(f->index);
    free(f->ring);
    free(f);
}

static size_t pd_fast_probe(const pd_fast *f, const unsigned char *addr)
{
    return pd_siphash13(f->k0, f->k1, addr, PD_FAST_ADDR) & f->mask;
}

/* The index position holding addr, or where it would go (-1 when absent). */
static int pd_fast_find(const pd_fast *f, const unsigned char *addr, size_t *where)
{
    size_t i = pd_fast_probe(f, addr), spare = (size_t)-1;
    for (;; i = (i + 1) & f->mask) {
        int id = f->index[i];
        if (id == -1) {
            *where = spare != (size_t)-1 ? spare : i;
            return -1;
        }
        if (id == -2) {
            if (spare == (size_t)-1)
                spare = i;
        } else if (memcmp(f->slots[id].addr, addr, PD_FAST_ADDR) == 0) {
            *where = i;
            return id;
        }
    }
}

static int pd_fast_rehash(pd_fast *f, size_t n)
{
    int *index = malloc(n * sizeof(int)), id;
    if (index == NULL)
        return 0;
    memset(index, 0xff, n * sizeof(int));
    free(f->index);
    f->index = index;
    f->mask = n - 1;
    f->used = f->live;
    for (id = 0; id < f->nslots; id++) {
        size_t i;
        if (f->slots[id].conn == NULL)
            continue;
        for (i = pd_fast_probe(f, f->slots[id].addr); index[i] != -1; i = (i + 1) & f->mask)
            ;
        index[i] = id;
    }
    return 1;
}

static int pd_fast_new_id(pd_fast *f)
{
    if (f->nfree > 0)
        return f->free_ids[--f->nfree];
    if (f->nslots == f->slots_cap) {
        int cap = f->slots_cap ? 2 * f->slots_cap : 64;
        pd_fast_slot *slots = realloc(f->slots, (size_t)cap * sizeof(*slots));
        int *ids;
        if (slots == NULL)
            return -1;
        f->slots = slots;
        if ((ids = realloc(f->free_ids, (size_t)cap * sizeof(int))) == NULL)
            return -1;
        f->free_ids = ids;
        f->slots_cap = cap;
    }
    return f->nslots++;
}

/* Route datagrams from addr to conn; the slot id, -1 out of memory, or
 * PD_FAST_NOT_ENGINE. An address already here is given the new conn. */
static int pd_fast_put(pd_fast *f, const unsigned char *addr, pd_conn *conn)
{
    size_t where;
    int id;
    if (conn->rl == NULL)
        return PD_FAST_NOT_ENGINE;
    if ((id = pd_fast_find(f, addr, &where)) >= 0) {
        f->slots[id].conn = conn;
        return id;
    }
    if (2 * (f->used + 1) > f->mask + 1) {
        size_t n = f->mask + 1;
        while (4 * (f->live + 1) > n)
            n *= 2;
        if (!pd_fast_rehash(f, n))
            return -1;
        pd_fast_find(f, addr, &where);
    }
    if ((id = pd_fast_new_id(f)) < 0)
        return -1;
    memcpy(f->slots[id].addr, addr, PD_FAST_ADDR);
    f->slots[id].conn = conn;
    f->slots[id].dirty = f->slots[id].dropped = 0;
    if (f->index[where] == -1)
        f->used++;
    f->index[where] = id;
    f->live++;
    return id;
}

static void pd_fast_release_id(pd_fast *f, int id)
{
    f->slots[id].dropped = 0;
    f->free_ids[f->nfree++] = id;
}

/* Forget slot id (its conn is the caller's again). */
static void pd_fast_drop(pd_fast *f, int id)
{
    pd_fast_slot *s;
    size_t where;
    if (id < 0 || id >= f->nslots || f->slots[id].conn == NULL)
        return;
    s = &f->slots[id];
    if (pd_fast_find(f, s->addr, &where) == id) {
        f->index[where] = -2;
        f->live--;
        if (f->mask + 1 > 64 && 8 * f->live < f->mask + 1) {  /* a burst has passed: shrink */
            size_t n = 64;
            while (n < 4 * f->live)
                n *= 2;
            s->conn = NULL;  /* not put back by the rehash */
            pd_fast_rehash(f, n);  /* out of memory: the larger index stays */
        }
    }
    s->conn = NULL;
    if (s->dirty)
        s->dropped = 1;  /* the ring still names it: freed when passed */
    else
        pd_fast_release_id(f, id);
}

static size_t pd_fast_count(const pd_fast *f)
{
    return f->live;
}

/* A CID record (RFC 9146) stays here only when it carries the CID of the
 * association at its sender's address; any other goes to the server's CID
 * routing, which may move a peer. Other records pass. */
static int pd_fast_own_cid(const pd_conn *c, const unsigned char *d, size_t len)
{
    size_t cl;
    if (d[0] != PD_RT_CID)
        return 1;
    cl = pd_cid_in_len(c);
    return cl > 0 && len >= PD_RECORD_HEADER + cl && memcmp(d + 11, c->cid->id, cl) == 0;
}

/* Decrypt datagrams [start, n) of a pd_io_recv batch for the peers here.
 * Each application record goes to out, back to back: ends[k] is where
 * record k ends, ids[k] its slot (room for cap records and out_cap bytes).
 * Returns the index where it stopped, status[0] = records out, status[1] =
 * why (PD_FAST_*), status[2] = the slot for PD_FAST_FED. */
static int pd_fast_input(pd_fast *f, const char *arena, const int *offs, const int *lens,
                         const unsigned char *addrs, int start, int n, char *out, size_t out_cap,
                         size_t *ends, int *ids, int cap, int *status)
{
    pd_sink sink = { out, out_cap, 0, ends, 0 };
    int i, fed = 0;
    status[1] = PD_FAST_DONE;
    for (i = start; i < n; i++) {
        const unsigned char *d = (const unsigned char *)arena + offs[i];
        size_t len = (size_t)lens[i], where, out_before;
        long k;
        int id = len > PD_RECORD_HEADER && (d[0] == SSL3_RT_APPLICATION_DATA || d[0] == PD_RT_CID)
                 ? pd_fast_find(f, addrs + (size_t)i * PD_FAST_ADDR, &where) : -1;
        pd_conn *c = id >= 0 ? f->slots[id].conn : NULL;
        if (c == NULL || c->rl == NULL || c->state != PD_STATE_ESTABLISHED
                || c->buffers_released || c->plain_head != NULL || !pd_fast_own_cid(c, d, len)) {
            status[1] = PD_FAST_UNTOUCHED;
            break;
        }
        if (out_cap - sink.used < len || (size_t)(cap - sink.count) < len / PD_RECORD_HEADER + 1) {
            status[1] = PD_FAST_ROOM;
            break;
        }
        k = sink.count;
        out_before = c->out_len;
        pd_rl_feed(c, d, len, &sink);
        fed = 1;
        for (; k < sink.count; k++)
            ids[k] = id;
        if (c->state != PD_STATE_ESTABLISHED || c->out_len != out_before) {
            status[1] = PD_FAST_FED;
            status[2] = id;
            break;
        }
    }
    if (fed)
        pd_clear_errors();
    status[0] = (int)sink.count;
    return i;
}

/* Room in the ring for one more slot; 0 out of memory. */
static int pd_fast_ring_room(pd_fast *f)
{
    size_t cap, j;
    int *ring;
    if (f->ring_len < f->ring_cap)
        return 1;
    cap = f->ring_cap ? 2 * f->ring_cap : 64;
    if ((ring = malloc(cap * sizeof(int))) == NULL)
        return 0;
    for (j = 0; j < f->ring_len; j++)
        ring[j] = f->ring[(f->ring_head + j) % f->ring_cap];
    free(f->ring);
    f->ring = ring;
    f->ring_cap = cap;
    f->ring_head = 0;
    return 1;
}

/* Queue slot id to send (the caller made room, or popped it from the ring). */
static void pd_fast_mark(pd_fast *f, int id)
{
    if (f->slots[id].dirty)
        return;
    f->ring[(f->ring_head + f->ring_len++) % f->ring_cap] = id;
    f->slots[id].dirty = 1;
}

/* The next slot waiting to send whose conn is still here, or -1. */
static int pd_fast_next_dirty(pd_fast *f)
{
    while (f->ring_len > 0) {
        int id = f->ring[f->ring_head];
        f->ring_head = (f->ring_head + 1) % f->ring_cap;
        f->ring_len--;
        f->slots[id].dirty = 0;
        if (f->slots[id].conn != NULL)
            return id;
        if (f->slots[id].dropped)
            pd_fast_release_id(f, id);
    }
    return -1;
}

/* One record to slot id's peer, queued for pd_fast_send: the bytes written,
 * PD_FAST_FULL past max_queued bytes waiting, or PD_FAST_SLOW (nothing
 * written: the server's Python path decides, and raises what it must). */
static int pd_fast_write(pd_fast *f, int id, const char *data, size_t len, size_t max_queued)
{
    pd_conn *c = id >= 0 && id < f->nslots ? f->slots[id].conn : NULL;
    int r;
    if (c == NULL || c->rl == NULL || c->state != PD_STATE_ESTABLISHED || c->buffers_released
            || len == 0 || len > c->max_plaintext)
        return PD_FAST_SLOW;
    if (c->out_len + len > max_queued)
        return PD_FAST_FULL;
    if (!f->slots[id].dirty && !pd_fast_ring_room(f))
        return PD_FAST_SLOW;
    r = pd_rl_seal(c, SSL3_RT_APPLICATION_DATA, data, len);
    if (r < 0)
        return PD_FAST_SLOW;
    pd_fast_mark(f, id);
    return r;
}

/* Slots waiting to send, handed to the caller (which pulls them itself). */
static int pd_fast_take_dirty(pd_fast *f, int *ids, int cap)
{
    int n = 0, id;
    while (n < cap && (id = pd_fast_next_dirty(f)) >= 0)
        ids[n++] = id;
    return n;
}

static size_t pd_fast_waiting(const pd_fast *f)
{
    return f->ring_len + (size_t)f->pend_n;
}

#if defined(__linux__)
/* Send the pending datagrams [pend_first, pend_n); 1 when all went, 0 at a
 * full socket buffer, -errno on a socket error. Refused ones are counted. */
static int pd_fast_send_pending(pd_fast *f, int fd, int *stats)
{
    struct mmsghdr msgs[PD_FAST_CHUNK];
    struct iovec iov[PD_FAST_CHUNK];
    size_t off = 0;
    int j, m = 0;
    for (j = 0; j < f->pend_n; j++) {
        if (j >= f->pend_first) {
            memset(&msgs[m], 0, sizeof(msgs[m]));
            iov[m].iov_base = f->pend + off;
            iov[m].iov_len = (size_t)f->pend_lens[j];
            msgs[m].msg_hdr.msg_iov = &iov[m];
            msgs[m].msg_hdr.msg_iovlen = 1;
            msgs[m].msg_hdr.msg_name = f->pend_addrs[j];
            msgs[m].msg_hdr.msg_namelen = pd_io_namelen(f->pend_addrs[j]);
            m++;
        }
        off += (size_t)f->pend_lens[j];
    }
    j = 0;
    while (j < m) {
        int sent;
        do {
            sent = sendmmsg(fd, msgs + j, (unsigned int)(m - j), MSG_DONTWAIT);
        } while (sent < 0 && errno == EINTR);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                f->pend_first += j;
                return 0;
            }
            if (errno == EBADF || errno == ENOTSOCK || errno == EINVAL)
                return -errno;
            stats[1]++;  /* this one refused (an ICMP error, a bad address): skipped */
            j++;
            continue;
        }
        stats[0] += sent;
        j += sent;
    }
    f->pend_n = f->pend_first = 0;
    f->pend_used = 0;
    return 1;
}

/* Everything queued through pd_fast_write, out: one datagram per peer per
 * round, PD_FAST_CHUNK per sendmmsg. stats[0] = datagrams sent, stats[1] =
 * refused by the kernel, stats[2] = records larger than the MTU dropped.
 * Returns 1 when nothing is left, 0 when the socket buffer filled (the rest
 * wait here: call again once the socket is writable), or -errno. */
static int pd_fast_send(pd_fast *f, int fd, int *stats)
{
    stats[0] = stats[1] = stats[2] = 0;
    for (;;) {
        int r, id;
        if (f->pend_n > 0 && (r = pd_fast_send_pending(f, fd, stats)) <= 0)
            return r;
        while (f->pend_n < PD_FAST_CHUNK && (id = pd_fast_next_dirty(f)) >= 0) {
            pd_fast_slot *s = &f->slots[id];
            pd_conn *c = s->conn;
            long n;
            if (f->pend_used + c->mtu > f->pend_cap) {  /* room for a datagram before pulling it */
                size_t cap = f->pend_cap ? f->pend_cap : 16384;
                unsigned char *p;
                while (cap < f->pend_used + c->mtu)
                    cap *= 2;
                if ((p = realloc(f->pend, cap)) == NULL) {
                    pd_fast_mark(f, id);  /* out of memory: it stays queued in its conn */
                    break;
                }
                f->pend = p;
                f->pend_cap = cap;
            }
            n = pd_pull(c);
            if (n < 0) {
                stats[2]++;
            } else if (n > 0) {
                memcpy(f->pend + f->pend_used, c->data, (size_t)n);
                f->pend_used += (size_t)n;
                f->pend_lens[f->pend_n] = (int)n;
                memcpy(f->pend_addrs[f->pend_n], s->addr, PD_FAST_ADDR);
                f->pend_n++;
            }
            if (n != 0 && c->out_len > 0)  /* (nothing pulled: nothing whole left, as pd_pull says) */
                pd_fast_mark(f, id);  /* more for this peer: after the others */
        }
        if (f->pend_n == 0)
            return 1;
    }
}
#else
static int pd_fast_send(pd_fast *f, int fd, int *stats)
{
    (void)f; (void)fd;
    stats[0] = stats[1] = stats[2] = 0;
    return -ENOSYS;
}
#endif
