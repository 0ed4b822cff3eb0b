/*
 * pydtls_ossl C helpers: one association's datagram BIO and the engine's
 * hot paths, so that each public engine call is one call into C.
 *
 * A pd_conn owns its SSL; the SSL owns the one BIO used for both directions;
 * the BIO borrows the pd_conn. Nothing here does I/O or reads a clock.
 */
#include <stdlib.h>
#include <string.h>
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/crypto.h>
#include <openssl/srtp.h>
#include <openssl/tls1.h>
#include <time.h>

#define PD_STATE_NEW 0
#define PD_STATE_HANDSHAKING 1
#define PD_STATE_ESTABLISHED 2
#define PD_STATE_PEER_CLOSED 3
#define PD_STATE_FAILED 4
#define PD_STATE_CLOSED 5
#define PD_STATE_EXPORTED 6

#define PD_ERR_SSL -1
#define PD_ERR_TOO_BIG -2
#define PD_ERR_STATE -3
#define PD_ERR_NOMEM -4
#define PD_ERR_OVERSIZE -5
#define PD_NEW_HELLO -6

#define PD_RECORD_HEADER 13
#define PD_MAX_PLAINTEXT 16384
#define PD_MAX_PINS 8
#define PD_MAX_EARLY 32
#define PD_MAX_EARLY_BYTES 16384
#define PD_MAX_EPOCH1_PER_CCS 4
#define PD_MAX_RECORD (PD_MAX_PLAINTEXT + 2048)
#define PD_RT_CID 25                 /* tls12_cid records (RFC 9146) */
#define PD_CID_EXT 54
#define PD_CID_MAX 255

typedef struct pd_node {
    struct pd_node *next;
    size_t len;
    unsigned char data[];
} pd_node;

typedef struct pd_pin {
    const EVP_MD *md;
    unsigned int len;
    unsigned char digest[EVP_MAX_MD_SIZE];
} pd_pin;

typedef struct pd_conn {
    SSL *ssl;
    int state;
    int is_server;
    int ssl_error;
    int alert_received;
    int alert_sent;
    int pin_mismatch;
    int accept_any_certificate;
    int buffers_released;
    int require_srtp;
    int srtp_refused;
    unsigned int mtu;
    unsigned int rto_initial_us;
    unsigned int rto_max_us;
    size_t max_plaintext;
    const char *data;
    size_t plain_count;
    size_t plain_bytes;
    size_t plain_limit;
    unsigned long long plain_dropped;
    /* outgoing: a run of whole DTLS records, packed into datagrams by pd_pull */
    unsigned char *out;
    size_t out_off, out_len, out_cap;
    /* incoming: the datagram of the current pd_feed (borrowed), then copies */
    const unsigned char *in_ptr;
    size_t in_len;
    pd_node *in_head, *in_tail;
    /* plaintext records read but not yet taken by pd_read */
    pd_node *plain_head, *plain_tail;
    pd_node *taken;
    int npins;
    pd_pin *pins;
    /* single-engine cookie exchange: borrowed keys and the peer's address */
    const pd_cookie_keys *cookies;
    unsigned char *peer;             /* malloc'd, only in cookie mode */
    size_t peer_len;
    unsigned int peer_port;
    /* the engine's own record layer (records.c), once the handshake is done */
    int compact;                     /* hand the records over when it finishes */
    struct pd_rl *rl;                /* set once handed over; ssl is then NULL */
    unsigned long long sent_next[2]; /* next sequence number at epochs 0 and 1 */
    pd_node *early;                  /* protected records received before then */
    int early_count;
    /* the application's say on the peer (a cffi handle), asked inside the handshake */
    void *verify_hook;
    int hook_refused;                /* 1: certificate refused, 2: PSK identity refused */
    int hook_accepted;               /* asked once: OpenSSL may verify the leaf twice */
    /* the handshake deadline (monotonic ns, 0: none) and what it reports */
    unsigned long long handshake_timeout_ns;
    unsigned long long deadline_ns;
    int deadline_passed;
    unsigned int protected_seen;     /* peer records at epoch >= 1 before the handshake ended */
    int keep_session;                /* a client keeps its session's bytes past the handover */
    int keep_peer_cert;              /* an idle association keeps the peer's DER, not only its digest */
    /* what unauthenticated input may cost before the handshake ends */
    size_t max_hs_msg;               /* the largest handshake message accepted */
    unsigned int epoch1_since_ccs;   /* epoch-1 records given to libssl since the peer's last CCS */
    size_t early_bytes;              /* bytes of retained early records */
    /* libssl's record layer after the handshake: the shortest protected record */
    size_t min_protected;
    size_t out_mark;                 /* where output written after OpenSSL last read begins */
    struct pd_cid *cid;              /* Connection ID (cid.c), NULL unless offered */
} pd_conn;

/* Where pd_rl_feed puts application data: the plaintext queue (no sink),
 * or (batch) straight into the caller's buffer. */
typedef struct pd_sink {
    char *out;
    size_t cap, used;
    size_t *ends;
    long count;
} pd_sink;
struct pd_rl;
static int pd_records_init(void);
static int pd_sessions_init(void);
static long pd_session_der(SSL_SESSION *session, unsigned char **out);
static void pd_rl_free(struct pd_rl *rl);
static long pd_rl_feed(pd_conn *c, const unsigned char *d, size_t n, pd_sink *sink);
static int pd_rl_seal(pd_conn *c, int type, const void *data, size_t len);
static void pd_rl_idle(struct pd_rl *rl);
static void pd_rl_drop_peer_der(struct pd_rl *rl);
static void pd_rl_alert(pd_conn *c, int level, int description);
static void pd_note_sent(pd_conn *c, const unsigned char *r);
static int pd_retain_early(pd_conn *c, const unsigned char *d, size_t n);
static size_t pd_min_protected(const SSL_CIPHER *cipher);
static void pd_handover(pd_conn *c, size_t flight_start, size_t flight_len);
/* Connection ID state (cid.c), allocated only when offered. */
struct pd_cid {
    struct pd_rl *xl;            /* epoch-1 keys while libssl runs the handshake */
    unsigned int padding;        /* pad the inner plaintext to a multiple of this (0, 1: none) */
    int negotiated;              /* both hellos carried the extension */
    int peer_offered;            /* a server saw it in the ClientHello */
    int failed;                  /* a record could not be translated: why the handshake failed */
    int advanced;                /* the last datagram authenticated a record newer than any before */
    unsigned char rx_len, tx_len;
    unsigned char id[];          /* rx (ours, in records we receive), then tx (the peer's) */
};
static size_t pd_cid_out_len(const pd_conn *c);
static size_t pd_cid_in_len(const pd_conn *c);
static size_t pd_rec_size(const unsigned char *r, size_t avail, size_t cl);
static int pd_cid_write(pd_conn *c, const unsigned char *in, size_t n);
static int pd_cid_feed(pd_conn *c, const unsigned char *data, size_t len);
static void pd_cid_free(struct pd_cid *cid);
static void pd_cid_overhead(pd_conn *c);
static void pd_cid_fail(pd_conn *c);
static void pd_cid_handshake_done(pd_conn *c);
static int pd_feed_ssl(pd_conn *c, const unsigned char *data, size_t len);
static EVP_CIPHER_CTX *pd_raw_new(const struct pd_rl *rl, const unsigned char *key, int enc);
static size_t pd_raw_size(const struct pd_rl *rl, size_t cl, unsigned int padding, size_t len);
static size_t pd_raw_seal(const struct pd_rl *rl, EVP_CIPHER_CTX *ctx, const unsigned char *iv,
                          const unsigned char *cid, size_t cl, unsigned int padding, int type,
                          unsigned int epoch, unsigned long long seq, const void *data,
                          size_t len, unsigned char *r);
static long pd_raw_open(const struct pd_rl *rl, EVP_CIPHER_CTX *ctx, const unsigned char *iv,
                        size_t cl, const unsigned char *r, size_t tot, unsigned char *dst,
                        int *type);

static BIO_METHOD *pd_bio_method = NULL;

/* SSL_get_error needs an empty queue; peeking is cheaper than clearing. */
static inline void pd_clear_errors(void)
{
    if (ERR_peek_error() != 0)
        ERR_clear_error();
}
static int pd_ex_index = -1;
static __thread unsigned char pd_scratch[PD_MAX_PLAINTEXT + 64]; /* a record's plaintext, or a whole protected one */

/* A closed engine points here, so every call on it is a cheap no-op. */
static pd_conn pd_dead = {
    .state = PD_STATE_CLOSED, .alert_received = -1, .alert_sent = -1,
};

static pd_node *pd_node_new(const void *data, size_t len)
{
    pd_node *n = malloc(sizeof(pd_node) + len);
    if (n == NULL)
        return NULL;
    n->next = NULL;
    n->len = len;
    memcpy(n->data, data, len);
    return n;
}

static void pd_nodes_free(pd_node *n)
{
    while (n != NULL) {
        pd_node *next = n->next;
        free(n);
        n = next;
    }
}

/* ---------------------------------------------------------------- BIO */

/* Room for len more bytes at the end of the output run. */
static int pd_out_reserve(pd_conn *c, size_t len)
{
    size_t need = c->out_len + len;
    if (c->out_off + need > c->out_cap) {
        if (c->out_off != 0) {
            memmove(c->out, c->out + c->out_off, c->out_len);
            c->out_off = 0;
        }
        if (need > c->out_cap) {
            size_t cap = c->out_cap ? c->out_cap * 2 : 2048;
            unsigned char *p;
            while (cap < need)
                cap *= 2;
            p = realloc(c->out, cap);
            if (p == NULL)
                return 0;
            c->out = p;
            c->out_cap = cap;
        }
    }
    return 1;
}

static int pd_out_append(pd_conn *c, const void *in, size_t len)
{
    if (!pd_out_reserve(c, len))
        return 0;
    memcpy(c->out + c->out_off + c->out_len, in, len);
    c->out_len += len;
    return 1;
}

static int pd_bio_write(BIO *b, const char *in, int inl)
{
    pd_conn *c = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (c == NULL || inl <= 0)
        return 0;
    if (pd_cid_out_len(c) > 0 && c->rl == NULL) /* libssl's epoch-1 records become CID records */
        return pd_cid_write(c, (const unsigned char *)in, (size_t)inl) ? inl : -1;
    return pd_out_append(c, in, (size_t)inl) ? inl : -1;
}

static int pd_bio_read(BIO *b, char *out, int outl)
{
    pd_conn *c = BIO_get_data(b);
    const unsigned char *src;
    pd_node *node = NULL;
    size_t n;

    BIO_clear_retry_flags(b);
    if (c == NULL || outl <= 0)
        return 0;
    /* What OpenSSL writes after reading input answers it: a later flight than
     * what it wrote before (a retransmission, say). pd_pull keeps them in
     * separate datagrams, since a peer may drop the rest of a datagram that
     * begins with a stale message. */
    if (c->in_ptr != NULL || c->in_head != NULL)
        c->out_mark = c->out_len;
    if (c->in_ptr != NULL) {
        src = c->in_ptr;
        n = c->in_len;
        c->in_ptr = NULL;
    } else if (c->in_head != NULL) {
        node = c->in_head;
        c->in_head = node->next;
        if (c->in_head == NULL)
            c->in_tail = NULL;
        src = node->data;
        n = node->len;
    } else {
        BIO_set_retry_read(b);
        return -1;
    }
    /* A datagram larger than OpenSSL's read buffer loses its tail; the cut
     * record then fails its length check and is dropped, as RFC 6347 asks. */
    if (n > (size_t)outl)
        n = (size_t)outl;
    memcpy(out, src, n);
    free(node);
    return (int)n;
}

static long pd_bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    pd_conn *c = BIO_get_data(b);
    (void)num;
    (void)ptr;
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_CTRL_PENDING:
        if (c == NULL)
            return 0;
        if (c->in_ptr != NULL)
            return (long)c->in_len;
        return c->in_head ? (long)c->in_head->len : 0;
    case BIO_CTRL_DGRAM_QUERY_MTU:
        return c ? (long)c->mtu : 0;
    default:
        /* WPENDING answers 0: pd_pull repacks records, so OpenSSL must not
         * shrink its fragments for bytes the application has not pulled. */
        return 0;
    }
}

static int pd_bio_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static int pd_bio_destroy(BIO *b)
{
    BIO_set_data(b, NULL);
    BIO_set_init(b, 0);
    return 1;
}

/* ---------------------------------------------------------- callbacks */

static pd_conn *pd_from_ssl(const SSL *s)
{
    return s ? SSL_get_ex_data(s, pd_ex_index) : NULL;
}

static unsigned int pd_timer_cb(SSL *s, unsigned int timer_us)
{
    pd_conn *c = pd_from_ssl(s);
    unsigned long long next;
    if (c == NULL)
        return timer_us ? timer_us * 2 : 1000000;
    if (timer_us == 0)
        return c->rto_initial_us;
    next = (unsigned long long)timer_us * 2;
    if (next > c->rto_max_us)
        next = c->rto_max_us;
    return (unsigned int)next;
}

static void pd_info_cb(const SSL *s, int where, int ret)
{
    pd_conn *c;
    if (!(where & SSL_CB_ALERT))
        return;
    c = pd_from_ssl(s);
    if (c == NULL)
        return;
    if (where & SSL_CB_READ)
        c->alert_received = ret;
    else
        c->alert_sent = ret;
}

static int pd_verify_hook_cb(void *hook, const unsigned char *der, int der_len);

/* The application's verify_peer hook on the leaf certificate: 1 accepts. */
static int pd_ask_hook(pd_conn *c, X509 *cert)
{
    unsigned char *der = NULL;
    int len, ok;
    if (c->verify_hook == NULL || c->hook_accepted)
        return 1;
    if (c->hook_refused)
        return 0;
    len = cert != NULL ? i2d_X509(cert, &der) : -1;
    ok = len > 0 && pd_verify_hook_cb(c->verify_hook, der, len);
    OPENSSL_free(der);
    if (ok)
        c->hook_accepted = 1;
    else
        c->hook_refused = 1;
    return ok;
}

static int pd_verify_cb(int preverify_ok, X509_STORE_CTX *store)
{
    SSL *s = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
    pd_conn *c = pd_from_ssl(s);
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len;
    X509 *cert;
    int i;

    if (c == NULL)
        return preverify_ok;
    if (c->npins == 0) {
        if (c->accept_any_certificate) {
            if (X509_STORE_CTX_get_error_depth(store) == 0
                    && !pd_ask_hook(c, X509_STORE_CTX_get_current_cert(store))) {
                X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
                return 0;
            }
            X509_STORE_CTX_set_error(store, X509_V_OK);
            return 1;
        }
        if (preverify_ok && X509_STORE_CTX_get_error_depth(store) == 0
                && !pd_ask_hook(c, X509_STORE_CTX_get_current_cert(store))) {
            X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
            return 0;
        }
        return preverify_ok;
    }
    /* Pinned: the leaf's digest is the trust anchor; chain errors do not count. */
    if (X509_STORE_CTX_get_error_depth(store) > 0) {
        X509_STORE_CTX_set_error(store, X509_V_OK);
        return 1;
    }
    cert = X509_STORE_CTX_get_current_cert(store);
    for (i = 0; cert != NULL && i < c->npins; i++) {
        if (X509_digest(cert, c->pins[i].md, digest, &len) == 1
                && len == c->pins[i].len
                && CRYPTO_memcmp(digest, c->pins[i].digest, len) == 0) {
            if (!pd_ask_hook(c, cert)) {
                X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
                return 0;
            }
            X509_STORE_CTX_set_error(store, X509_V_OK);
            return 1;
        }
    }
    c->pin_mismatch = 1;
    X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
    return 0;
}

/* A server that requires DTLS-SRTP refuses, inside the handshake and with
 * handshake_failure, a ClientHello offering no profile it supports. */
static int pd_srtp_hello_cb(SSL *s, int *al, void *arg)
{
    STACK_OF(SRTP_PROTECTION_PROFILE) *ours = SSL_get_srtp_profiles(s);
    const unsigned char *ext;
    size_t len, list, i;
    int j;
    pd_conn *c;
    (void)arg;
    if (ours != NULL
            && SSL_client_hello_get0_ext(s, TLSEXT_TYPE_use_srtp, &ext, &len) == 1
            && len >= 2) {
        list = ((size_t)ext[0] << 8) | ext[1];
        for (i = 0; list + 2 <= len && i + 1 < list; i += 2) {
            unsigned long id = ((unsigned long)ext[2 + i] << 8) | ext[3 + i];
            for (j = 0; j < sk_SRTP_PROTECTION_PROFILE_num(ours); j++)
                if (sk_SRTP_PROTECTION_PROFILE_value(ours, j)->id == id)
                    return SSL_CLIENT_HELLO_SUCCESS;
        }
    }
    c = pd_from_ssl(s);
    if (c != NULL)
        c->srtp_refused = 1;
    *al = SSL_AD_HANDSHAKE_FAILURE;
    return SSL_CLIENT_HELLO_ERROR;
}

/* ALPN on a server: pick by the server's own preference (the wire-format list
 * given here, owned by the caller for the SSL_CTX's life); no overlap is a
 * no_application_protocol alert, as RFC 7301 §3.2 asks. */
static int pd_alpn_select_cb(SSL *s, const unsigned char **out, unsigned char *outlen,
                             const unsigned char *in, unsigned int inlen, void *arg)
{
    const unsigned char *ours = arg;
    unsigned int ours_len = ((unsigned int)ours[0] << 8) | ours[1];
    const unsigned char *p = ours + 2;
    unsigned int i, j;
    (void)s;
    for (i = 0; i < ours_len; i += 1 + p[i]) {
        for (j = 0; j < inlen; j += 1 + in[j]) {
            if (p[i] == in[j] && j + 1 + in[j] <= inlen && memcmp(p + i + 1, in + j + 1, p[i]) == 0) {
                *out = in + j + 1;
                *outlen = in[j];
                return SSL_TLSEXT_ERR_OK;
            }
        }
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

/* prefixed: 2-byte length, then the wire-format list (length-prefixed names) */
void pd_ctx_alpn_select(SSL_CTX *ctx, const unsigned char *prefixed, unsigned int len)
{
    (void)len;
    SSL_CTX_set_alpn_select_cb(ctx, pd_alpn_select_cb, (void *)prefixed);
}

/* The highest security level, not above the context's, at which every suite
 * of its cipher list that DTLS 1.2 can use passes the security callback (the
 * context keeps its level); -1 when even level 0 refuses one. */
int pd_ctx_level_for_ciphers(SSL_CTX *ctx)
{
    STACK_OF(SSL_CIPHER) *sk = SSL_CTX_get_ciphers(ctx);
    int (*cb)(const SSL *, const SSL_CTX *, int, int, int, void *, void *)
        = SSL_CTX_get_security_callback(ctx);
    void *ex = SSL_CTX_get0_security_ex_data(ctx);
    int level = SSL_CTX_get_security_level(ctx), need = level, i;
    for (i = 0; cb != NULL && i < sk_SSL_CIPHER_num(sk); i++) {
        const SSL_CIPHER *cipher = sk_SSL_CIPHER_value(sk, i);
        int bits = SSL_CIPHER_get_bits(cipher, NULL), l;
        if (strcmp(SSL_CIPHER_get_version(cipher), "TLSv1.3") == 0)
            continue; /* TLS 1.3 suites do not apply to DTLS 1.2 */
        for (l = need; l >= 0; l--) {
            SSL_CTX_set_security_level(ctx, l);
            if (cb(NULL, ctx, SSL_SECOP_CIPHER_SUPPORTED, bits, 0, (void *)cipher, ex))
                break;
        }
        need = l;
        if (need < 0)
            break;
    }
    SSL_CTX_set_security_level(ctx, level);
    ERR_clear_error();
    return need;
}

void pd_ctx_require_srtp(SSL_CTX *ctx)
{
    SSL_CTX_set_client_hello_cb(ctx, pd_srtp_hello_cb, NULL);
}

/* --------------------------------------------------------- life cycle */

int pd_init(void)
{
    if (pd_bio_method != NULL)
        return 1;
    pd_ex_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    if (pd_ex_index < 0 || !pd_records_init() || !pd_sessions_init())
        return 0;
    pd_bio_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK,
                                 "pydtls_ossl datagram");
    if (pd_bio_method == NULL)
        return 0;
    BIO_meth_set_write(pd_bio_method, pd_bio_write);
    BIO_meth_set_read(pd_bio_method, pd_bio_read);
    BIO_meth_set_ctrl(pd_bio_method, pd_bio_ctrl);
    BIO_meth_set_create(pd_bio_method, pd_bio_create);
    BIO_meth_set_destroy(pd_bio_method, pd_bio_destroy);
    return 1;
}

/* The engine of an SSL, for callbacks made into Python (NULL if none). */
pd_conn *pd_conn_of(const SSL *s)
{
    return pd_from_ssl(s);
}

pd_conn *pd_dead_conn(void)
{
    return &pd_dead;
}

void pd_conn_free(pd_conn *c)
{
    if (c == NULL || c == &pd_dead)
        return;
    if (c->ssl != NULL && (c->state == PD_STATE_ESTABLISHED || c->state == PD_STATE_PEER_CLOSED))
        SSL_set_shutdown(c->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN); /* keep its session cached */
    SSL_free(c->ssl);
    pd_rl_free(c->rl);
    pd_cid_free(c->cid);
    pd_nodes_free(c->early);
    pd_nodes_free(c->in_head);
    pd_nodes_free(c->plain_head);
    free(c->taken);
    free(c->out);
    free(c->pins);
    free(c->peer);
    free(c);
}

pd_conn *pd_conn_new(SSL_CTX *ctx, int is_server, unsigned int mtu,
                     unsigned int rto_initial_us, unsigned int rto_max_us)
{
    pd_conn *c = calloc(1, sizeof(pd_conn));
    BIO *bio;

    if (c == NULL)
        return NULL;
    c->alert_received = -1;
    c->alert_sent = -1;
    c->is_server = is_server;
    c->mtu = mtu;
    c->rto_initial_us = rto_initial_us;
    c->rto_max_us = rto_max_us;
    c->plain_limit = 1 << 20;
    c->ssl = SSL_new(ctx);
    if (c->ssl == NULL)
        goto fail;
    c->max_hs_msg = (size_t)SSL_get_max_cert_list(c->ssl);
    bio = BIO_new(pd_bio_method);
    if (bio == NULL)
        goto fail;
    BIO_set_data(bio, c);
    SSL_set_bio(c->ssl, bio, bio);
    if (!SSL_set_ex_data(c->ssl, pd_ex_index, c))
        goto fail;
    if (is_server)
        SSL_set_accept_state(c->ssl);
    else
        SSL_set_connect_state(c->ssl);
    SSL_set_options(c->ssl, SSL_OP_NO_QUERY_MTU);
    if (!SSL_set_mtu(c->ssl, mtu))
        goto fail;
    DTLS_set_timer_cb(c->ssl, pd_timer_cb);
    SSL_set_info_callback(c->ssl, pd_info_cb);
    return c;
fail:
    pd_conn_free(c);
    return NULL;
}

int pd_add_pin(pd_conn *c, const EVP_MD *md, const unsigned char *digest,
               unsigned int len)
{
    pd_pin *pins;
    if (c->npins >= PD_MAX_PINS || len > EVP_MAX_MD_SIZE)
        return 0;
    pins = realloc(c->pins, sizeof(pd_pin) * (size_t)(c->npins + 1));
    if (pins == NULL)
        return 0;
    c->pins = pins;
    pins[c->npins].md = md;
    pins[c->npins].len = len;
    memcpy(pins[c->npins].digest, digest, len);
    c->npins++;
    return 1;
}

/* Ask for the peer's certificate and judge it by pins (or accept any). */
void pd_verify_peer(pd_conn *c, int accept_any)
{
    c->accept_any_certificate = accept_any;
    SSL_set_verify(c->ssl, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                   pd_verify_cb);
}

/* ------------------------------------------------------------- engine */

/* Any SSL call may write (retransmits, alerts): restore released buffers. */
static int pd_restore_buffers(pd_conn *c)
{
    if (!c->buffers_released || c->ssl == NULL)
        return 1;
    if (!SSL_alloc_buffers(c->ssl))
        return 0;
    c->buffers_released = 0;
    return 1;
}

static int pd_fatal_alert(int alert)
{
    return alert >= 0 && (alert >> 8) == SSL3_AL_FATAL;
}

/* Why an SSL call on an established association returned <= 0, without
 * reading the error queue (costly in OpenSSL 3.0, and possibly left dirty by
 * other code in this thread): alerts come from the info callback, and
 * otherwise OpenSSL's rwstate says whether it only wants more data. */
static int pd_error(pd_conn *c, int ret)
{
    if (pd_fatal_alert(c->alert_received) || pd_fatal_alert(c->alert_sent))
        return SSL_ERROR_SSL;
    if ((SSL_get_shutdown(c->ssl) & SSL_RECEIVED_SHUTDOWN)
            && c->alert_received == (SSL3_AL_WARNING << 8 | SSL_AD_CLOSE_NOTIFY))
        return SSL_ERROR_ZERO_RETURN;
    if (SSL_want_read(c->ssl) || SSL_want_write(c->ssl))
        return SSL_ERROR_WANT_READ;
    return SSL_get_error(c->ssl, ret);
}

static void pd_fail(pd_conn *c, int ret)
{
    c->ssl_error = pd_error(c, ret);
    c->state = PD_STATE_FAILED;
}

/* Decrypt the next record into buf (room for the whole record). 1: a record
 * of *got bytes; 0: nothing more for now, or the peer closed (the state says
 * which); -1: the association failed. */
static int pd_next_record(pd_conn *c, void *buf, size_t room, size_t *got)
{
    int r;
    if (SSL_read_ex(c->ssl, buf, room, got) == 1)
        return 1;
    r = pd_error(c, 0);
    if (r == SSL_ERROR_WANT_READ)
        return 0;
    if (r == SSL_ERROR_ZERO_RETURN) {
        c->state = PD_STATE_PEER_CLOSED;
        SSL_shutdown(c->ssl);
        return 0;
    }
    c->ssl_error = r;
    c->state = PD_STATE_FAILED;
    return -1;
}

/* Whether another record may be waiting: skips the read that would only say no. */
static int pd_more_input(pd_conn *c)
{
    return c->in_ptr != NULL || c->in_head != NULL || SSL_has_pending(c->ssl);
}

/* Read every complete record now available into the plaintext queue. */
static int pd_read_records(pd_conn *c)
{
    int count = 0;
    size_t got = 0;
    while (pd_next_record(c, pd_scratch, sizeof(pd_scratch), &got) == 1) {
        pd_node *n;
        if (c->plain_bytes + got > c->plain_limit || (n = pd_node_new(pd_scratch, got)) == NULL) {
            c->plain_dropped++;
        } else {
            if (c->plain_tail)
                c->plain_tail->next = n;
            else
                c->plain_head = n;
            c->plain_tail = n;
            c->plain_count++;
            c->plain_bytes += got;
            count++;
        }
        if (!pd_more_input(c))
            break;
    }
    return count;
}

static unsigned long long pd_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

/* The handshake ran out of time: the association fails, with nothing to send. */
void pd_expire(pd_conn *c)
{
    if (c->state >= PD_STATE_ESTABLISHED)
        return;
    c->deadline_passed = 1;
    c->ssl_error = SSL_ERROR_SSL;
    c->state = PD_STATE_FAILED;
}

static int pd_handshake_step(pd_conn *c)
{
    size_t before = c->out_len, flight;
    int r;
    c->state = PD_STATE_HANDSHAKING;
    if (c->handshake_timeout_ns && c->deadline_ns == 0)
        c->deadline_ns = pd_now_ns() + c->handshake_timeout_ns;
    r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        flight = c->out_len - before;
        if (c->require_srtp && SSL_get_selected_srtp_profile(c->ssl) == NULL) {
            c->srtp_refused = 1; /* the server ignored our use_srtp offer */
            c->ssl_error = SSL_ERROR_SSL;
            c->state = PD_STATE_FAILED;
            SSL_shutdown(c->ssl);
            return PD_ERR_SSL;
        }
        c->state = PD_STATE_ESTABLISHED;
        free(c->pins); /* the handshake verified the peer; renegotiation is refused */
        c->pins = NULL;
        c->npins = 0;
        free(c->peer);
        c->peer = NULL;
        c->peer_len = 0;
        c->cookies = NULL;
        c->max_plaintext = DTLS_get_data_mtu(c->ssl);
        c->min_protected = pd_min_protected(SSL_get_current_cipher(c->ssl));
        if (c->max_plaintext > PD_MAX_PLAINTEXT)
            c->max_plaintext = PD_MAX_PLAINTEXT;
        pd_cid_overhead(c);
        pd_read_records(c); /* what came with, or before, the peer's Finished */
        if (c->compact && c->state == PD_STATE_ESTABLISHED && !pd_more_input(c))
            pd_handover(c, before, flight);
        pd_nodes_free(c->early);
        c->early = NULL;
        if (c->rl == NULL && c->state == PD_STATE_ESTABLISHED
                && (pd_cid_out_len(c) > 0 || pd_cid_in_len(c) > 0)) {
            pd_cid_fail(c); /* CID records need the engine's record layer */
        }
        pd_cid_handshake_done(c);
        return c->state == PD_STATE_FAILED ? PD_ERR_SSL : 1;
    }
    r = SSL_get_error(c->ssl, r);
    if (pd_fatal_alert(c->alert_received) || pd_fatal_alert(c->alert_sent))
        r = SSL_ERROR_SSL; /* 3.0 may leave rwstate READING after a fatal alert */
    if (r == SSL_ERROR_WANT_READ || r == SSL_ERROR_WANT_WRITE)
        return 0;
    c->ssl_error = r;
    c->state = PD_STATE_FAILED;
    return PD_ERR_SSL;
}

/* 1 finished, 0 in progress, <0 failed (error queue holds the reasons). */
int pd_handshake(pd_conn *c)
{
    if (c->state == PD_STATE_ESTABLISHED)
        return 1;
    if (c->state > PD_STATE_ESTABLISHED)
        return c->state == PD_STATE_FAILED ? PD_ERR_SSL : PD_ERR_STATE;
    if (c->state == PD_STATE_NEW && c->cookies != NULL)
        return 0; /* cookie mode: nothing to do until a hello with a valid cookie */
    ERR_clear_error();
    if (pd_handshake_step(c) == 1)
        return 1;
    return c->state == PD_STATE_FAILED ? PD_ERR_SSL : 0;
}

/* Before the keys exist nothing is authenticated, and OpenSSL answers some
 * malformed plaintext records with a fatal alert. RFC 6347 §4.1.2.7 asks for
 * invalid records to be dropped, so a datagram whose records are not well
 * formed is discarded before OpenSSL sees it. */
static int pd_plausible(const pd_conn *c, const unsigned char *d, size_t n)
{
    size_t off = 0, min1 = 0;
    if (n < PD_RECORD_HEADER)
        return 0;
    while (off < n) {
        size_t len, epoch, pos, end;
        const unsigned char *r = d + off;
        if (n - off < PD_RECORD_HEADER)
            return 0;
        if (r[0] < 20 || r[0] > 23 || r[1] != 0xFE || (r[2] != 0xFD && r[2] != 0xFF))
            return 0;
        len = ((size_t)r[11] << 8) | r[12];
        if (len > n - off - PD_RECORD_HEADER || len > PD_MAX_RECORD)
            return 0;
        epoch = ((size_t)r[3] << 8) | r[4];
        if (epoch > 1)
            return 0; /* no epoch but the first two exists before the handshake ends */
        if (epoch == 1) {
            /* libssl buffers it, then fails the handshake on one too short to open */
            if (min1 == 0)
                min1 = pd_min_protected(c->ssl != NULL ? SSL_get_pending_cipher(c->ssl) : NULL);
            if (len < min1)
                return 0;
        }
        pos = off + PD_RECORD_HEADER;
        end = pos + len;
        if (epoch == 0) {
            if (r[0] == 20 && (len != 1 || d[pos] != 1))
                return 0;
            if (r[0] == 21 && (len != 2 || (d[pos] != 1 && d[pos] != 2)))
                return 0;
            /* libssl ends a handshake at any warning but close_notify; RFC 5246 §7.2
             * lets it go on, and an unauthenticated one is better dropped */
            if (r[0] == 21 && d[pos] == 1 && d[pos + 1] != 0)
                return 0;
            if (r[0] == 23)
                return 0;
            while (r[0] == 22 && pos < end) {
                size_t msg_len, frag_off, frag_len;
                if (end - pos < 12)
                    return 0;
                msg_len = ((size_t)d[pos + 1] << 16) | ((size_t)d[pos + 2] << 8) | d[pos + 3];
                frag_off = ((size_t)d[pos + 6] << 16) | ((size_t)d[pos + 7] << 8) | d[pos + 8];
                frag_len = ((size_t)d[pos + 9] << 16) | ((size_t)d[pos + 10] << 8) | d[pos + 11];
                if (frag_len > end - pos - 12 || frag_off + frag_len > msg_len
                        || msg_len > c->max_hs_msg)
                    return 0;
                pos += 12 + frag_len;
            }
        }
        off = end;
    }
    return 1;
}

/* Before the handshake ends, libssl keeps up to 100 records of the next epoch,
 * each with its own ~17 KB buffer: give it at most a few between two of the
 * peer's ChangeCipherSpecs (a real flight has one or two). 1: feed it. */
static int pd_epoch1_budget(pd_conn *c, const unsigned char *d, size_t n)
{
    size_t off = 0;
    unsigned int count = c->epoch1_since_ccs;
    while (n - off >= PD_RECORD_HEADER) {
        const unsigned char *r = d + off;
        if (r[3] == 0 && r[4] == 0 && r[0] == 20)
            count = 0;
        else if (r[3] != 0 || r[4] != 0)
            count++;
        if (count > PD_MAX_EPOCH1_PER_CCS)
            return 0;
        off += PD_RECORD_HEADER + (((size_t)r[11] << 8) | r[12]); /* pd_plausible framed them */
    }
    c->epoch1_since_ccs = count;
    return 1;
}

/* After the handshake on libssl's record layer: drop a datagram that does not
 * frame as records, or holds a protected record too short for its cipher
 * (libssl 3.0 answers one with a fatal internal_error instead of dropping it). */
static int pd_plausible_protected(const pd_conn *c, const unsigned char *d, size_t n)
{
    size_t off = 0;
    while (off < n) {
        const unsigned char *r = d + off;
        size_t len;
        if (n - off < PD_RECORD_HEADER || r[0] < 20 || r[0] > 23 || r[1] != 0xFE
                || (r[2] != 0xFD && r[2] != 0xFF))
            return 0;
        len = ((size_t)r[11] << 8) | r[12];
        if (len > n - off - PD_RECORD_HEADER || ((r[3] != 0 || r[4] != 0) && len < c->min_protected))
            return 0;
        off += PD_RECORD_HEADER + len;
    }
    return 1;
}

/* The shortest record libssl's layer can open with cipher (nonce and tag, or
 * CBC's IV and one block). */
static size_t pd_min_protected(const SSL_CIPHER *cipher)
{
    const char *name = cipher != NULL ? SSL_CIPHER_standard_name(cipher) : NULL;
    if (cipher == NULL)
        return 16; /* no suite is known yet: none has less overhead */
    if (!SSL_CIPHER_is_aead(cipher))
        return 32;
    if (SSL_CIPHER_get_cipher_nid(cipher) == NID_chacha20_poly1305)
        return 16;
    return name != NULL && strstr(name, "CCM_8") != NULL ? 16 : 24;
}

/* Start the handshake of a server engine from a ClientHello whose cookie was
 * verified statelessly. DTLSv1_listen sets the sequence numbers OpenSSL needs
 * to accept a second ClientHello (message_seq 1) on a fresh SSL. */
int pd_accept_hello(pd_conn *c, const unsigned char *data, size_t len)
{
    BIO_ADDR *client;
    int r;
    if (c->state != PD_STATE_NEW || !c->is_server)
        return PD_ERR_STATE;
    client = BIO_ADDR_new();
    if (client == NULL)
        return PD_ERR_NOMEM;
    ERR_clear_error();
    c->in_ptr = data;
    c->in_len = len;
    /* OpenSSL checks the cookie in DTLSv1_listen and again when the handshake
     * processes the buffered ClientHello: both times it is the one we checked. */
    pd_listen_cookie_ok = 1;
    r = DTLSv1_listen(c->ssl, client);
    c->in_ptr = NULL;
    BIO_ADDR_free(client);
    if (r != 1) {
        pd_listen_cookie_ok = 0;
        c->ssl_error = SSL_ERROR_SSL;
        c->state = PD_STATE_FAILED;
        return PD_ERR_SSL;
    }
    SSL_set_mtu(c->ssl, c->mtu); /* DTLSv1_listen forgets it */
    r = pd_handshake_step(c);
    pd_listen_cookie_ok = 0;
    return r < 0 ? PD_ERR_SSL : 0;
}

void pd_set_cookie_peer(pd_conn *c, const pd_cookie_keys *keys, const unsigned char *addr,
                        size_t len, unsigned int port)
{
    unsigned char *copy = malloc(len ? len : 1);
    if (copy == NULL)
        return; /* no cookie mode: the handshake goes on without one */
    memcpy(copy, addr, len);
    free(c->peer);
    c->peer = copy;
    c->cookies = keys;
    c->peer_port = port;
    c->peer_len = len;
}

/* Cookie mode before the handshake: answer a cookieless ClientHello with a
 * HelloVerifyRequest and allocate nothing; accept one with a valid cookie. */
static int pd_feed_cookie(pd_conn *c, const unsigned char *data, size_t len)
{
    unsigned char hvr[PD_HVR_LEN];
    int r;
    if (!pd_plausible(c, data, len))
        return 0; /* OpenSSL would fail the engine on a malformed hello */
    r = pd_cookie_hello(c->cookies, c->peer, c->peer_len, c->peer_port, data, len, hvr);
    if (r > 0)
        return pd_out_append(c, hvr, (size_t)r) ? 0 : PD_ERR_NOMEM;
    if (r == PD_HELLO_DROP)
        return 0;
    return pd_accept_hello(c, data, len) < 0 ? PD_ERR_SSL : 0;
}

/* The ClientHello of a peer that lost its state (RFC 6347 §4.2.8), arriving
 * at an established association: OpenSSL would drop it; the caller decides. */
static int pd_is_new_hello(const unsigned char *d, size_t n)
{
    return n > 25 && d[0] == 22 && d[3] == 0 && d[4] == 0 && d[13] == 1;
}

/* Takes one UDP payload; returns how many plaintext records became readable,
 * or PD_ERR_SSL when this datagram ended the association. */
int pd_feed(pd_conn *c, const unsigned char *data, size_t len)
{
    int count = 0;
    size_t i;
    if (len == 0 || c->state > PD_STATE_ESTABLISHED)
        return 0;
    if (c->state == PD_STATE_NEW && !c->is_server)
        return 0; /* a client that has not said hello expects nothing */
    if (c->state == PD_STATE_ESTABLISHED && pd_is_new_hello(data, len))
        return PD_NEW_HELLO;
    if (c->rl != NULL) {
        count = (int)pd_rl_feed(c, data, len, NULL);
        return c->state == PD_STATE_FAILED ? PD_ERR_SSL : count;
    }
    if (c->cid != NULL) /* offered: CID records may come, even with the hello that agrees to them */
        for (i = 0; i + PD_RECORD_HEADER <= len; ) {
            size_t size;
            if (data[i] == PD_RT_CID)
                return pd_cid_feed(c, data, len);
            if ((size = pd_rec_size(data + i, len - i, 0)) == 0)
                break;
            i += size;
        }
    return pd_feed_ssl(c, data, len);
}

/* pd_feed before the handover, or on libssl's record layer. */
static int pd_feed_ssl(pd_conn *c, const unsigned char *data, size_t len)
{
    int count = 0;
    if (c->state == PD_STATE_NEW && c->cookies != NULL)
        return pd_feed_cookie(c, data, len);
    if (c->state != PD_STATE_ESTABLISHED
            && (!pd_plausible(c, data, len) || !pd_epoch1_budget(c, data, len)))
        return 0;
    if (c->state == PD_STATE_ESTABLISHED && !pd_plausible_protected(c, data, len))
        return 0;
    if (c->state != PD_STATE_ESTABLISHED && c->compact && !pd_retain_early(c, data, len))
        return 0; /* more early records than a real peer sends: dropped */
    if (!pd_restore_buffers(c))
        return 0;
    c->in_ptr = data; /* borrowed until this call returns: every path below clears it */
    c->in_len = len;
    if (c->state != PD_STATE_ESTABLISHED) {
        size_t queued = c->plain_count, off = 0;
        while (len - off >= PD_RECORD_HEADER) { /* pd_plausible framed them */
            const unsigned char *r = data + off;
            c->protected_seen += r[3] != 0 || r[4] != 0;
            off += PD_RECORD_HEADER + (((size_t)r[11] << 8) | r[12]);
        }
        ERR_clear_error(); /* the handshake path reads the queue: start clean */
        pd_handshake_step(c);
        count = (int)(c->plain_count - queued);
    } else {
        count = pd_read_records(c);
    }
    if (c->in_ptr != NULL) {
        pd_node *n = c->state <= PD_STATE_ESTABLISHED ? pd_node_new(data, len) : NULL;
        c->in_ptr = NULL;
        if (n != NULL) {
            if (c->in_tail)
                c->in_tail->next = n;
            else
                c->in_head = n;
            c->in_tail = n;
        }
    }
    if (c->state == PD_STATE_FAILED)
        return PD_ERR_SSL; /* the caller drains the queue into its exception */
    if (count == 0)
        pd_clear_errors(); /* a dropped record may have left a reason behind */
    return count;
}

/* Length of the next datagram (c->data points at it until the next call),
 * 0 when nothing is due, PD_ERR_OVERSIZE for a record larger than the MTU. */
long pd_pull(pd_conn *c)
{
    const unsigned char *p = c->out + c->out_off;
    size_t avail = c->out_len, take = 0;

    while (avail - take >= PD_RECORD_HEADER) {
        size_t rec = pd_rec_size(p + take, avail - take, pd_cid_out_len(c));
        if (rec == 0)
            break;
        if (c->compact && c->rl == NULL)
            pd_note_sent(c, p + take);
        if (take + rec > c->mtu) {
            if (take == 0) {
                c->out_off += rec;
                c->out_len -= rec;
                c->out_mark = c->out_mark > rec ? c->out_mark - rec : 0;
                return PD_ERR_OVERSIZE;
            }
            break;
        }
        if (take != 0 && take == c->out_mark)
            break; /* the start of a later flight */
        take += rec;
    }
    if (take == 0)
        return 0;
    c->data = (const char *)p;
    c->out_off += take;
    c->out_len -= take;
    c->out_mark = c->out_mark > take ? c->out_mark - take : 0;
    if (c->out_len == 0)
        c->out_off = 0;
    return (long)take;
}

int pd_write(pd_conn *c, const char *data, size_t len)
{
    size_t written = 0;
    int r;
    if (c->state != PD_STATE_ESTABLISHED)
        return c->state == PD_STATE_FAILED ? PD_ERR_SSL : PD_ERR_STATE;
    if (len > c->max_plaintext)
        return PD_ERR_TOO_BIG;
    if (len == 0)
        return 0;
    if (c->rl != NULL)
        return pd_rl_seal(c, SSL3_RT_APPLICATION_DATA, data, len);
    if (!pd_restore_buffers(c))
        return PD_ERR_NOMEM;
    r = SSL_write_ex(c->ssl, data, len, &written);
    if (r == 1)
        return (int)written;
    pd_fail(c, r);
    return PD_ERR_SSL;
}


/* Length of the next plaintext record (c->data points at it), or -1. */
long pd_read(pd_conn *c)
{
    pd_node *n = c->plain_head;
    if (c->taken != NULL) {
        free(c->taken);
        c->taken = NULL;
    }
    if (n == NULL)
        return -1;
    c->plain_head = n->next;
    if (c->plain_head == NULL)
        c->plain_tail = NULL;
    c->plain_count--;
    c->plain_bytes -= n->len;
    c->taken = n;
    c->data = (const char *)n->data;
    return (long)n->len;
}

/* Batch hot paths: one call for many records, to spare per-call overhead. */

/* Encrypt n payloads (concatenated in buf, sizes in lens) as n records, then
 * pack every queued record into datagrams of at most mtu bytes. They lie back
 * to back in the output run: c->data points at the first, ends[i] is where
 * datagram i ends (room for n + c->out_len / 13 + 1), valid until the next
 * call on c. Returns the number of datagrams, or <0 (PD_ERR_TOO_BIG:
 * lens[*failed] too big; the payloads before it stay queued). */
long pd_write_batch(pd_conn *c, const char *buf, const size_t *lens, size_t n,
                    size_t *ends, size_t *failed)
{
    size_t i, off = 0, used = 0;
    long count = 0, got;
    const char *first = NULL;
    for (i = 0; i < n; i++) {
        int r = pd_write(c, buf + off, lens[i]);
        if (r < 0) {
            *failed = i;
            return r;
        }
        off += lens[i];
    }
    while ((got = pd_pull(c)) > 0) {
        if (first == NULL)
            first = c->data;
        used += (size_t)got;
        ends[count++] = used;
    }
    c->data = first;
    return got < 0 ? got : count;
}

/* Move every queued plaintext record into out (room for c->plain_bytes);
 * ends[i] is where record i ends, counting from base. Returns the count. */
static long pd_read_all(pd_conn *c, char *out, size_t *ends, size_t base)
{
    size_t used = 0;
    long count = 0, n;
    while ((n = pd_read(c)) >= 0) {
        memcpy(out + used, c->data, (size_t)n);
        used += (size_t)n;
        ends[count++] = base + used;
    }
    return count;
}

/* Feed n datagrams (concatenated in buf, sizes in lens) and move every record
 * now readable into out, in order: those queued by earlier calls first, then
 * the new ones, which an established association decrypts straight into out
 * (no queue, no extra copy). out has room for c->plain_bytes plus the
 * datagrams' total size, so each SSL_read_ex gets at least the rest of the
 * ciphertext as room and never cuts a record; ends[i] is where record i ends
 * (room for c->plain_count + total / 16 + n + 1). Returns the number of
 * records; *failed is 1 when a datagram ended the association (the records
 * before it are in out). */
long pd_feed_read(pd_conn *c, const unsigned char *buf, const size_t *lens, size_t n,
                  char *out, size_t out_cap, size_t *ends, int *failed)
{
    size_t i, off = 0, used = 0;
    long k = pd_read_all(c, out, ends, 0);
    if (k > 0)
        used = ends[k - 1];
    *failed = 0;
    for (i = 0; i < n; off += lens[i], i++) {
        const unsigned char *d = buf + off;
        size_t len = lens[i];
        if (c->rl != NULL && c->state == PD_STATE_ESTABLISHED && len != 0
                && !pd_is_new_hello(d, len)) {
            pd_sink sink = { out, out_cap, used, ends, k };
            pd_rl_feed(c, d, len, &sink);
            k = sink.count;
            used = sink.used;
            if (c->state == PD_STATE_FAILED) {
                *failed = 1;
                return k;
            }
            continue;
        }
        if (c->rl != NULL || c->state != PD_STATE_ESTABLISHED || len == 0 || pd_is_new_hello(d, len)
                || !pd_restore_buffers(c)) {
            int r = pd_feed(c, d, len);
            k += pd_read_all(c, out + used, ends + k, used);
            if (k > 0)
                used = ends[k - 1];
            if (r == PD_ERR_SSL) {
                *failed = 1;
                return k;
            }
            continue;
        }
        c->in_ptr = d;
        c->in_len = len;
        for (;;) {
            size_t got = 0;
            int r = pd_next_record(c, out + used, out_cap - used, &got);
            if (r < 0) {
                c->in_ptr = NULL;
                *failed = 1;
                return k;
            }
            if (r == 0)
                break;
            used += got;
            ends[k++] = used;
            if (!pd_more_input(c))
                break;
        }
        c->in_ptr = NULL;
    }
    pd_clear_errors(); /* dropped records may have left reasons behind */
    return k;
}

/* Seconds until a retransmission or the handshake deadline is due, or -1
 * when no timer runs. */
double pd_get_timeout(pd_conn *c)
{
    struct timeval tv;
    double t = -1.0;
    if (c->ssl == NULL || c->state > PD_STATE_ESTABLISHED)
        return -1.0;
    if (DTLSv1_get_timeout(c->ssl, &tv) == 1)
        t = (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
    if (c->deadline_ns && c->state < PD_STATE_ESTABLISHED) {
        unsigned long long now = pd_now_ns();
        double left = now >= c->deadline_ns ? 0.0 : (double)(c->deadline_ns - now) / 1e9;
        if (t < 0 || left < t)
            t = left;
    }
    return t;
}

/* 1 retransmitted, 0 nothing due, <0 failed (too many retransmissions, or
 * the handshake deadline passed). */
int pd_handle_timeout(pd_conn *c)
{
    int r;
    if (c->ssl == NULL || c->state > PD_STATE_ESTABLISHED)
        return 0;
    if (c->deadline_ns && c->state < PD_STATE_ESTABLISHED && pd_now_ns() >= c->deadline_ns) {
        pd_expire(c);
        return PD_ERR_SSL;
    }
    ERR_clear_error();
    if (!pd_restore_buffers(c))
        return 0;
    r = DTLSv1_handle_timeout(c->ssl);
    if (r < 0) {
        c->ssl_error = SSL_ERROR_SSL;
        c->state = PD_STATE_FAILED;
        return PD_ERR_SSL;
    }
    ERR_clear_error();
    return r;
}

/* Queue close_notify when the association is up; the engine is then closed. */
void pd_shutdown(pd_conn *c)
{
    if (c->rl != NULL) {
        if (c->state == PD_STATE_ESTABLISHED)
            pd_rl_alert(c, SSL3_AL_WARNING, SSL_AD_CLOSE_NOTIFY);
        if (c->state != PD_STATE_FAILED)
            c->state = PD_STATE_CLOSED;
        return;
    }
    if (c->ssl == NULL)
        return;
    if (c->state == PD_STATE_ESTABLISHED && pd_restore_buffers(c)) {
        ERR_clear_error();
        SSL_shutdown(c->ssl);
        ERR_clear_error();
    }
    if (c->state != PD_STATE_FAILED)
        c->state = PD_STATE_CLOSED;
}

/* Free the buffers an idle association does not need: OpenSSL's ~33 KB of
 * record buffers (pd_write restores them: OpenSSL 3.0 crashes writing
 * without them), or the engine record layer's two cipher contexts (the next
 * record rebuilds them from the kept keys), and the output run when empty. */
int pd_release_buffers(pd_conn *c)
{
    if (c->state != PD_STATE_ESTABLISHED || (c->ssl == NULL && c->rl == NULL))
        return 0;
    if (c->ssl != NULL && !SSL_free_buffers(c->ssl)) {
        ERR_clear_error();
        return 0;
    }
    c->buffers_released = 1;
    if (c->rl != NULL) {
        pd_rl_idle(c->rl);
        if (!c->keep_peer_cert)
            pd_rl_drop_peer_der(c->rl);
    }
    if (c->out_len == 0) {
        free(c->out);
        c->out = NULL;
        c->out_cap = c->out_off = 0;
    }
    free(c->taken);
    c->taken = NULL;
    return 1;
}
