/*
 * Stateless cookie exchange (RFC 6347 §4.2.1) before any SSL object exists.
 *
 * cookie = HMAC-SHA256(secret, peer host || peer port || client_version ||
 *                      random || session_id || cipher_suites || compression_methods)
 * under the current secret or the previous one. The HMAC's inner and outer
 * states are precomputed per secret, so a reply costs a parse, four SHA-256
 * blocks and a 60-byte write, and allocates nothing.
 */
#include <string.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>

#define PD_COOKIE_LEN 32
#define PD_HVR_LEN (13 + 12 + 3 + PD_COOKIE_LEN)
#define PD_HELLO_VALID 0
#define PD_HELLO_DROP -1

typedef struct pd_hmac_key {
    SHA256_CTX inner, outer;
} pd_hmac_key;

typedef struct pd_cookie_keys {
    pd_hmac_key current, previous;
    int has_previous;
} pd_cookie_keys;

static void pd_hmac_key_set(pd_hmac_key *k, const unsigned char *secret, size_t len)
{
    unsigned char block[SHA256_CBLOCK], pad[SHA256_CBLOCK];
    size_t i;
    memset(block, 0, sizeof(block));
    if (len > SHA256_CBLOCK) {
        SHA256(secret, len, block);
    } else {
        memcpy(block, secret, len);
    }
    for (i = 0; i < SHA256_CBLOCK; i++)
        pad[i] = block[i] ^ 0x36;
    SHA256_Init(&k->inner);
    SHA256_Update(&k->inner, pad, sizeof(pad));
    for (i = 0; i < SHA256_CBLOCK; i++)
        pad[i] = block[i] ^ 0x5c;
    SHA256_Init(&k->outer);
    SHA256_Update(&k->outer, pad, sizeof(pad));
    OPENSSL_cleanse(block, sizeof(block));
    OPENSSL_cleanse(pad, sizeof(pad));
}

void pd_cookie_keys_set(pd_cookie_keys *keys, const unsigned char *current, size_t current_len,
                        const unsigned char *previous, size_t previous_len)
{
    pd_hmac_key_set(&keys->current, current, current_len);
    keys->has_previous = previous != NULL;
    if (previous != NULL)
        pd_hmac_key_set(&keys->previous, previous, previous_len);
}

/* The ClientHello fields a cookie binds, located inside one datagram. */
typedef struct pd_hello {
    const unsigned char *record;   /* record header, for its sequence number */
    const unsigned char *params1;  /* client_version .. session_id */
    size_t params1_len;
    const unsigned char *cookie;
    size_t cookie_len;
    const unsigned char *params2;  /* cipher_suites .. compression_methods */
    size_t params2_len;
    unsigned int message_seq;
} pd_hello;

/* 1 if the datagram starts with a whole, unfragmented DTLS ClientHello. */
static int pd_parse_hello(const unsigned char *d, size_t n, pd_hello *h)
{
    size_t rec_len, msg_len, pos, end, sid, cookie, suites, comp;
    if (n < 13 + 12 || d[0] != 22 || d[1] != 0xFE || (d[2] != 0xFF && d[2] != 0xFD)
            || d[3] != 0 || d[4] != 0 || d[13] != 1)
        return 0;
    rec_len = ((size_t)d[11] << 8) | d[12];
    if (rec_len > n - 13 || rec_len < 12)
        return 0;
    msg_len = ((size_t)d[14] << 16) | ((size_t)d[15] << 8) | d[16];
    if (d[19] | d[20] | d[21])                     /* fragment offset must be 0 */
        return 0;
    if ((((size_t)d[22] << 16) | ((size_t)d[23] << 8) | d[24]) != msg_len
            || msg_len > rec_len - 12)
        return 0;
    pos = 25;
    end = 25 + msg_len;
    if (end - pos < 2 + 32 + 1)
        return 0;
    sid = d[pos + 34];
    if (sid > 32 || pos + 35 + sid + 1 > end)
        return 0;
    h->record = d;
    h->message_seq = ((unsigned int)d[17] << 8) | d[18];
    h->params1 = d + pos;
    h->params1_len = 35 + sid;
    pos += 35 + sid;
    cookie = d[pos];
    if (pos + 1 + cookie + 2 > end)
        return 0;
    h->cookie = d + pos + 1;
    h->cookie_len = cookie;
    pos += 1 + cookie;
    suites = ((size_t)d[pos] << 8) | d[pos + 1];
    if (suites == 0 || (suites & 1) || pos + 2 + suites + 1 > end)
        return 0;
    comp = d[pos + 2 + suites];
    if (comp == 0 || pos + 2 + suites + 1 + comp > end)
        return 0;
    h->params2 = d + pos;
    h->params2_len = 2 + suites + 1 + comp;
    return 1;
}

typedef struct pd_peer {
    const unsigned char *host;
    size_t host_len;
    unsigned int port;
} pd_peer;

static void pd_cookie_mac(const pd_hmac_key *k, const pd_peer *peer, const pd_hello *h,
                          unsigned char out[PD_COOKIE_LEN])
{
    SHA256_CTX ctx = k->inner;
    unsigned char inner[SHA256_DIGEST_LENGTH];
    unsigned char port[3] = {0, (unsigned char)(peer->port >> 8), (unsigned char)peer->port};
    SHA256_Update(&ctx, peer->host, peer->host_len);
    SHA256_Update(&ctx, port, sizeof(port)); /* the 0 ends the host unambiguously */
    SHA256_Update(&ctx, h->params1, h->params1_len);
    SHA256_Update(&ctx, h->params2, h->params2_len);
    SHA256_Final(inner, &ctx);
    ctx = k->outer;
    SHA256_Update(&ctx, inner, sizeof(inner));
    SHA256_Final(out, &ctx);
}

static int pd_cookie_matches(const pd_hmac_key *k, const pd_peer *peer, const pd_hello *h)
{
    unsigned char mac[PD_COOKIE_LEN];
    pd_cookie_mac(k, peer, h, mac);
    return CRYPTO_memcmp(mac, h->cookie, PD_COOKIE_LEN) == 0;
}

static size_t pd_write_hvr(const pd_cookie_keys *keys, const pd_peer *peer, const pd_hello *h,
                           unsigned char *out)
{
    unsigned char *p = out;
    *p++ = 22;                                   /* handshake record */
    *p++ = 0xFE; *p++ = 0xFF;                    /* DTLS 1.0, RFC 6347 §4.2.1 */
    memcpy(p, h->record + 3, 8);                 /* epoch 0, the ClientHello's sequence */
    p += 8;
    *p++ = 0; *p++ = 12 + 3 + PD_COOKIE_LEN;
    *p++ = 3;                                    /* hello_verify_request */
    *p++ = 0; *p++ = 0; *p++ = 3 + PD_COOKIE_LEN;
    *p++ = (unsigned char)(h->message_seq >> 8); *p++ = (unsigned char)h->message_seq;
    *p++ = 0; *p++ = 0; *p++ = 0;                /* fragment offset */
    *p++ = 0; *p++ = 0; *p++ = 3 + PD_COOKIE_LEN;
    *p++ = 0xFE; *p++ = 0xFF;
    *p++ = PD_COOKIE_LEN;
    pd_cookie_mac(&keys->current, peer, h, p);
    return PD_HVR_LEN;
}

/* >0: a HelloVerifyRequest of that length is in out (room for PD_HVR_LEN);
 * PD_HELLO_VALID: the ClientHello carries a cookie we issued to this peer;
 * PD_HELLO_DROP: not a ClientHello at all. The peer is its host (text or
 * bytes) and port, so a socket address needs no formatting first. */
int pd_cookie_hello(const pd_cookie_keys *keys, const unsigned char *host, size_t host_len,
                    unsigned int port, const unsigned char *d, size_t n, unsigned char *out)
{
    pd_hello h;
    pd_peer peer = {host, host_len, port};
    if (!pd_parse_hello(d, n, &h))
        return PD_HELLO_DROP;
    if (h.cookie_len == PD_COOKIE_LEN
            && (pd_cookie_matches(&keys->current, &peer, &h)
                || (keys->has_previous && pd_cookie_matches(&keys->previous, &peer, &h))))
        return PD_HELLO_VALID;
    return (int)pd_write_hvr(keys, &peer, &h, out);
}

/* OpenSSL's cookie callbacks, used only by DTLSv1_listen inside pd_accept_hello:
 * the cookie was checked already, so verification just confirms that. */
static __thread int pd_listen_cookie_ok = 0;

static int pd_cookie_generate_cb(SSL *s, unsigned char *cookie, unsigned int *len)
{
    (void)s; (void)cookie; (void)len;
    return 0;
}

static int pd_cookie_verify_cb(SSL *s, const unsigned char *cookie, unsigned int len)
{
    (void)s; (void)cookie; (void)len;
    return pd_listen_cookie_ok;
}

void pd_ctx_enable_cookies(SSL_CTX *ctx)
{
    SSL_CTX_set_cookie_generate_cb(ctx, pd_cookie_generate_cb);
    SSL_CTX_set_cookie_verify_cb(ctx, pd_cookie_verify_cb);
}
