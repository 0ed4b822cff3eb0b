/*
 * Exporting an established association (the engine's record layer) as one
 * sealed blob, and importing it into a new engine that continues it: same
 * epoch and keys, record sequence numbers that go on, the replay window, and
 * what introspection reports.
 *
 * The plaintext never leaves this file: it is built in a local buffer,
 * sealed with AES-256-GCM under the caller's key and cleansed.
 *
 *   blob = version (1) || role (1) || key id (4) || nonce (12) || ciphertext || tag (16)
 *   additional data = version || role || key id || binding (32, the caller's digest
 *                     of the context's settings and its own binding bytes)
 *
 * Import never reuses a nonce: the write sequence number jumps by the gap the
 * exporter recorded, plus one per microsecond since the export, plus a random
 * amount below 2^8 (far below what a microsecond lets an association send). A snapshot imported after the live association sent up
 * to `gap` more records starts beyond them; of two imports of one blob, the
 * later one starts beyond what the earlier one sent (unless that exceeded
 * about a million records a second), and two at the same moment differ by
 * the random part. 2^48 sequence numbers last 8 years of wall time this way.
 */
#include <sys/time.h>

#define PD_ASSOC_VERSION 2          /* 2 adds the Connection IDs; 1 is still read */
#define PD_ASSOC_HEADER (1 + 1 + 4 + 12)
#define PD_ASSOC_TAG 16
#define PD_ASSOC_PLAIN_MAX 2048

#define PD_ASSOC_ERR_STATE -1    /* not established, or not on the engine's record layer */
#define PD_ASSOC_ERR_PENDING -2  /* output not pulled, or records not read */
#define PD_ASSOC_ERR_SPACE -3
#define PD_ASSOC_ERR_CRYPTO -4
#define PD_ASSOC_ERR_FORMAT -5   /* truncated or malformed */
#define PD_ASSOC_ERR_VERSION -6
#define PD_ASSOC_ERR_KEY -7      /* no key with that id */
#define PD_ASSOC_ERR_AUTH -8     /* wrong key, tampered, or another binding */
#define PD_ASSOC_ERR_SUITE -9    /* the importing context does not offer the suite */
#define PD_ASSOC_ERR_NOMEM -10

static unsigned long long pd_wall_us(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (unsigned long long)tv.tv_sec * 1000000ULL + (unsigned long long)tv.tv_usec;
}

typedef struct pd_wbuf {
    unsigned char *p;
    size_t len, cap;
    int ok;
} pd_wbuf;

static void pd_put(pd_wbuf *b, const void *data, size_t n)
{
    if (n == 0)
        return;
    if (!b->ok || n > b->cap - b->len) {
        b->ok = 0;
        return;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void pd_put_uint(pd_wbuf *b, unsigned long long v, int bytes)
{
    unsigned char tmp[8];
    int i;
    for (i = 0; i < bytes; i++)
        tmp[i] = (unsigned char)(v >> (8 * (bytes - 1 - i)));
    pd_put(b, tmp, (size_t)bytes);
}

typedef struct pd_rbuf {
    const unsigned char *p;
    size_t len, off;
    int ok;
} pd_rbuf;

static const unsigned char *pd_get(pd_rbuf *b, size_t n)
{
    const unsigned char *at;
    if (!b->ok || n > b->len - b->off) {
        b->ok = 0;
        return NULL;
    }
    at = b->p + b->off;
    b->off += n;
    return at;
}

static unsigned long long pd_get_uint(pd_rbuf *b, int bytes)
{
    const unsigned char *at = pd_get(b, (size_t)bytes);
    unsigned long long v = 0;
    int i;
    for (i = 0; at != NULL && i < bytes; i++)
        v = (v << 8) | at[i];
    return v;
}

/* AES-256-GCM over plain with aad; 1 on success (decrypt: the tag verified). */
static int pd_assoc_aead(int enc, const unsigned char *key, const unsigned char *nonce,
                         const unsigned char *aad, size_t aad_len, const unsigned char *in,
                         size_t len, unsigned char *out, unsigned char *tag)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int outl = 0, ok;
    ok = ctx != NULL
        && EVP_CipherInit_ex(ctx, pd_aes256gcm != NULL ? pd_aes256gcm : EVP_aes_256_gcm(), NULL, NULL,
                             NULL, enc) == 1 /* fetched once: an implicit fetch per call costs */
        && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) > 0
        && EVP_CipherInit_ex(ctx, NULL, NULL, key, nonce, enc) == 1
        && EVP_CipherUpdate(ctx, NULL, &outl, aad, (int)aad_len) == 1
        && EVP_CipherUpdate(ctx, out, &outl, in, (int)len) == 1
        && (enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, PD_ASSOC_TAG, tag) > 0)
        && EVP_CipherFinal_ex(ctx, out + outl, &outl) == 1
        && (!enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, PD_ASSOC_TAG, tag) > 0);
    EVP_CIPHER_CTX_free(ctx);
    ERR_clear_error();
    return ok;
}

/* Export c, sealed under key (32 bytes, id key_id), bound to binding (32);
 * the importer's write sequence numbers jump by gap. The blob's length, or
 * PD_ASSOC_ERR_*. On success the association is gone from c: its state is
 * PD_STATE_EXPORTED and its key material cleansed. */
long pd_export_association(pd_conn *c, const unsigned char *key, const unsigned char *key_id,
                           const unsigned char *binding, unsigned long long gap,
                           unsigned char *out, size_t cap)
{
    struct pd_rl *rl = c->rl;
    unsigned char plain[PD_ASSOC_PLAIN_MAX], aad[6 + 32];
    pd_wbuf b = { plain, 0, sizeof(plain), 1 };
    size_t psk = rl && rl->psk_identity ? strlen(rl->psk_identity) : 0;
    long total;
    if (rl == NULL || c->state != PD_STATE_ESTABLISHED)
        return PD_ASSOC_ERR_STATE;
    if (c->out_len != 0 || c->plain_head != NULL)
        return PD_ASSOC_ERR_PENDING;
    pd_put_uint(&b, SSL_CIPHER_get_protocol_id(rl->cipher), 2);
    pd_put_uint(&b, rl->epoch, 2);
    pd_put_uint(&b, rl->wseq, 8);
    pd_put_uint(&b, rl->wseq0, 8);
    pd_put_uint(&b, rl->rtop, 8);
    pd_put_uint(&b, rl->rmask, 8);
    pd_put_uint(&b, gap, 8);
    pd_put_uint(&b, pd_wall_us(), 8);
    pd_put_uint(&b, (unsigned long long)(rl->session_reused | rl->extms << 1), 1);
    pd_put_uint(&b, c->mtu, 2);
    pd_put_uint(&b, c->max_plaintext, 2);
    pd_put_uint(&b, rl->srtp ? rl->srtp->id : 0, 2);
    pd_put(&b, rl->secret, sizeof(rl->secret));
    pd_put_uint(&b, rl->alpn_len, 1);
    pd_put(&b, rl->alpn, rl->alpn_len);
    pd_put_uint(&b, psk, 1);
    pd_put(&b, rl->psk_identity, psk);
    if (rl->peer_der_len == 0) {
        pd_put_uint(&b, 0, 1);
    } else if (rl->peer_der == NULL || !c->keep_peer_cert) {
        pd_put_uint(&b, 1, 1);
        pd_put(&b, rl->peer_sha256, 32);
    } else {
        pd_put_uint(&b, 2, 1);
        pd_put(&b, rl->peer_sha256, 32);
        pd_put_uint(&b, (unsigned long long)rl->peer_der_len, 2);
        pd_put(&b, rl->peer_der, (size_t)rl->peer_der_len);
    }
    if (c->cid == NULL || !c->cid->negotiated) {
        pd_put_uint(&b, 0, 1);
    } else {
        pd_put_uint(&b, 1, 1);
        pd_put_uint(&b, c->cid->padding, 2);
        pd_put_uint(&b, c->cid->rx_len, 1);
        pd_put(&b, c->cid->id, c->cid->rx_len);
        pd_put_uint(&b, c->cid->tx_len, 1);
        pd_put(&b, c->cid->id + c->cid->rx_len, c->cid->tx_len);
    }
    total = (long)(PD_ASSOC_HEADER + b.len + PD_ASSOC_TAG);
    if (!b.ok || psk > 255 || rl->alpn_len > 255 || (size_t)total > cap) {
        OPENSSL_cleanse(plain, sizeof(plain));
        return b.ok && psk <= 255 && rl->alpn_len <= 255 ? PD_ASSOC_ERR_SPACE : PD_ASSOC_ERR_FORMAT;
    }
    out[0] = PD_ASSOC_VERSION;
    out[1] = (unsigned char)c->is_server;
    memcpy(out + 2, key_id, 4);
    if (RAND_bytes(out + 6, 12) != 1) {
        OPENSSL_cleanse(plain, sizeof(plain));
        return PD_ASSOC_ERR_CRYPTO;
    }
    memcpy(aad, out, 6);
    memcpy(aad + 6, binding, 32);
    if (!pd_assoc_aead(1, key, out + 6, aad, sizeof(aad), plain, b.len, out + PD_ASSOC_HEADER,
                       out + PD_ASSOC_HEADER + b.len)) {
        OPENSSL_cleanse(plain, sizeof(plain));
        return PD_ASSOC_ERR_CRYPTO;
    }
    OPENSSL_cleanse(plain, sizeof(plain));
    pd_rl_free(rl); /* a move: the exporting engine keeps nothing */
    c->rl = NULL;
    c->state = PD_STATE_EXPORTED;
    return total;
}

static const SSL_CIPHER *pd_ctx_cipher(SSL_CTX *ctx, unsigned int id)
{
    STACK_OF(SSL_CIPHER) *sk = SSL_CTX_get_ciphers(ctx);
    int i;
    for (i = 0; i < sk_SSL_CIPHER_num(sk); i++)
        if ((SSL_CIPHER_get_protocol_id(sk_SSL_CIPHER_value(sk, i)) & 0xFFFF) == id)
            return sk_SSL_CIPHER_value(sk, i);
    return NULL;
}

static const SRTP_PROTECTION_PROFILE *pd_ctx_srtp(SSL_CTX *ctx, unsigned long id)
{
    SSL *s = SSL_new(ctx);
    STACK_OF(SRTP_PROTECTION_PROFILE) *sk = s != NULL ? SSL_get_srtp_profiles(s) : NULL;
    const SRTP_PROTECTION_PROFILE *found = NULL;
    int i;
    for (i = 0; sk != NULL && i < sk_SRTP_PROTECTION_PROFILE_num(sk); i++)
        if (sk_SRTP_PROTECTION_PROFILE_value(sk, i)->id == id)
            found = sk_SRTP_PROTECTION_PROFILE_value(sk, i); /* libssl's static table */
    SSL_free(s);
    return found;
}

/* Parse an opened blob into a new record layer for c (whose role it fixes). */
static int pd_assoc_parse(pd_conn *c, SSL_CTX *ctx, const unsigned char *plain, size_t len,
                          int version)
{
    pd_rbuf b = { plain, len, 0, 1 };
    struct pd_rl *rl = calloc(1, sizeof(*rl));
    unsigned int id, flags, n, peer;
    unsigned long long gap, exported, now, jump = 0;
    const unsigned char *at;
    const EVP_MD *prf;
    if (rl == NULL)
        return PD_ASSOC_ERR_NOMEM;
    id = (unsigned int)pd_get_uint(&b, 2);
    rl->epoch = (unsigned int)pd_get_uint(&b, 2);
    rl->wseq = pd_get_uint(&b, 8);
    rl->wseq0 = pd_get_uint(&b, 8);
    rl->rtop = pd_get_uint(&b, 8);
    rl->rmask = pd_get_uint(&b, 8);
    gap = pd_get_uint(&b, 8);
    exported = pd_get_uint(&b, 8);
    flags = (unsigned int)pd_get_uint(&b, 1);
    c->mtu = (unsigned int)pd_get_uint(&b, 2);
    c->max_plaintext = (size_t)pd_get_uint(&b, 2);
    n = (unsigned int)pd_get_uint(&b, 2);
    if (b.ok && n != 0 && (rl->srtp = pd_ctx_srtp(ctx, n)) == NULL)
        goto suite;
    at = pd_get(&b, sizeof(rl->secret));
    if (at != NULL)
        memcpy(rl->secret, at, sizeof(rl->secret));
    n = (unsigned int)pd_get_uint(&b, 1);
    at = pd_get(&b, n);
    if (at != NULL && n > 0) {
        if ((rl->alpn = malloc(n)) == NULL)
            goto nomem;
        memcpy(rl->alpn, at, n);
        rl->alpn_len = n;
    }
    n = (unsigned int)pd_get_uint(&b, 1);
    at = pd_get(&b, n);
    if (at != NULL && n > 0) {
        if ((rl->psk_identity = OPENSSL_malloc(n + 1)) == NULL)
            goto nomem;
        memcpy(rl->psk_identity, at, n);
        rl->psk_identity[n] = '\0';
    }
    peer = (unsigned int)pd_get_uint(&b, 1);
    if (peer > 2)
        b.ok = 0;
    if (peer >= 1 && (at = pd_get(&b, 32)) != NULL) {
        memcpy(rl->peer_sha256, at, 32);
        rl->peer_der_len = -1;
    }
    if (peer == 2) {
        n = (unsigned int)pd_get_uint(&b, 2);
        at = pd_get(&b, n);
        if (at != NULL && n > 0) {
            if ((rl->peer_der = OPENSSL_malloc(n)) == NULL)
                goto nomem;
            memcpy(rl->peer_der, at, n);
            rl->peer_der_len = (int)n;
        }
    }
    if (version >= 2 && pd_get_uint(&b, 1) == 1) {
        unsigned int padding = (unsigned int)pd_get_uint(&b, 2), rx, tx;
        const unsigned char *rx_id, *tx_id;
        rx = (unsigned int)pd_get_uint(&b, 1);
        rx_id = pd_get(&b, rx);
        tx = (unsigned int)pd_get_uint(&b, 1);
        tx_id = pd_get(&b, tx);
        if (b.ok && padding <= 256) {
            if ((c->cid = calloc(1, sizeof(struct pd_cid) + rx + tx)) == NULL)
                goto nomem;
            c->cid->negotiated = 1;
            c->cid->padding = padding;
            c->cid->rx_len = (unsigned char)rx;
            c->cid->tx_len = (unsigned char)tx;
            if (rx)
                memcpy(c->cid->id, rx_id, rx);
            if (tx)
                memcpy(c->cid->id + rx, tx_id, tx);
            rl->raw = rx > 0 || tx > 0;
        } else {
            b.ok = 0;
        }
    }
    if (!b.ok || b.off != b.len || rl->epoch == 0 || c->mtu < 256 || c->max_plaintext == 0
            || c->max_plaintext > PD_MAX_PLAINTEXT)
        goto format;
    if ((rl->cipher = pd_ctx_cipher(ctx, id)) == NULL || !pd_aead_for(rl->cipher, rl))
        goto suite;
    prf = SSL_CIPHER_get_handshake_digest(rl->cipher);
    rl->prf_sha384 = prf != NULL && EVP_MD_get_type(prf) == NID_sha384;
    rl->key_len = (unsigned int)EVP_CIPHER_get_key_length(rl->aead);
    rl->version = "DTLSv1.2";
    rl->session_reused = (int)(flags & 1);
    rl->extms = (int)((flags >> 1) & 1);
    if (pd_raw_size(rl, pd_cid_out_len(c), c->cid ? c->cid->padding : 0, c->max_plaintext) > c->mtu)
        goto format;
    if (RAND_bytes((unsigned char *)&jump, 1) != 1)
        goto nomem;
    jump &= 0xFFULL;
    now = pd_wall_us();
    if (now > exported) /* a clock behind the exporter's adds nothing */
        jump += now - exported > PD_SEQ_MAX ? PD_SEQ_MAX : now - exported;
    if (gap > PD_SEQ_MAX || jump > PD_SEQ_MAX || rl->wseq > PD_SEQ_MAX - gap - jump) {
        rl->wseq = PD_SEQ_MAX + 1; /* exhausted: the first write fails, nothing is reused */
    } else {
        rl->wseq += gap + jump;
    }
    pd_rl_derive(rl, c->is_server); /* the cipher contexts come with the first record */
    c->rl = rl;
    c->state = PD_STATE_ESTABLISHED;
    return 0;
format:
    pd_rl_free(rl);
    return PD_ASSOC_ERR_FORMAT;
suite:
    pd_rl_free(rl);
    return PD_ASSOC_ERR_SUITE;
nomem:
    pd_rl_free(rl);
    return PD_ASSOC_ERR_NOMEM;
}

/* A new engine continuing the association sealed in blob. keys holds nkeys
 * entries of 4-byte id + 32-byte key; binding is the importer's digest.
 * NULL with *err set on failure. */
pd_conn *pd_import_association(SSL_CTX *ctx, const unsigned char *keys, size_t nkeys,
                               const unsigned char *binding, const unsigned char *blob,
                               size_t len, unsigned int rto_initial_us, unsigned int rto_max_us,
                               int *err)
{
    unsigned char plain[PD_ASSOC_PLAIN_MAX], aad[6 + 32], tag[PD_ASSOC_TAG];
    const unsigned char *key = NULL;
    size_t body, i;
    pd_conn *c;
    int r;
    *err = PD_ASSOC_ERR_FORMAT;
    if (len < PD_ASSOC_HEADER + PD_ASSOC_TAG || len - PD_ASSOC_HEADER - PD_ASSOC_TAG > sizeof(plain))
        return NULL;
    if (blob[0] != PD_ASSOC_VERSION && blob[0] != 1) {
        *err = PD_ASSOC_ERR_VERSION;
        return NULL;
    }
    if (blob[1] > 1)
        return NULL;
    for (i = 0; i < nkeys && key == NULL; i++)
        if (CRYPTO_memcmp(keys + 36 * i, blob + 2, 4) == 0)
            key = keys + 36 * i + 4;
    if (key == NULL) {
        *err = PD_ASSOC_ERR_KEY;
        return NULL;
    }
    body = len - PD_ASSOC_HEADER - PD_ASSOC_TAG;
    memcpy(aad, blob, 6);
    memcpy(aad + 6, binding, 32);
    memcpy(tag, blob + len - PD_ASSOC_TAG, PD_ASSOC_TAG);
    if (!pd_assoc_aead(0, key, blob + 6, aad, sizeof(aad), blob + PD_ASSOC_HEADER, body, plain, tag)) {
        OPENSSL_cleanse(plain, sizeof(plain));
        *err = PD_ASSOC_ERR_AUTH;
        return NULL;
    }
    c = calloc(1, sizeof(pd_conn));
    if (c == NULL) {
        OPENSSL_cleanse(plain, sizeof(plain));
        *err = PD_ASSOC_ERR_NOMEM;
        return NULL;
    }
    c->alert_received = c->alert_sent = -1;
    c->is_server = blob[1];
    c->rto_initial_us = rto_initial_us;
    c->rto_max_us = rto_max_us;
    c->plain_limit = 1 << 20;
    c->compact = 1;
    r = pd_assoc_parse(c, ctx, plain, body, blob[0]);
    OPENSSL_cleanse(plain, sizeof(plain));
    if (r != 0) {
        pd_cid_free(c->cid);
        free(c);
        *err = r;
        return NULL;
    }
    *err = 0;
    return c;
}
