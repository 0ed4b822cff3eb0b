/*
 * The engine's own DTLS 1.2 record layer for AEAD suites, used once the
 * handshake is done (in the manner of kernel TLS: OpenSSL does the handshake,
 * a small framer protects the records). The keys come from OpenSSL's master
 * secret through the TLS 1.2 PRF (computed here, as the cookies are: EVP_KDF
 * costs ~60k instructions a call in 3.0, mostly looking algorithms up by
 * name); the AEAD is OpenSSL's, in the TLS mode its
 * own record layer uses. Handing over frees the SSL object: an idle
 * association then holds two cipher contexts and this struct (~3 KB) instead
 * of ~35 KB, and each record costs two EVP calls.
 *
 * What it does, and nothing more (RFC 6347, RFC 5288, RFC 7905):
 * - application data and alerts at the handshake's epoch, with the 64-record
 *   anti-replay window of §4.1.2.6; invalid records are dropped (§4.1.2.7);
 * - close_notify both ways; a fatal alert ends the association;
 * - the last flight is resent (re-protected, new sequence numbers) when the
 *   peer retransmits its Finished, until the peer shows it is done (§4.2.4);
 * - renegotiation is refused with a no_renegotiation warning;
 * - RFC 5705 exporters, from the kept master secret.
 * AEAD suites only: AES-GCM, ChaCha20-Poly1305, AES-CCM and AES-CCM_8. Anything
 * else (CBC suites, a crowded handshake) keeps OpenSSL's record layer; see
 * pd_handover. An idle association may free its two cipher contexts and keep
 * only the raw keys and IVs (pd_rl_idle); the next record rebuilds them.
 * Nonces never depend on a context's state: GCM's explicit nonce is the
 * record's epoch and sequence number (RFC 5288 §3), CCM's is too (OpenSSL's
 * TLS mode takes it from the AAD), and ChaCha20's is the IV XOR the sequence
 * number (RFC 7905).
 */
#include <openssl/objects.h>
#include <openssl/sha.h>

#define PD_MAX_RESENDS 12
#define PD_SEQ_MAX ((1ULL << 48) - 1)
#define PD_KIND_GCM 1
#define PD_KIND_CHACHA 2
#define PD_KIND_CCM 3
#define PD_MASTER 48
#define PD_RANDOM 32

struct pd_rl {
    EVP_CIPHER_CTX *enc, *dec;      /* NULL while idle: rebuilt from the keys below */
    const EVP_CIPHER *aead;
    int kind;                       /* PD_KIND_* */
    int raw;                        /* plain AEAD, one nonce per record (CID records, cid.c) */
    unsigned int explicit_iv;       /* 8 for AES-GCM and AES-CCM, 0 for ChaCha20-Poly1305 */
    unsigned int tag;               /* 16, or 8 for CCM_8 */
    unsigned int key_len, iv_len;   /* iv_len: the fixed (implicit) part */
    unsigned char wkey[32], wiv[12], rkey[32], riv[12];
    unsigned int epoch;
    unsigned long long wseq, wseq0; /* next sequence numbers: epoch, and 0 for resends */
    unsigned long long rtop;        /* highest authenticated sequence number + 1 */
    unsigned long long rmask;       /* bit i: rtop - 1 - i was received */
    pd_node *flight;                /* our last flight ([type][epoch][plaintext]) */
    int resends;
    int prf_sha384;                 /* the PRF's hash: SHA-384, else SHA-256 */
    unsigned char secret[PD_MASTER + 2 * PD_RANDOM]; /* master, client_random, server_random */
    /* what the SSL object knew, for introspection after it is gone */
    const char *version;
    const SSL_CIPHER *cipher;
    const SRTP_PROTECTION_PROFILE *srtp;
    int session_reused;
    unsigned char *peer_der;        /* NULL once dropped by an idle spell (-1 length) */
    int peer_der_len;
    unsigned char peer_sha256[32];  /* its fingerprint, kept for good */
    char *psk_identity;
    unsigned char *alpn;
    unsigned int alpn_len;
    int extms;                      /* extended master secret (RFC 7627) was used */
    unsigned char *session_der;     /* a client's session, to resume later */
    long session_der_len;
    SSL_CTX *cache_ctx;             /* a server's session cache (borrowed), and its entry */
    unsigned char sid[SSL_MAX_SSL_SESSION_ID_LENGTH];
    unsigned int sid_len;
};

static EVP_CIPHER *pd_aes128gcm = NULL, *pd_aes256gcm = NULL, *pd_chacha = NULL;
static EVP_CIPHER *pd_aes128ccm = NULL, *pd_aes256ccm = NULL;

static int pd_records_init(void)
{
    pd_aes128gcm = EVP_CIPHER_fetch(NULL, "AES-128-GCM", NULL);
    pd_aes256gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    pd_chacha = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
    pd_aes128ccm = EVP_CIPHER_fetch(NULL, "AES-128-CCM", NULL);
    pd_aes256ccm = EVP_CIPHER_fetch(NULL, "AES-256-CCM", NULL);
    ERR_clear_error(); /* a provider without one of them only loses the fast path */
    return 1;
}

static unsigned long long pd_seq48(const unsigned char *p)
{
    return ((unsigned long long)p[0] << 40) | ((unsigned long long)p[1] << 32)
        | ((unsigned long long)p[2] << 24) | ((unsigned long long)p[3] << 16)
        | ((unsigned long long)p[4] << 8) | p[5];
}

static void pd_put_header(unsigned char *r, int type, unsigned int epoch,
                          unsigned long long seq, size_t len)
{
    int i;
    r[0] = (unsigned char)type;
    r[1] = 0xFE;
    r[2] = 0xFD;
    r[3] = (unsigned char)(epoch >> 8);
    r[4] = (unsigned char)epoch;
    for (i = 0; i < 6; i++)
        r[5 + i] = (unsigned char)(seq >> (40 - 8 * i));
    r[11] = (unsigned char)(len >> 8);
    r[12] = (unsigned char)len;
}

typedef union pd_sha {
    SHA256_CTX sha256;
    SHA512_CTX sha384;
} pd_sha;

static void pd_sha_init(int sha384, pd_sha *h)
{
    if (sha384)
        SHA384_Init(&h->sha384);
    else
        SHA256_Init(&h->sha256);
}

static void pd_sha_update(int sha384, pd_sha *h, const void *data, size_t len)
{
    if (sha384)
        SHA384_Update(&h->sha384, data, len);
    else
        SHA256_Update(&h->sha256, data, len);
}

static void pd_sha_final(int sha384, pd_sha *h, unsigned char *out)
{
    if (sha384)
        SHA384_Final(out, &h->sha384);
    else
        SHA256_Final(out, &h->sha256);
}

/* HMAC(key, a || b) from precomputed inner and outer pad states. */
static void pd_hmac2(int sha384, const pd_sha *inner, const pd_sha *outer,
                     const unsigned char *a, size_t a_len, const unsigned char *b, size_t b_len,
                     unsigned char *out)
{
    unsigned char digest[SHA384_DIGEST_LENGTH];
    pd_sha h = *inner;
    pd_sha_update(sha384, &h, a, a_len);
    if (b_len)
        pd_sha_update(sha384, &h, b, b_len);
    pd_sha_final(sha384, &h, digest);
    h = *outer;
    pd_sha_update(sha384, &h, digest, sha384 ? SHA384_DIGEST_LENGTH : SHA256_DIGEST_LENGTH);
    pd_sha_final(sha384, &h, out);
    OPENSSL_cleanse(digest, sizeof(digest));
}

/* The TLS 1.2 PRF, P_SHA256 or P_SHA384 (RFC 5246 §5), of a secret no longer
 * than a hash block; seed holds label || seed. */
static void pd_prf(int sha384, const unsigned char *secret, size_t secret_len,
                   const unsigned char *seed, size_t seed_len, unsigned char *out, size_t len)
{
    size_t block = sha384 ? SHA512_CBLOCK : SHA256_CBLOCK;
    size_t dlen = sha384 ? SHA384_DIGEST_LENGTH : SHA256_DIGEST_LENGTH, i, take;
    unsigned char pad[SHA512_CBLOCK], a[SHA384_DIGEST_LENGTH], chunk[SHA384_DIGEST_LENGTH];
    pd_sha inner, outer;
    memset(pad, 0x36, block);
    for (i = 0; i < secret_len; i++)
        pad[i] ^= secret[i];
    pd_sha_init(sha384, &inner);
    pd_sha_update(sha384, &inner, pad, block);
    for (i = 0; i < block; i++)
        pad[i] ^= 0x36 ^ 0x5c;
    pd_sha_init(sha384, &outer);
    pd_sha_update(sha384, &outer, pad, block);
    pd_hmac2(sha384, &inner, &outer, seed, seed_len, NULL, 0, a); /* A(1) */
    while (len > 0) {
        pd_hmac2(sha384, &inner, &outer, a, dlen, seed, seed_len, chunk);
        take = len < dlen ? len : dlen;
        memcpy(out, chunk, take);
        out += take;
        len -= take;
        if (len > 0)
            pd_hmac2(sha384, &inner, &outer, a, dlen, NULL, 0, a);
    }
    OPENSSL_cleanse(pad, sizeof(pad));
    OPENSSL_cleanse(chunk, sizeof(chunk));
    OPENSSL_cleanse(&inner, sizeof(inner));
    OPENSSL_cleanse(&outer, sizeof(outer));
}

/* An AEAD context in TLS mode for one direction: the fixed IV part is set
 * once, each record then gives the sequence number through the AAD. A GCM
 * write context starts its explicit-nonce counter at the epoch and sequence
 * number of the next record, so that the two advance together. */
static EVP_CIPHER_CTX *pd_aead_new(const struct pd_rl *rl, const unsigned char *key,
                                   const unsigned char *iv, int enc)
{
    EVP_CIPHER_CTX *ctx;
    unsigned char full[12];
    unsigned long long next = ((unsigned long long)rl->epoch << 48) | rl->wseq;
    int i, ok = 0;
    if (rl->raw)
        return pd_raw_new(rl, key, enc);
    if ((ctx = EVP_CIPHER_CTX_new()) == NULL)
        return NULL;
    switch (rl->kind) {
    case PD_KIND_GCM:
        if (EVP_CipherInit_ex(ctx, rl->aead, NULL, key, NULL, enc) != 1)
            break;
        if (!enc) {
            ok = EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IV_FIXED, 4, (void *)iv) > 0;
            break;
        }
        memcpy(full, iv, 4);
        for (i = 0; i < 8; i++)
            full[4 + i] = (unsigned char)(next >> (56 - 8 * i));
        ok = EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IV_FIXED, -1, full) > 0;
        OPENSSL_cleanse(full, sizeof(full));
        break;
    case PD_KIND_CCM:
        ok = EVP_CipherInit_ex(ctx, rl->aead, NULL, NULL, NULL, enc) == 1
            && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) > 0
            && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, (int)rl->tag, NULL) > 0
            && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_CCM_SET_IV_FIXED, 4, (void *)iv) > 0
            && EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, enc) == 1;
        break;
    case PD_KIND_CHACHA:
        ok = EVP_CipherInit_ex(ctx, rl->aead, NULL, key, iv, enc) == 1;
        break;
    }
    if (ok)
        return ctx;
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

/* Both cipher contexts, rebuilt from the kept keys after an idle spell. */
static int pd_rl_ready(struct pd_rl *rl)
{
    if (rl->enc == NULL)
        rl->enc = pd_aead_new(rl, rl->wkey, rl->wiv, 1);
    if (rl->dec == NULL)
        rl->dec = pd_aead_new(rl, rl->rkey, rl->riv, 0);
    if (rl->enc != NULL && rl->dec != NULL)
        return 1;
    pd_clear_errors();
    return 0;
}

/* Idle: free both cipher contexts (~1 KB each with AES), keep the keys. */
static void pd_rl_idle(struct pd_rl *rl)
{
    EVP_CIPHER_CTX_free(rl->enc);
    EVP_CIPHER_CTX_free(rl->dec);
    rl->enc = rl->dec = NULL;
}

static void pd_rl_free(struct pd_rl *rl)
{
    if (rl == NULL)
        return;
    pd_rl_idle(rl);
    pd_nodes_free(rl->flight);
    OPENSSL_free(rl->peer_der);
    OPENSSL_free(rl->psk_identity);
    free(rl->alpn);
    if (rl->session_der != NULL) {
        OPENSSL_cleanse(rl->session_der, (size_t)rl->session_der_len); /* holds the master secret */
        OPENSSL_free(rl->session_der);
    }
    OPENSSL_cleanse(rl->secret, sizeof(rl->secret));
    OPENSSL_cleanse(rl->wkey, sizeof(rl->wkey) + sizeof(rl->wiv) + sizeof(rl->rkey) + sizeof(rl->riv));
    free(rl);
}

/* The record's additional data to ctx in OpenSSL's TLS AEAD mode, where one
 * EVP_CipherUpdate then takes care of the nonce, the cipher and the tag.
 * Straight to the provider: EVP_CTRL_AEAD_TLS1_AAD sets this same parameter
 * and then reads the tag length back, its parameter lookups costing as much
 * again (a tenth of a busy server's instructions). 1: set. */
static int pd_tls_aad(EVP_CIPHER_CTX *ctx, unsigned char *aad)
{
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TLS1_AAD, aad,
                                                  PD_RECORD_HEADER);
    params[1] = OSSL_PARAM_construct_end();
    return EVP_CIPHER_CTX_set_params(ctx, params) == 1;
}

/* Authenticate and decrypt record r (header, then blen bytes) into dst, which
 * has room for blen bytes. Returns the plaintext length, or -1. */
static long pd_rl_open(const struct pd_rl *rl, EVP_CIPHER_CTX *ctx, const unsigned char *r,
                       size_t blen, unsigned char *dst)
{
    unsigned char aad[PD_RECORD_HEADER];
    size_t plain;
    int outl = 0;
    if (blen < rl->explicit_iv + rl->tag)
        return -1;
    plain = blen - rl->explicit_iv - rl->tag;
    if (plain > PD_MAX_PLAINTEXT)
        return -1;
    memcpy(aad, r + 3, 8); /* epoch and sequence number */
    memcpy(aad + 8, r, 3); /* type and version */
    memcpy(aad + 11, r + 11, 2); /* OpenSSL takes off the nonce and tag itself */
    memcpy(dst, r + PD_RECORD_HEADER, blen);
    if (!pd_tls_aad(ctx, aad) || EVP_CipherUpdate(ctx, dst, &outl, dst, (int)blen) != 1) {
        pd_clear_errors();
        return -1;
    }
    if (rl->explicit_iv)
        memmove(dst, dst + rl->explicit_iv, plain);
    return (long)plain;
}

/* Append one protected record to the output run: its length, or <0. */
static int pd_rl_seal(pd_conn *c, int type, const void *data, size_t len)
{
    struct pd_rl *rl = c->rl;
    size_t body = rl->explicit_iv + len + rl->tag;
    unsigned char aad[PD_RECORD_HEADER], *r;
    int outl = 0;
    if (rl->wseq > PD_SEQ_MAX) { /* RFC 6347 §4.1: never wrap; the association ends */
        c->ssl_error = SSL_ERROR_SSL;
        c->state = PD_STATE_FAILED;
        return PD_ERR_SSL;
    }
    if (rl->enc == NULL && !pd_rl_ready(rl))
        return PD_ERR_NOMEM;
    if (rl->raw) {
        size_t cl = pd_cid_out_len(c);
        unsigned int pad = c->cid != NULL ? c->cid->padding : 0;
        size_t size = pd_raw_size(rl, cl, pad, len);
        if (!pd_out_reserve(c, size))
            return PD_ERR_NOMEM;
        c->buffers_released = 0;
        if (!pd_raw_seal(rl, rl->enc, rl->wiv, cl ? c->cid->id + c->cid->rx_len : NULL, cl, pad,
                         type, rl->epoch, rl->wseq, data, len, c->out + c->out_off + c->out_len)) {
            c->ssl_error = SSL_ERROR_SSL;
            c->state = PD_STATE_FAILED;
            return PD_ERR_SSL;
        }
        rl->wseq++;
        c->out_len += size;
        return (int)len;
    }
    if (!pd_out_reserve(c, PD_RECORD_HEADER + body))
        return PD_ERR_NOMEM;
    c->buffers_released = 0;
    r = c->out + c->out_off + c->out_len;
    pd_put_header(r, type, rl->epoch, rl->wseq, body);
    memcpy(aad, r + 3, 8);
    memcpy(aad + 8, r, 3);
    aad[11] = (unsigned char)((rl->explicit_iv + len) >> 8); /* OpenSSL takes off the nonce */
    aad[12] = (unsigned char)(rl->explicit_iv + len);
    memcpy(r + PD_RECORD_HEADER + rl->explicit_iv, data, len);
    if (!pd_tls_aad(rl->enc, aad)
            || EVP_CipherUpdate(rl->enc, r + PD_RECORD_HEADER, &outl,
                                r + PD_RECORD_HEADER, (int)body) != 1
            || (size_t)outl != body) {
        c->ssl_error = SSL_ERROR_SSL;
        c->state = PD_STATE_FAILED;
        return PD_ERR_SSL;
    }
    rl->wseq++;
    c->out_len += PD_RECORD_HEADER + body;
    return (int)len;
}

static void pd_rl_alert(pd_conn *c, int level, int description)
{
    unsigned char alert[2];
    alert[0] = (unsigned char)level;
    alert[1] = (unsigned char)description;
    if (pd_rl_seal(c, SSL3_RT_ALERT, alert, 2) >= 0)
        c->alert_sent = level << 8 | description;
}

static int pd_rl_fresh(const struct pd_rl *rl, unsigned long long seq)
{
    unsigned long long age;
    if (seq >= rl->rtop)
        return 1;
    age = rl->rtop - 1 - seq;
    return age < 64 && !((rl->rmask >> age) & 1);
}

static void pd_rl_mark(struct pd_rl *rl, unsigned long long seq)
{
    if (seq >= rl->rtop) {
        unsigned long long shift = seq + 1 - rl->rtop;
        rl->rmask = shift >= 64 ? 1 : (rl->rmask << shift) | 1;
        rl->rtop = seq + 1;
    } else {
        rl->rmask |= 1ULL << (rl->rtop - 1 - seq);
    }
}

/* The peer sent something only a finished peer sends: no more resends. */
static void pd_rl_peer_done(struct pd_rl *rl)
{
    if (rl->flight != NULL) {
        pd_nodes_free(rl->flight);
        rl->flight = NULL;
    }
}

static void pd_rl_resend_flight(pd_conn *c)
{
    struct pd_rl *rl = c->rl;
    pd_node *n;
    rl->resends++;
    for (n = rl->flight; n != NULL; n = n->next) {
        size_t len = n->len - 2;
        if (n->data[1] != 0) {
            if (pd_rl_seal(c, n->data[0], n->data + 2, len) < 0)
                return;
        } else if (pd_out_reserve(c, PD_RECORD_HEADER + len)) {
            unsigned char *r = c->out + c->out_off + c->out_len;
            pd_put_header(r, n->data[0], 0, rl->wseq0++, len);
            memcpy(r + PD_RECORD_HEADER, n->data + 2, len);
            c->out_len += PD_RECORD_HEADER + len;
        }
    }
}

/* A fatal alert ends the session too (RFC 5246 §7.2.2): out of the server's cache. */
static void pd_rl_forget_session(struct pd_rl *rl)
{
    SSL_SESSION *probe;
    if (rl->cache_ctx == NULL || rl->sid_len == 0 || (probe = SSL_SESSION_new()) == NULL)
        return;
    if (SSL_SESSION_set1_id(probe, rl->sid, rl->sid_len) == 1
            && SSL_SESSION_set_protocol_version(probe, DTLS1_2_VERSION) == 1)
        SSL_CTX_remove_session(rl->cache_ctx, probe);
    SSL_SESSION_free(probe);
    rl->cache_ctx = NULL;
    ERR_clear_error();
}

/* An authenticated alert or handshake message. */
static void pd_rl_control(pd_conn *c, int type, const unsigned char *p, long len)
{
    struct pd_rl *rl = c->rl;
    if (type == SSL3_RT_ALERT) {
        if (len != 2)
            return;
        pd_rl_peer_done(rl);
        if (p[0] == SSL3_AL_FATAL) {
            pd_rl_forget_session(rl);
            c->alert_received = SSL3_AL_FATAL << 8 | p[1];
            c->ssl_error = SSL_ERROR_SSL;
            c->state = PD_STATE_FAILED;
        } else if (p[1] == SSL_AD_CLOSE_NOTIFY) {
            c->alert_received = SSL3_AL_WARNING << 8 | SSL_AD_CLOSE_NOTIFY;
            c->state = PD_STATE_PEER_CLOSED;
            pd_rl_alert(c, SSL3_AL_WARNING, SSL_AD_CLOSE_NOTIFY);
        }
        return;
    }
    if (type != SSL3_RT_HANDSHAKE || len < 12)
        return;
    if (p[0] == SSL3_MT_FINISHED) {
        if (rl->flight != NULL && rl->resends < PD_MAX_RESENDS)
            pd_rl_resend_flight(c); /* the peer missed our last flight */
    } else if (p[0] == SSL3_MT_CLIENT_HELLO || p[0] == SSL3_MT_HELLO_REQUEST) {
        pd_rl_alert(c, SSL3_AL_WARNING, SSL_AD_NO_RENEGOTIATION);
    }
}

/* Process every record of one datagram; returns the application records
 * delivered. Anything invalid is dropped, record by record. */
static long pd_rl_feed(pd_conn *c, const unsigned char *d, size_t n, pd_sink *sink)
{
    struct pd_rl *rl = c->rl;
    size_t off = 0, cl = rl->raw ? pd_cid_in_len(c) : 0;
    long delivered = 0;
    c->buffers_released = 0; /* in use again: the server may release it later */
    if (c->cid != NULL)
        c->cid->advanced = 0;
    while (c->state == PD_STATE_ESTABLISHED && n - off >= PD_RECORD_HEADER) {
        const unsigned char *r = d + off;
        size_t hdr = PD_RECORD_HEADER + (cl && r[0] == PD_RT_CID ? cl : 0), blen;
        unsigned long long seq;
        unsigned char *dst;
        pd_node *node = NULL;
        long plain;
        int type = r[0];
        if (n - off < hdr)
            break;
        blen = ((size_t)r[hdr - 2] << 8) | r[hdr - 1];
        if (blen > n - off - hdr)
            break; /* a cut record: the rest of the datagram cannot be framed */
        off += hdr + blen;
        if (r[1] != 0xFE || r[2] != 0xFD || (((unsigned int)r[3] << 8) | r[4]) != rl->epoch
                || blen > PD_MAX_PLAINTEXT + rl->explicit_iv + rl->tag + (cl ? 256 : 0))
            continue;
        if (cl ? hdr == PD_RECORD_HEADER || memcmp(r + 11, c->cid->id, cl) != 0
               : r[0] < SSL3_RT_ALERT || r[0] > SSL3_RT_APPLICATION_DATA)
            continue;
        if (rl->dec == NULL && !pd_rl_ready(rl))
            break; /* out of memory: the datagram is dropped, the association lives */
        seq = pd_seq48(r + 5);
        if (!pd_rl_fresh(rl, seq))
            continue;
        if (r[0] != SSL3_RT_APPLICATION_DATA && !cl) {
            dst = pd_scratch;
        } else if (sink != NULL) {
            if (blen > sink->cap - sink->used)
                continue;
            dst = (unsigned char *)sink->out + sink->used;
        } else {
            if (c->plain_bytes + blen > c->plain_limit
                    || (node = malloc(sizeof(pd_node) + blen)) == NULL) {
                c->plain_dropped++;
                continue;
            }
            dst = node->data;
        }
        plain = rl->raw ? pd_raw_open(rl, rl->dec, rl->riv, cl, r, hdr + blen, dst, &type)
                        : pd_rl_open(rl, rl->dec, r, blen, dst);
        if (plain < 0 || type < SSL3_RT_ALERT || type > SSL3_RT_APPLICATION_DATA) {
            free(node);
            continue;
        }
        if (c->cid != NULL && seq >= rl->rtop)
            c->cid->advanced = 1;
        pd_rl_mark(rl, seq);
        if (type != SSL3_RT_APPLICATION_DATA) {
            pd_rl_control(c, type, dst, plain);
            free(node);
            continue;
        }
        pd_rl_peer_done(rl);
        delivered++;
        if (sink != NULL) {
            sink->used += (size_t)plain;
            sink->ends[sink->count++] = sink->used;
            continue;
        }
        node->next = NULL;
        node->len = (size_t)plain;
        if (c->plain_tail)
            c->plain_tail->next = node;
        else
            c->plain_head = node;
        c->plain_tail = node;
        c->plain_count++;
        c->plain_bytes += (size_t)plain;
    }
    return delivered;
}

/* ------------------------------------------------------------ handover */

/* While OpenSSL runs the handshake: remember the sequence numbers our records
 * used, so that ours continue after them. */
static void pd_note_sent(pd_conn *c, const unsigned char *r)
{
    unsigned int epoch = ((unsigned int)r[3] << 8) | r[4];
    unsigned long long next = pd_seq48(r + 5) + 1;
    if (epoch <= 1 && next > c->sent_next[epoch])
        c->sent_next[epoch] = next;
}

/* Keep a copy of each protected record received before the handover; at the
 * handover, those that authenticate seed the anti-replay window. 0: more than
 * a real peer sends before it (the caller drops the datagram, so OpenSSL never
 * sees a record that was not kept). */
static int pd_retain_early(pd_conn *c, const unsigned char *d, size_t n)
{
    size_t off = 0, count = 0, bytes = 0;
    pd_node *head = NULL, *node;
    while (n - off >= PD_RECORD_HEADER) { /* pd_plausible framed them */
        const unsigned char *r = d + off;
        size_t len = PD_RECORD_HEADER + (((size_t)r[11] << 8) | r[12]);
        off += len;
        if (r[3] == 0 && r[4] == 0)
            continue;
        count++;
        bytes += len;
    }
    if (c->early_count + count > PD_MAX_EARLY || c->early_bytes + bytes > PD_MAX_EARLY_BYTES)
        return 0;
    for (off = 0; n - off >= PD_RECORD_HEADER; ) {
        const unsigned char *r = d + off;
        size_t len = PD_RECORD_HEADER + (((size_t)r[11] << 8) | r[12]);
        off += len;
        if (r[3] == 0 && r[4] == 0)
            continue;
        if ((node = pd_node_new(r, len)) == NULL) {
            pd_nodes_free(head);
            return 0;
        }
        node->next = head;
        head = node;
    }
    while (head != NULL) {
        node = head;
        head = head->next;
        node->next = c->early;
        c->early = node;
    }
    c->early_count += (int)count;
    c->early_bytes += bytes;
    return 1;
}

/* The engine's AEAD for a suite, with its framing; NULL for suites it leaves to libssl. */
static int pd_aead_for(const SSL_CIPHER *cipher, struct pd_rl *rl)
{
    const char *name = SSL_CIPHER_standard_name(cipher);
    rl->explicit_iv = 8, rl->iv_len = 4, rl->tag = 16;
    switch (SSL_CIPHER_get_cipher_nid(cipher)) {
    case NID_aes_128_gcm:
        rl->aead = pd_aes128gcm, rl->kind = PD_KIND_GCM;
        break;
    case NID_aes_256_gcm:
        rl->aead = pd_aes256gcm, rl->kind = PD_KIND_GCM;
        break;
    case NID_chacha20_poly1305:
        rl->aead = pd_chacha, rl->kind = PD_KIND_CHACHA;
        rl->explicit_iv = 0, rl->iv_len = 12;
        break;
    case NID_aes_128_ccm:
    case NID_aes_256_ccm:
        rl->aead = SSL_CIPHER_get_cipher_nid(cipher) == NID_aes_128_ccm ? pd_aes128ccm : pd_aes256ccm;
        rl->kind = PD_KIND_CCM;
        if (name != NULL && strstr(name, "CCM_8") != NULL)
            rl->tag = 8;
        break;
    default:
        return 0;
    }
    return rl->aead != NULL;
}

/* Our last flight, from the records the finishing handshake step wrote
 * (flight_len bytes from flight_start in the output run): kept as plaintext, so a
 * resend protects it again under new sequence numbers. Only the side that
 * sent the last flight has one (it holds our Finished, at epoch 1); opening
 * that Finished with our derived write key also proves the derivation. */
static int pd_take_flight(pd_conn *c, struct pd_rl *rl, EVP_CIPHER_CTX *check,
                          size_t flight_start, size_t flight_len)
{
    const unsigned char *p = c->out + c->out_off + flight_start;
    size_t off = 0;
    int epoch1 = 0;
    pd_node *head = NULL, **tail = &head;
    while (flight_len - off >= PD_RECORD_HEADER) {
        const unsigned char *r = p + off;
        size_t size = pd_rec_size(r, flight_len - off, pd_cid_out_len(c));
        unsigned int epoch = ((unsigned int)r[3] << 8) | r[4];
        pd_node *n;
        long plain = (long)size - PD_RECORD_HEADER;
        int type = r[0];
        if (size == 0 || epoch > 1 || (n = malloc(sizeof(pd_node) + 2 + size)) == NULL)
            goto fail;
        if (epoch == 1) {
            plain = rl->raw ? pd_raw_open(rl, check, rl->wiv, r[0] == PD_RT_CID ? pd_cid_out_len(c) : 0,
                                          r, size, n->data + 2, &type)
                            : pd_rl_open(rl, check, r, size - PD_RECORD_HEADER, n->data + 2);
            if (plain < 0) {
                free(n);
                goto fail;
            }
            epoch1 = 1;
        } else {
            memcpy(n->data + 2, r + PD_RECORD_HEADER, (size_t)plain);
        }
        n->data[0] = (unsigned char)type;
        n->data[1] = (unsigned char)epoch;
        n->len = 2 + (size_t)plain;
        n->next = NULL;
        *tail = n;
        tail = &n->next;
        off += size;
    }
    if (epoch1)
        rl->flight = head;
    else
        pd_nodes_free(head);
    return 1;
fail:
    pd_nodes_free(head);
    return 0;
}

static int pd_snapshot(pd_conn *c, struct pd_rl *rl)
{
    SSL *s = c->ssl;
    X509 *peer = SSL_get0_peer_certificate(s);
    const char *identity = SSL_get_psk_identity(s);
    const unsigned char *alpn = NULL;
    unsigned int alpn_len = 0, digest_len = 0;
    rl->version = SSL_get_version(s);
    rl->cipher = SSL_get_current_cipher(s);
    rl->srtp = SSL_get_selected_srtp_profile(s);
    rl->session_reused = SSL_session_reused(s);
    rl->extms = (int)SSL_get_extms_support(s);
    if (c->keep_session && !c->is_server
            && (rl->session_der_len = pd_session_der(SSL_get_session(s), &rl->session_der)) < 0)
        return 0;
    if (peer != NULL && ((rl->peer_der_len = i2d_X509(peer, &rl->peer_der)) <= 0
            || X509_digest(peer, EVP_sha256(), rl->peer_sha256, &digest_len) != 1))
        return 0;
    if (identity != NULL && (rl->psk_identity = OPENSSL_strdup(identity)) == NULL)
        return 0;
    SSL_get0_alpn_selected(s, &alpn, &alpn_len);
    if (alpn_len > 0) {
        if ((rl->alpn = malloc(alpn_len)) == NULL)
            return 0;
        memcpy(rl->alpn, alpn, alpn_len);
        rl->alpn_len = alpn_len;
    }
    return 1;
}

/* Both directions' keys and fixed IVs from the master secret and randoms:
 * key_block = PRF(master, "key expansion", server_random + client_random). */
static void pd_rl_derive(struct pd_rl *rl, int is_server)
{
    unsigned char block[2 * 32 + 2 * 12], seed[13 + 2 * PD_RANDOM];
    size_t k = rl->key_len, v = rl->iv_len;
    const unsigned char *ckey = block, *skey = block + k, *civ = block + 2 * k, *siv = civ + v;
    memcpy(seed, "key expansion", 13);
    memcpy(seed + 13, rl->secret + PD_MASTER + PD_RANDOM, PD_RANDOM);
    memcpy(seed + 13 + PD_RANDOM, rl->secret + PD_MASTER, PD_RANDOM);
    pd_prf(rl->prf_sha384, rl->secret, PD_MASTER, seed, sizeof(seed), block, 2 * k + 2 * v);
    memcpy(rl->wkey, is_server ? skey : ckey, k);
    memcpy(rl->rkey, is_server ? ckey : skey, k);
    memcpy(rl->wiv, is_server ? siv : civ, v);
    memcpy(rl->riv, is_server ? civ : siv, v);
    OPENSSL_cleanse(block, sizeof(block));
}

/* Take the records over from OpenSSL, which has just finished the handshake
 * and holds no unread input; then free the SSL. On any doubt, nothing
 * changes and OpenSSL keeps the records. */
static void pd_handover(pd_conn *c, size_t flight_start, size_t flight_len)
{
    SSL *s = c->ssl;
    const SSL_CIPHER *cipher = SSL_get_current_cipher(s);
    SSL_SESSION *session = SSL_get_session(s);
    const EVP_MD *prf;
    struct pd_rl *rl = NULL;
    EVP_CIPHER_CTX *check = NULL;
    size_t key_len, off;
    const unsigned char *run;
    pd_node *e;

    if (cipher == NULL || session == NULL || SSL_version(s) != DTLS1_2_VERSION
            || (rl = calloc(1, sizeof(*rl))) == NULL || !pd_aead_for(cipher, rl)
            || pd_raw_size(rl, pd_cid_out_len(c), c->cid ? c->cid->padding : 0, c->max_plaintext) > c->mtu)
        goto keep;
    rl->raw = pd_cid_out_len(c) > 0 || pd_cid_in_len(c) > 0;
    key_len = (size_t)EVP_CIPHER_get_key_length(rl->aead);
    rl->key_len = (unsigned int)key_len;
    rl->epoch = 1;
    prf = SSL_CIPHER_get_handshake_digest(cipher);
    rl->prf_sha384 = prf != NULL && EVP_MD_get_type(prf) == NID_sha384;
    if (prf == NULL || (EVP_MD_get_type(prf) != NID_sha256 && !rl->prf_sha384) || key_len > 32
            || SSL_SESSION_get_master_key(session, rl->secret, PD_MASTER) != PD_MASTER
            || SSL_get_client_random(s, rl->secret + PD_MASTER, PD_RANDOM) != PD_RANDOM
            || SSL_get_server_random(s, rl->secret + PD_MASTER + PD_RANDOM, PD_RANDOM) != PD_RANDOM)
        goto keep;
    pd_rl_derive(rl, c->is_server);
    /* sequence numbers: after every record OpenSSL sent, pulled or not */
    run = c->out + c->out_off;
    for (off = 0; c->out_len - off >= PD_RECORD_HEADER; ) {
        size_t len = pd_rec_size(run + off, c->out_len - off, pd_cid_out_len(c));
        if (len == 0)
            goto keep;
        pd_note_sent(c, run + off);
        off += len;
    }
    rl->wseq = c->sent_next[1];
    rl->wseq0 = c->sent_next[0];
    check = pd_aead_new(rl, rl->wkey, rl->wiv, 0);
    if (!pd_rl_ready(rl) || check == NULL
            || (flight_len && !pd_take_flight(c, rl, check, flight_start, flight_len)) || !pd_snapshot(c, rl))
        goto keep;
    for (e = c->early; e != NULL; e = e->next) {
        size_t blen = e->len - PD_RECORD_HEADER;
        int type;
        if (((e->data[3] << 8) | e->data[4]) == 1 && blen <= PD_MAX_PLAINTEXT + rl->explicit_iv + rl->tag
                && (rl->raw ? pd_raw_open(rl, rl->dec, rl->riv, 0, e->data, e->len, pd_scratch, &type)
                            : pd_rl_open(rl, rl->dec, e->data, blen, pd_scratch)) >= 0)
            pd_rl_mark(rl, pd_seq48(e->data + 5));
    }
    EVP_CIPHER_CTX_free(check);
    if (c->is_server && (SSL_CTX_get_session_cache_mode(SSL_get_SSL_CTX(s)) & SSL_SESS_CACHE_SERVER)) {
        const unsigned char *sid = SSL_SESSION_get_id(session, &rl->sid_len);
        if (rl->sid_len > sizeof(rl->sid))
            rl->sid_len = 0;
        memcpy(rl->sid, sid, rl->sid_len);
        rl->cache_ctx = SSL_get_SSL_CTX(s); /* the engine's owner keeps its context alive */
    }
    /* Freed without close_notify, OpenSSL would drop the session from its cache. */
    SSL_set_shutdown(s, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    SSL_free(s);
    c->ssl = NULL;
    c->rl = rl;
    return;
keep:
    EVP_CIPHER_CTX_free(check);
    pd_rl_free(rl);
    c->compact = 0;
    ERR_clear_error();
    if (pd_cid_out_len(c) > 0 || pd_cid_in_len(c) > 0)
        pd_cid_fail(c); /* CID records need the engine's layer */
}

/* --------------------------------------------------------- introspection */

/* RFC 5705 keying material: 1, or 0 on failure. The caller refuses the
 * labels TLS reserves (Dtls.export_keys). */
int pd_export(pd_conn *c, unsigned char *out, size_t len, const char *label, size_t label_len,
              const unsigned char *context, size_t context_len, int use_context)
{
    struct pd_rl *rl = c->rl;
    unsigned char *seed;
    size_t seed_len;
    int ok;
    if (rl == NULL) {
        if (c->ssl == NULL)
            return 0;
        ok = SSL_export_keying_material(c->ssl, out, len, label, label_len, context,
                                        context_len, use_context);
        ERR_clear_error();
        return ok == 1;
    }
    if (use_context && context_len > 0xFFFF)
        return 0;
    seed_len = label_len + 2 * PD_RANDOM + (use_context ? 2 + context_len : 0);
    if ((seed = malloc(seed_len)) == NULL)
        return 0;
    memcpy(seed, label, label_len);
    memcpy(seed + label_len, rl->secret + PD_MASTER, 2 * PD_RANDOM); /* client, server */
    if (use_context) {
        seed[label_len + 2 * PD_RANDOM] = (unsigned char)(context_len >> 8);
        seed[label_len + 2 * PD_RANDOM + 1] = (unsigned char)context_len;
        if (context_len)
            memcpy(seed + label_len + 2 * PD_RANDOM + 2, context, context_len);
    }
    pd_prf(rl->prf_sha384, rl->secret, PD_MASTER, seed, seed_len, out, len);
    free(seed);
    return 1;
}

const char *pd_version(pd_conn *c)
{
    return c->rl ? c->rl->version : c->ssl ? SSL_get_version(c->ssl) : NULL;
}

const SSL_CIPHER *pd_cipher(pd_conn *c)
{
    return c->rl ? c->rl->cipher : c->ssl ? SSL_get_current_cipher(c->ssl) : NULL;
}

const SRTP_PROTECTION_PROFILE *pd_srtp_profile(pd_conn *c)
{
    return c->rl ? c->rl->srtp : c->ssl ? SSL_get_selected_srtp_profile(c->ssl) : NULL;
}

/* 1 when the handshake used the extended master secret (RFC 7627). */
int pd_extms(pd_conn *c)
{
    return c->rl ? c->rl->extms : c->ssl ? (int)SSL_get_extms_support(c->ssl) : 0;
}

int pd_session_reused(pd_conn *c)
{
    return c->rl ? c->rl->session_reused : c->ssl ? SSL_session_reused(c->ssl) : 0;
}

const char *pd_psk_identity(pd_conn *c)
{
    return c->rl ? c->rl->psk_identity : c->ssl ? SSL_get_psk_identity(c->ssl) : NULL;
}

unsigned int pd_alpn(pd_conn *c, const unsigned char **data)
{
    unsigned int len = 0;
    *data = NULL;
    if (c->rl) {
        *data = c->rl->alpn;
        return c->rl->alpn_len;
    }
    if (c->ssl)
        SSL_get0_alpn_selected(c->ssl, data, &len);
    return len;
}

/* The peer's certificate (DER) once the records were handed over; 0 without
 * one, -1 when an idle spell dropped it (its sha-256 digest is kept). */
int pd_peer_der(pd_conn *c, const unsigned char **der)
{
    *der = c->rl ? c->rl->peer_der : NULL;
    return c->rl ? c->rl->peer_der_len : 0;
}

/* The peer certificate's sha-256 digest (32 bytes) after the handover, or NULL. */
const unsigned char *pd_peer_sha256(pd_conn *c)
{
    return c->rl != NULL && c->rl->peer_der_len != 0 ? c->rl->peer_sha256 : NULL;
}

static void pd_rl_drop_peer_der(struct pd_rl *rl)
{
    if (rl->peer_der != NULL) {
        OPENSSL_free(rl->peer_der);
        rl->peer_der = NULL;
        rl->peer_der_len = -1;
    }
}

/* Whether the engine's own record layer carries this association's records. */
int pd_compact(pd_conn *c)
{
    return c->rl != NULL;
}
