/*
 * Session resumption: what an association keeps of its SSL_SESSION once the
 * engine's record layer has freed the SSL, and fleet ticket keys.
 *
 * Fleet tickets: the RFC 5077 ticket keys of each period (key name, HMAC-SHA256
 * key, AES-256-CBC key) are PRF(secret, label || period number), so every
 * process holding the secret issues and opens the same tickets without
 * talking to the others; a ticket of the previous period still opens (and is
 * renewed). Derived on each use: no state to share between threads.
 */
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#define PD_TICKET_SECRET_MAX 64

typedef struct pd_ticket_secret {
    unsigned char secret[PD_TICKET_SECRET_MAX];
    size_t len;
    unsigned long long period; /* seconds */
} pd_ticket_secret;

static int pd_ctx_ex_index = -1;

static int pd_sessions_init(void)
{
    pd_ctx_ex_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    return pd_ctx_ex_index >= 0;
}

/* name (16) || HMAC key (32) || AES key (32) for one period. */
static void pd_ticket_keys(const pd_ticket_secret *t, unsigned long long period,
                           unsigned char keys[80])
{
    static const char label[] = "pydtls_ossl ticket keys";
    unsigned char seed[sizeof(label) - 1 + 8];
    int i;
    memcpy(seed, label, sizeof(label) - 1);
    for (i = 0; i < 8; i++)
        seed[sizeof(label) - 1 + i] = (unsigned char)(period >> (56 - 8 * i));
    pd_prf(0, t->secret, t->len, seed, sizeof(seed), keys, 80);
}

static int pd_ticket_init(unsigned char keys[80], const unsigned char *iv, EVP_CIPHER_CTX *cctx,
                          EVP_MAC_CTX *hctx, int enc)
{
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    return EVP_CipherInit_ex(cctx, EVP_aes_256_cbc(), NULL, keys + 48, iv, enc) == 1
        && EVP_MAC_init(hctx, keys + 16, 32, params) == 1;
}

/* OpenSSL's ticket key callback: 1 use, 2 use and renew, 0 unknown key, -1 error. */
static int pd_ticket_cb(SSL *s, unsigned char *name, unsigned char *iv, EVP_CIPHER_CTX *cctx,
                        EVP_MAC_CTX *hctx, int enc)
{
    const pd_ticket_secret *t = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(s), pd_ctx_ex_index);
    unsigned char keys[80];
    unsigned long long now;
    int r = 0, i;
    if (t == NULL || t->period == 0)
        return -1;
    now = (unsigned long long)time(NULL) / t->period;
    if (enc) {
        pd_ticket_keys(t, now, keys);
        memcpy(name, keys, 16);
        r = RAND_bytes(iv, 16) == 1 && pd_ticket_init(keys, iv, cctx, hctx, 1) ? 1 : -1;
    } else {
        for (i = 0; i < 2 && r == 0; i++) {
            pd_ticket_keys(t, now - (unsigned long long)i, keys);
            if (CRYPTO_memcmp(name, keys, 16) == 0)
                r = pd_ticket_init(keys, iv, cctx, hctx, 0) ? (i == 0 ? 1 : 2) : -1;
        }
    }
    OPENSSL_cleanse(keys, sizeof(keys));
    return r;
}

/* Tickets under keys derived from t (owned by the caller for the SSL_CTX's life). */
int pd_ctx_fleet_tickets(SSL_CTX *ctx, pd_ticket_secret *t)
{
    if (!SSL_CTX_set_ex_data(ctx, pd_ctx_ex_index, t))
        return 0;
    return SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, pd_ticket_cb) == 1;
}

void pd_ticket_secret_set(pd_ticket_secret *t, const unsigned char *secret, size_t len,
                          unsigned long long period)
{
    if (len > PD_TICKET_SECRET_MAX)
        len = PD_TICKET_SECRET_MAX;
    memcpy(t->secret, secret, len);
    t->len = len;
    t->period = period;
}

void pd_ticket_secret_clear(pd_ticket_secret *t)
{
    OPENSSL_cleanse(t, sizeof(*t));
}

/* ------------------------------------------------------------ sessions */

#define PD_OFFER_OK 0
#define PD_OFFER_NOT_RESUMABLE 2
#define PD_OFFER_EXPIRED 3
#define PD_OFFER_PIN 4
#define PD_OFFER_CA 5
#define PD_OFFER_NO_CERT 6
#define PD_OFFER_CERT 7
#define PD_OFFER_REFUSED 8
#define PD_CHECK_NONE 0
#define PD_CHECK_PINS 1
#define PD_CHECK_CA 2
#define PD_CHECK_ANY 3
#define PD_CHECK_PSK 4

static int pd_pins_match(const pd_conn *c, X509 *cert)
{
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len;
    int i;
    for (i = 0; cert != NULL && i < c->npins; i++)
        if (X509_digest(cert, c->pins[i].md, digest, &len) == 1 && len == c->pins[i].len
                && CRYPTO_memcmp(digest, c->pins[i].digest, len) == 0)
            return 1;
    return 0;
}

static int pd_leaf_verifies(SSL_CTX *ctx, X509 *leaf, const char *host)
{
    X509_STORE_CTX *store = X509_STORE_CTX_new();
    int ok = store != NULL && X509_STORE_CTX_init(store, SSL_CTX_get_cert_store(ctx), leaf, NULL) == 1
        && X509_STORE_CTX_set_default(store, "ssl_server") == 1 && X509_verify_cert(store) == 1
        && (host == NULL || X509_check_host(leaf, host, 0, 0, NULL) == 1);
    X509_STORE_CTX_free(store);
    return ok;
}

/* Offer a decoded session on a client about to say hello, if it still passes
 * the engine's verification (check: PD_CHECK_*; pins are c's); PD_OFFER_*. */
int pd_offer_session(pd_conn *c, SSL_CTX *ctx, SSL_SESSION *session, int check, const char *host)
{
    X509 *peer = SSL_SESSION_get0_peer(session);
    long now = (long)time(NULL), start = (long)SSL_SESSION_get_time(session);
    long expires = start + (long)SSL_SESSION_get_timeout(session);
    int r = PD_OFFER_OK;
    if (SSL_SESSION_has_ticket(session) && SSL_SESSION_get_ticket_lifetime_hint(session) > 0
            && start + (long)SSL_SESSION_get_ticket_lifetime_hint(session) < expires)
        expires = start + (long)SSL_SESSION_get_ticket_lifetime_hint(session); /* the server's word */
    if (c->ssl == NULL || c->state != PD_STATE_NEW || c->is_server
            || !SSL_SESSION_is_resumable(session)
            || SSL_SESSION_get_protocol_version(session) != DTLS1_2_VERSION)
        r = PD_OFFER_NOT_RESUMABLE;
    else if (expires <= now)
        r = PD_OFFER_EXPIRED;
    else if (check == PD_CHECK_PINS && !pd_pins_match(c, peer))
        r = PD_OFFER_PIN;
    else if (check == PD_CHECK_CA && (peer == NULL || !pd_leaf_verifies(ctx, peer, host)))
        r = PD_OFFER_CA;
    else if (check == PD_CHECK_ANY && peer == NULL)
        r = PD_OFFER_NO_CERT;
    else if (check == PD_CHECK_PSK && peer != NULL)
        r = PD_OFFER_CERT;
    else if (SSL_set_session(c->ssl, session) != 1)
        r = PD_OFFER_REFUSED;
    ERR_clear_error();
    return r;
}

/* The session to resume (a client, before its first handshake step). 1 set. */
int pd_set_session(pd_conn *c, const unsigned char *der, size_t len)
{
    const unsigned char *p = der;
    SSL_SESSION *session;
    int ok;
    if (c->ssl == NULL || c->state != PD_STATE_NEW || c->is_server)
        return 0;
    session = d2i_SSL_SESSION(NULL, &p, (long)len);
    if (session == NULL || p != der + len) {
        SSL_SESSION_free(session);
        ERR_clear_error();
        return 0;
    }
    ok = SSL_set_session(c->ssl, session);
    SSL_SESSION_free(session);
    ERR_clear_error();
    return ok == 1;
}

static long pd_session_der(SSL_SESSION *session, unsigned char **out)
{
    if (session == NULL || !SSL_SESSION_is_resumable(session))
        return 0;
    return i2d_SSL_SESSION(session, out);
}

/* The association's session as DER into buf (room cap): its length (copy
 * made only when it fits), or 0 when there is none to resume. */
long pd_session_bytes(pd_conn *c, unsigned char *buf, size_t cap)
{
    long n;
    unsigned char *q = buf;
    if (c->rl != NULL) {
        if (c->rl->session_der_len > 0 && (size_t)c->rl->session_der_len <= cap)
            memcpy(buf, c->rl->session_der, (size_t)c->rl->session_der_len);
        return c->rl->session_der_len;
    }
    if (c->ssl == NULL)
        return 0;
    n = pd_session_der(SSL_get_session(c->ssl), NULL);
    if (n > 0 && (size_t)n <= cap)
        i2d_SSL_SESSION(SSL_get_session(c->ssl), &q);
    return n;
}

/* A session's id (points into the session; valid while it lives). */
const unsigned char *pd_session_id(SSL_SESSION *session, unsigned int *len)
{
    return SSL_SESSION_get_id(session, len);
}

/* Serialize a session OpenSSL handed to a callback; 0 when it cannot be. */
long pd_session_to_der(SSL_SESSION *session, unsigned char *buf, size_t cap)
{
    long n = i2d_SSL_SESSION(session, NULL);
    unsigned char *q = buf;
    if (n > 0 && (size_t)n <= cap)
        return i2d_SSL_SESSION(session, &q);
    return n > 0 ? -n : 0;
}

/* A session decoded from bytes (the caller, or OpenSSL's get callback, owns
 * it), or NULL for bytes that are none or have trailing garbage. */
SSL_SESSION *pd_session_from_der(const unsigned char *der, size_t len)
{
    const unsigned char *p = der;
    SSL_SESSION *session = d2i_SSL_SESSION(NULL, &p, (long)len);
    if (session != NULL && p != der + len) {
        SSL_SESSION_free(session);
        session = NULL;
    }
    ERR_clear_error();
    return session;
}

static int pd_new_session_py(SSL *s, SSL_SESSION *session);
static SSL_SESSION *pd_get_session_py(SSL *s, const unsigned char *id, int len, int *copy);
static void pd_remove_session_py(SSL_CTX *ctx, SSL_SESSION *session);

void pd_ctx_session_callbacks(SSL_CTX *ctx, int notify, int external)
{
    if (notify)
        SSL_CTX_sess_set_new_cb(ctx, pd_new_session_py);
    if (external) {
        SSL_CTX_sess_set_get_cb(ctx, pd_get_session_py);
        SSL_CTX_sess_set_remove_cb(ctx, pd_remove_session_py);
    }
}

