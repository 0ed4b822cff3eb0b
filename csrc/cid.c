/*
 * Connection ID for DTLS 1.2 (RFC 9146).
 *
 * Negotiation: OpenSSL's custom-extension API carries the connection_id
 * extension (type 54) in ClientHello and ServerHello; each side says the CID
 * it wants in the records it receives (empty: none). Once both sent it, every
 * record protected at epoch >= 1 towards a peer that asked for a non-empty
 * CID uses the tls12_cid format:
 *
 *   record  = 25 | version | epoch | seq (6) | cid | length (2) | protected inner
 *   inner   = content | real type (1) | zeros (padding)
 *   AAD     = ff x 8 | 25 | cid length (1) | 25 | version | epoch | seq | cid | inner length (2)
 *
 * The AAD is longer than the 13 bytes OpenSSL's TLS-mode AEAD takes, so an
 * association with a CID seals and opens with the plain AEAD interface (one
 * nonce per record: GCM and CCM salt || epoch || seq, ChaCha20 IV ^ seq).
 *
 * During the handshake libssl writes and reads the Finished flight at epoch
 * 1 in its own format. The engine translates those records as they pass the
 * BIO: it derives the epoch-1 keys as soon as the master secret exists
 * (pd_cid_keys), opens libssl's record and seals it again as a CID record on
 * the way out, and the reverse on the way in. The translated copies handed
 * to libssl never leave the process.
 */
static size_t pd_cid_out_len(const pd_conn *c)
{
    return c->cid != NULL && c->cid->negotiated ? c->cid->tx_len : 0;
}

static size_t pd_cid_in_len(const pd_conn *c)
{
    return c->cid != NULL && c->cid->negotiated ? c->cid->rx_len : 0;
}

/* Size of the record at r in a run of avail bytes (type-25 records carry cl
 * bytes of CID before the length); 0 when it is cut. */
static size_t pd_rec_size(const unsigned char *r, size_t avail, size_t cl)
{
    size_t h = PD_RECORD_HEADER + (r[0] == PD_RT_CID ? cl : 0), len;
    if (avail < h)
        return 0;
    len = ((size_t)r[h - 2] << 8) | r[h - 1];
    return len > avail - h ? 0 : h + len;
}

/* ------------------------------------------------------- plain AEAD */

/* A context keyed for key in one direction (OpenSSL's CCM cannot switch),
 * used for one record at a time with its own nonce. */
static EVP_CIPHER_CTX *pd_raw_new(const struct pd_rl *rl, const unsigned char *key, int enc)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int ok;
    if (ctx == NULL)
        return NULL;
    if (rl->kind == PD_KIND_CCM)
        ok = EVP_CipherInit_ex(ctx, rl->aead, NULL, NULL, NULL, enc) == 1
            && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) > 0
            && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, (int)rl->tag, NULL) > 0 /* before the key */
            && EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, enc) == 1;
    else
        ok = EVP_CipherInit_ex(ctx, rl->aead, NULL, key, NULL, enc) == 1;
    if (ok)
        return ctx;
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

/* The record's nonce: GCM and CCM take the fixed IV and the explicit part
 * carried in the record; ChaCha20 XORs the epoch and sequence number in. */
static void pd_raw_nonce(const struct pd_rl *rl, const unsigned char *iv,
                         const unsigned char *seq8, const unsigned char *explicit_part,
                         unsigned char nonce[12])
{
    int i;
    if (rl->kind == PD_KIND_CHACHA) {
        memcpy(nonce, iv, 12);
        for (i = 0; i < 8; i++)
            nonce[4 + i] ^= seq8[i];
    } else {
        memcpy(nonce, iv, 4);
        memcpy(nonce + 4, explicit_part, 8);
    }
}

/* In place is fine (out == in). Decrypting checks the tag at tag. 1: done. */
static int pd_raw_aead(const struct pd_rl *rl, EVP_CIPHER_CTX *ctx, int enc,
                       const unsigned char nonce[12], const unsigned char *aad, size_t aad_len,
                       const unsigned char *in, size_t len, unsigned char *out, unsigned char *tag)
{
    int outl = 0, ok;
    if (rl->kind == PD_KIND_CCM) {
        ok = EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, enc) == 1
            && (enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, (int)rl->tag, tag) > 0)
            && EVP_CipherUpdate(ctx, NULL, &outl, NULL, (int)len) == 1
            && EVP_CipherUpdate(ctx, NULL, &outl, aad, (int)aad_len) == 1
            && EVP_CipherUpdate(ctx, out, &outl, in, (int)len) == 1
            && (!enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, (int)rl->tag, tag) > 0);
    } else {
        ok = EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, enc) == 1
            && EVP_CipherUpdate(ctx, NULL, &outl, aad, (int)aad_len) == 1
            && (len == 0 || EVP_CipherUpdate(ctx, out, &outl, in, (int)len) == 1)
            && (enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, (int)rl->tag, tag) > 0)
            && EVP_CipherFinal_ex(ctx, out + outl, &outl) == 1
            && (!enc || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, (int)rl->tag, tag) > 0);
    }
    if (!ok)
        pd_clear_errors();
    return ok;
}

/* The additional data of record r (header of 13 + cl bytes) for an inner
 * plaintext of len bytes: RFC 9146 §5 with a CID, RFC 5246's without. */
static size_t pd_raw_aad(const unsigned char *r, size_t cl, size_t len, unsigned char *aad)
{
    if (cl == 0) {
        memcpy(aad, r + 3, 8);
        memcpy(aad + 8, r, 3);
        aad[11] = (unsigned char)(len >> 8);
        aad[12] = (unsigned char)len;
        return PD_RECORD_HEADER;
    }
    memset(aad, 0xFF, 8);
    aad[8] = PD_RT_CID;
    aad[9] = (unsigned char)cl;
    aad[10] = PD_RT_CID;
    memcpy(aad + 11, r + 1, 10); /* version, epoch, sequence number */
    memcpy(aad + 21, r + 11, cl);
    aad[21 + cl] = (unsigned char)(len >> 8);
    aad[22 + cl] = (unsigned char)len;
    return 23 + cl;
}

/* Bytes a record of len content bytes takes with a CID of cl bytes. */
static size_t pd_raw_size(const struct pd_rl *rl, size_t cl, unsigned int padding, size_t len)
{
    size_t inner = len + (cl ? 1 : 0);
    if (cl && padding > 1 && inner % padding)
        inner += padding - inner % padding;
    return PD_RECORD_HEADER + cl + rl->explicit_iv + inner + rl->tag;
}

/* Seal one record at r (room for pd_raw_size bytes) with the plain AEAD:
 * a CID record when cl > 0. Returns its size, or 0. */
static size_t pd_raw_seal(const struct pd_rl *rl, EVP_CIPHER_CTX *ctx, const unsigned char *iv,
                          const unsigned char *cid, size_t cl, unsigned int padding, int type,
                          unsigned int epoch, unsigned long long seq, const void *data,
                          size_t len, unsigned char *r)
{
    size_t total = pd_raw_size(rl, cl, padding, len);
    size_t hdr = PD_RECORD_HEADER + cl, inner = total - hdr - rl->explicit_iv - rl->tag;
    unsigned char aad[23 + PD_CID_MAX], nonce[12], *p = r + hdr, *q = p + rl->explicit_iv;
    size_t aad_len;
    pd_put_header(r, cl ? PD_RT_CID : type, epoch, seq, total - hdr);
    if (cl) {
        memmove(r + hdr - 2, r + 11, 2);
        memcpy(r + 11, cid, cl);
    }
    if (rl->explicit_iv)
        memcpy(p, r + 3, 8); /* explicit nonce: epoch and sequence number */
    memmove(q, data, len);
    if (cl) {
        q[len] = (unsigned char)type;
        memset(q + len + 1, 0, inner - len - 1);
    }
    aad_len = pd_raw_aad(r, cl, inner, aad);
    pd_raw_nonce(rl, iv, r + 3, p, nonce);
    if (!pd_raw_aead(rl, ctx, 1, nonce, aad, aad_len, q, inner, q, q + inner))
        return 0;
    OPENSSL_cleanse(nonce, sizeof(nonce));
    return total;
}

/* Open record r (tot bytes, a CID record when cl > 0) into dst (room for the
 * record's size). Returns the content length and sets *type, or -1. */
static long pd_raw_open(const struct pd_rl *rl, EVP_CIPHER_CTX *ctx, const unsigned char *iv,
                        size_t cl, const unsigned char *r, size_t tot, unsigned char *dst,
                        int *type)
{
    size_t hdr = PD_RECORD_HEADER + cl, inner, aad_len;
    unsigned char aad[23 + PD_CID_MAX], nonce[12], tag[16];
    const unsigned char *p = r + hdr;
    if (tot < hdr + rl->explicit_iv + rl->tag + (cl ? 1 : 0))
        return -1;
    inner = tot - hdr - rl->explicit_iv - rl->tag;
    if (inner > PD_MAX_PLAINTEXT + (cl ? 256 : 0))
        return -1;
    aad_len = pd_raw_aad(r, cl, inner, aad);
    pd_raw_nonce(rl, iv, r + 3, p, nonce);
    memcpy(tag, p + rl->explicit_iv + inner, rl->tag);
    if (!pd_raw_aead(rl, ctx, 0, nonce, aad, aad_len, p + rl->explicit_iv, inner, dst, tag))
        return -1;
    if (!cl) {
        *type = r[0];
        return (long)inner;
    }
    while (inner > 0 && dst[inner - 1] == 0)
        inner--;
    if (inner == 0)
        return -1; /* all padding: no content type */
    *type = dst[inner - 1];
    return inner - 1 > PD_MAX_PLAINTEXT ? -1 : (long)(inner - 1);
}

/* ------------------------------------------------- handshake translation */

/* The epoch-1 keys of the handshake in progress, once its master secret
 * exists; rebuilt if the handshake's secret changed (a declined resumption). */
static struct pd_rl *pd_cid_keys(pd_conn *c)
{
    struct pd_cid *cid = c->cid;
    SSL *s = c->ssl;
    SSL_SESSION *session = s != NULL ? SSL_get_session(s) : NULL;
    const SSL_CIPHER *cipher = s != NULL ? SSL_get_pending_cipher(s) : NULL;
    unsigned char secret[PD_MASTER + 2 * PD_RANDOM];
    struct pd_rl *rl;
    const EVP_MD *prf;
    if (cipher == NULL && s != NULL)
        cipher = SSL_get_current_cipher(s);
    if (session == NULL || cipher == NULL
            || SSL_SESSION_get_master_key(session, secret, PD_MASTER) != PD_MASTER
            || SSL_get_client_random(s, secret + PD_MASTER, PD_RANDOM) != PD_RANDOM
            || SSL_get_server_random(s, secret + PD_MASTER + PD_RANDOM, PD_RANDOM) != PD_RANDOM) {
        OPENSSL_cleanse(secret, sizeof(secret));
        return NULL;
    }
    if (cid->xl != NULL && cid->xl->cipher == cipher
            && CRYPTO_memcmp(cid->xl->secret, secret, sizeof(secret)) == 0) {
        OPENSSL_cleanse(secret, sizeof(secret));
        return cid->xl;
    }
    pd_rl_free(cid->xl);
    cid->xl = NULL;
    rl = calloc(1, sizeof(*rl));
    prf = SSL_CIPHER_get_handshake_digest(cipher);
    if (rl == NULL || !pd_aead_for(cipher, rl) || prf == NULL
            || (EVP_MD_get_type(prf) != NID_sha256 && EVP_MD_get_type(prf) != NID_sha384)) {
        OPENSSL_cleanse(secret, sizeof(secret));
        pd_rl_free(rl);
        cid->failed = 1; /* not a suite the engine's record layer carries */
        return NULL;
    }
    memcpy(rl->secret, secret, sizeof(secret));
    OPENSSL_cleanse(secret, sizeof(secret));
    rl->cipher = cipher;
    rl->raw = 1;
    rl->epoch = 1;
    rl->prf_sha384 = EVP_MD_get_type(prf) == NID_sha384;
    rl->key_len = (unsigned int)EVP_CIPHER_get_key_length(rl->aead);
    pd_rl_derive(rl, c->is_server);
    if (!pd_rl_ready(rl)) {
        pd_rl_free(rl);
        return NULL;
    }
    cid->xl = rl;
    return rl;
}

/* libssl writes records (in its format) towards a peer that asked for a CID:
 * epoch-1 records go out as CID records. 1, or 0 (libssl then fails). */
static int pd_cid_write(pd_conn *c, const unsigned char *in, size_t n)
{
    struct pd_cid *cid = c->cid;
    size_t off = 0, cl = cid->tx_len;
    while (off < n) {
        const unsigned char *r = in + off;
        size_t size = pd_rec_size(r, n - off, 0);
        struct pd_rl *xl;
        unsigned char *tmp;
        EVP_CIPHER_CTX *back;
        size_t out = 0;
        long plain;
        int type, ok;
        if (size == 0 || r[0] == PD_RT_CID)
            return 0;
        off += size;
        if (r[3] == 0 && r[4] == 0) {
            if (!pd_out_append(c, r, size))
                return 0;
            continue;
        }
        if ((xl = pd_cid_keys(c)) == NULL) {
            cid->failed = 1;
            return 0;
        }
        if ((tmp = malloc(size)) == NULL)
            return 0;
        if ((back = pd_raw_new(xl, xl->wkey, 0)) == NULL) {
            free(tmp);
            return 0;
        }
        plain = pd_raw_open(xl, back, xl->wiv, 0, r, size, tmp, &type);
        EVP_CIPHER_CTX_free(back);
        if (plain >= 0)
            out = pd_raw_size(xl, cl, cid->padding, (size_t)plain);
        ok = plain >= 0 && pd_out_reserve(c, out)
            && pd_raw_seal(xl, xl->enc, xl->wiv, cid->id + cid->rx_len, cl, cid->padding, type,
                           ((unsigned int)r[3] << 8) | r[4], pd_seq48(r + 5), tmp, (size_t)plain,
                           c->out + c->out_off + c->out_len);
        OPENSSL_cleanse(tmp, size);
        free(tmp);
        if (!ok) {
            cid->failed = 1;
            return 0;
        }
        c->out_len += out;
    }
    return 1;
}

/* Before the handover, a datagram with CID records: what precedes the first
 * goes to libssl as it is (it may be what creates the master secret), then
 * the rest, each CID record translated to libssl's format. Records that do
 * not open are dropped. */
static int pd_cid_feed(pd_conn *c, const unsigned char *data, size_t len)
{
    struct pd_cid *cid;
    size_t off = 0, first, used = 0, cl;
    unsigned char *buf;
    int count = 0, r;
    while (off < len && data[off] != PD_RT_CID) {
        size_t size = pd_rec_size(data + off, len - off, 0);
        if (size == 0)
            return 0;
        off += size;
    }
    first = off;
    if (first > 0 && ((count = pd_feed_ssl(c, data, first)) < 0 || c->state > PD_STATE_ESTABLISHED))
        return count;
    if (c->rl != NULL) { /* the handshake finished: the rest is for the engine's layer */
        count += (int)pd_rl_feed(c, data + first, len - first, NULL);
        return c->state == PD_STATE_FAILED ? PD_ERR_SSL : count;
    }
    /* the prefix may have been the hello that negotiated the CIDs (an abbreviated
     * handshake sends ServerHello, ChangeCipherSpec and Finished together) */
    cid = c->cid;
    if ((cl = pd_cid_in_len(c)) == 0)
        return count; /* no CID of ours was agreed: CID records are invalid here */
    if ((buf = malloc(len - first)) == NULL)
        return count;
    for (off = first; off < len; ) {
        const unsigned char *rec = data + off;
        size_t size = pd_rec_size(rec, len - off, cl);
        struct pd_rl *xl;
        EVP_CIPHER_CTX *back;
        long plain;
        int type;
        if (size == 0)
            break;
        off += size;
        if (rec[0] != PD_RT_CID) {
            memcpy(buf + used, rec, size);
            used += size;
            continue;
        }
        if (memcmp(rec + 11, cid->id, cl) != 0 || (xl = pd_cid_keys(c)) == NULL)
            continue;
        plain = pd_raw_open(xl, xl->dec, xl->riv, cl, rec, size, pd_scratch, &type);
        if (plain < 0 || type < SSL3_RT_CHANGE_CIPHER_SPEC || type > SSL3_RT_APPLICATION_DATA
                || pd_raw_size(xl, 0, 0, (size_t)plain) > len - first - used)
            continue;
        if ((back = pd_raw_new(xl, xl->rkey, 1)) == NULL)
            continue;
        used += pd_raw_seal(xl, back, xl->riv, NULL, 0, 0, type, ((unsigned int)rec[3] << 8) | rec[4],
                            pd_seq48(rec + 5), pd_scratch, (size_t)plain, buf + used);
        EVP_CIPHER_CTX_free(back);
    }
    r = used > 0 ? pd_feed_ssl(c, buf, used) : 0;
    free(buf);
    return r < 0 ? r : count + r;
}

/* ------------------------------------------------------- negotiation */

static int pd_cid_add_cb(SSL *s, unsigned int ext_type, unsigned int context,
                         const unsigned char **out, size_t *outlen, X509 *x, size_t chainidx,
                         int *al, void *add_arg)
{
    pd_conn *c = pd_from_ssl(s);
    struct pd_cid *cid = c != NULL ? c->cid : NULL;
    unsigned char *ext;
    (void)ext_type, (void)x, (void)chainidx, (void)al, (void)add_arg;
    if (cid == NULL || (context == SSL_EXT_TLS1_2_SERVER_HELLO && !cid->peer_offered))
        return 0;
    if ((ext = OPENSSL_malloc(1 + (size_t)cid->rx_len)) == NULL) {
        *al = SSL_AD_INTERNAL_ERROR;
        return -1;
    }
    ext[0] = cid->rx_len;
    memcpy(ext + 1, cid->id, cid->rx_len);
    *out = ext;
    *outlen = 1 + (size_t)cid->rx_len;
    if (context == SSL_EXT_TLS1_2_SERVER_HELLO)
        cid->negotiated = 1;
    return 1;
}

static void pd_cid_free_cb(SSL *s, unsigned int ext_type, unsigned int context,
                           const unsigned char *out, void *add_arg)
{
    (void)s, (void)ext_type, (void)context, (void)add_arg;
    OPENSSL_free((void *)out);
}

static int pd_cid_parse_cb(SSL *s, unsigned int ext_type, unsigned int context,
                           const unsigned char *in, size_t inlen, X509 *x, size_t chainidx,
                           int *al, void *parse_arg)
{
    pd_conn *c = pd_from_ssl(s);
    struct pd_cid *cid;
    (void)ext_type, (void)x, (void)chainidx, (void)parse_arg;
    if (inlen < 1 || (size_t)in[0] != inlen - 1) {
        *al = SSL_AD_DECODE_ERROR;
        return 0;
    }
    if (c == NULL || c->cid == NULL)
        return 1; /* not asked for on this association: ignored */
    cid = realloc(c->cid, sizeof(*cid) + c->cid->rx_len + in[0]);
    if (cid == NULL) {
        *al = SSL_AD_INTERNAL_ERROR;
        return 0;
    }
    c->cid = cid;
    cid->tx_len = in[0];
    memcpy(cid->id + cid->rx_len, in + 1, in[0]);
    if (context == SSL_EXT_CLIENT_HELLO)
        cid->peer_offered = 1;
    else
        cid->negotiated = 1;
    return 1;
}

/* Let a context's associations negotiate CIDs (each one's own, pd_set_cid). */
int pd_ctx_enable_cid(SSL_CTX *ctx)
{
    int ok = SSL_CTX_add_custom_ext(ctx, PD_CID_EXT, SSL_EXT_CLIENT_HELLO | SSL_EXT_TLS1_2_SERVER_HELLO,
                                    pd_cid_add_cb, pd_cid_free_cb, NULL, pd_cid_parse_cb, NULL);
    ERR_clear_error();
    return ok == 1;
}

/* Offer the extension on c, asking the peer to put cid (len bytes, maybe
 * none) in the records it sends; pad CID records to multiples of padding. */
int pd_set_cid(pd_conn *c, const unsigned char *id, size_t len, unsigned int padding)
{
    struct pd_cid *cid;
    if (len > PD_CID_MAX || c->state != PD_STATE_NEW || c->cid != NULL || c->ssl == NULL
            || padding > 256)
        return 0;
    if ((cid = calloc(1, sizeof(*cid) + len)) == NULL)
        return 0;
    cid->rx_len = (unsigned char)len;
    memcpy(cid->id, id, len);
    cid->padding = padding;
    c->cid = cid;
    return 1;
}

/* The CIDs once negotiated: which 0 is ours (in records we receive), 1 the
 * peer's (in records we send). Their length, or -1 when none was negotiated. */
int pd_get_cid(pd_conn *c, int which, const unsigned char **id)
{
    if (c->cid == NULL || !c->cid->negotiated) {
        *id = NULL;
        return -1;
    }
    *id = which ? c->cid->id + c->cid->rx_len : c->cid->id;
    return which ? c->cid->tx_len : c->cid->rx_len;
}

/* Whether the last datagram fed authenticated a record newer than any the
 * association had seen (RFC 9146 §6: only such a record may move it). */
int pd_cid_advanced(pd_conn *c)
{
    return c->cid != NULL && c->cid->advanced;
}

/* 1 when the handshake failed because a record could not use the CID format. */
int pd_cid_failed(pd_conn *c)
{
    return c->cid != NULL && c->cid->failed;
}

/* The largest write shrinks by what a CID record adds: the CID, the inner
 * content type and the most padding can add. */
static void pd_cid_overhead(pd_conn *c)
{
    size_t cl = pd_cid_out_len(c), extra;
    if (cl == 0)
        return;
    extra = cl + 1 + (c->cid->padding > 1 ? c->cid->padding - 1 : 0);
    c->max_plaintext = c->max_plaintext > extra ? c->max_plaintext - extra : 0;
}

static void pd_cid_fail(pd_conn *c)
{
    c->cid->failed = 1;
    c->ssl_error = SSL_ERROR_SSL;
    c->state = PD_STATE_FAILED;
}

/* The handshake is over: the translator's keys and contexts go (the
 * association's own record layer has its copies). */
static void pd_cid_handshake_done(pd_conn *c)
{
    if (c->cid != NULL && c->cid->xl != NULL) {
        pd_rl_free(c->cid->xl);
        c->cid->xl = NULL;
    }
}

static void pd_cid_free(struct pd_cid *cid)
{
    if (cid == NULL)
        return;
    pd_rl_free(cid->xl);
    free(cid);
}
