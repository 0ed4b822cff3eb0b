/*
 * The "C" column of the benchmark: plain libssl doing the same work as the
 * Python columns, with memory BIOs, in one process.
 *
 *   bench_c handshake SECONDS CERT KEY [NTHREADS]
 *   bench_c resume SECONDS CERT KEY cache|ticket
 *   bench_c cookie-handshake SECONDS CERT KEY
 *   bench_c records SECONDS CERT KEY SIZE
 *   bench_c records-batch SECONDS CERT KEY SIZE
 *   bench_c listen SECONDS CERT KEY
 *   bench_c memory COUNT CERT KEY [release]
 *   bench_c version - CERT KEY
 *
 * Each prints one line "rate=<per second>" (or "bytes=<per association>").
 * SECONDS may be "nCOUNT": run exactly COUNT operations (a multiple of the
 * loop's batch: 20 handshakes, 1,000 records or hellos, 1,024 batched records).
 * Cookies are HMAC-SHA256 over ~100 bytes with precomputed pad states, as the
 * library computes them, so DTLSv1_listen is measured doing the same work.
 * Profile: DTLS 1.2, ECDHE-ECDSA-AES128-GCM-SHA256, groups X25519:P-256,
 * MTU 1200, the client verifies the server's P-256 certificate as its trust
 * anchor, session tickets on, server session cache off.
 * "resume" measures abbreviated handshakes: one full handshake first, its
 * session taken with SSL_get1_session, then every measured handshake offers
 * it with SSL_set_session and must resume (both ends' SSL_session_reused),
 * else the run fails. "cache": the server context's session cache
 * (SSL_SESS_CACHE_SERVER) with SSL_OP_NO_TICKET; "ticket": RFC 5077 tickets
 * with the server cache off, as in the other modes.
 */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/sha.h>

#define MTU 1200

static SSL_CTX *server_ctx, *client_ctx;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* "n500" instead of SECONDS runs exactly 500 operations (for instruction counts). */
static long limit_count = 0;

static int more(long done, double end)
{
    return limit_count ? done < limit_count : now() < end;
}

static void die(const char *what)
{
    fprintf(stderr, "bench_c: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static SSL_CTX *make_ctx(const char *cert, const char *key)
{
    SSL_CTX *ctx = SSL_CTX_new(DTLS_method());
    if (ctx == NULL)
        die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, DTLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_QUERY_MTU
                        | SSL_OP_NO_COMPRESSION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (!SSL_CTX_set_cipher_list(ctx, "ECDHE-ECDSA-AES128-GCM-SHA256")
            || !SSL_CTX_set1_groups_list(ctx, "X25519:P-256"))
        die("cipher/groups");
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (key != NULL) {
        if (SSL_CTX_use_certificate_file(ctx, cert, SSL_FILETYPE_PEM) != 1
                || SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1)
            die("certificate");
    } else {
        if (SSL_CTX_load_verify_locations(ctx, cert, NULL) != 1)
            die("trust anchor");
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    }
    return ctx;
}

/* Memory BIOs merge datagrams; DTLS reads the run as one packet of records,
 * which is what a plain memory-BIO loop does. */
typedef struct {
    SSL *ssl;
    BIO *in, *out;
} end_t;

static void end_init(end_t *e, SSL_CTX *ctx, int server)
{
    e->ssl = SSL_new(ctx);
    e->in = BIO_new(BIO_s_mem());
    e->out = BIO_new(BIO_s_mem());
    if (e->ssl == NULL || e->in == NULL || e->out == NULL)
        die("SSL_new");
    BIO_set_mem_eof_return(e->in, -1);
    BIO_set_mem_eof_return(e->out, -1);
    SSL_set_bio(e->ssl, e->in, e->out);
    SSL_set_mtu(e->ssl, MTU);
    if (server)
        SSL_set_accept_state(e->ssl);
    else
        SSL_set_connect_state(e->ssl);
}

static int move(end_t *from, end_t *to)
{
    char buf[16384];
    int moved = 0, n;
    while ((n = BIO_read(from->out, buf, sizeof(buf))) > 0) {
        BIO_write(to->in, buf, n);
        moved += n;
    }
    return moved;
}

static void handshake(end_t *c, end_t *s)
{
    int rounds;
    for (rounds = 0; rounds < 50; rounds++) {
        int cd = SSL_do_handshake(c->ssl);
        move(c, s);
        int sd = SSL_do_handshake(s->ssl);
        move(s, c);
        if (cd == 1 && sd == 1)
            return;
    }
    die("handshake did not finish");
}

typedef struct {
    double seconds;
    long count;
} work_t;

static void *handshake_loop(void *arg)
{
    work_t *w = arg;
    double end = now() + w->seconds;
    w->count = 0;
    while (more(w->count, end)) {
        int i;
        for (i = 0; i < 20; i++) {
            end_t c, s;
            end_init(&c, client_ctx, 0);
            end_init(&s, server_ctx, 1);
            handshake(&c, &s);
            SSL_free(c.ssl);
            SSL_free(s.ssl);
            w->count++;
        }
    }
    return NULL;
}

/* SSL_free of an established SSL that was never shut down takes its session
 * out of the cache and makes it unresumable (a connection that did not close
 * cleanly); pydtls_ossl marks the shutdown done the same way before it frees
 * the SSL at the handover, so the session stays resumable. No alert is sent. */
static void end_free_resumable(end_t *e)
{
    SSL_set_shutdown(e->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    SSL_free(e->ssl);
}

/* Abbreviated handshakes resuming one saved session; fails unless every one resumed. */
static void resume_loop(double seconds)
{
    SSL_SESSION *session;
    end_t c, s;
    long count = 0;
    double start, end;
    end_init(&c, client_ctx, 0);
    end_init(&s, server_ctx, 1);
    handshake(&c, &s);
    if ((session = SSL_get1_session(c.ssl)) == NULL || !SSL_SESSION_is_resumable(session))
        die("the first handshake left no resumable session");
    end_free_resumable(&c);
    end_free_resumable(&s);
    start = now();
    end = start + seconds;
    while (more(count, end)) {
        int i;
        for (i = 0; i < 20; i++) {
            end_init(&c, client_ctx, 0);
            end_init(&s, server_ctx, 1);
            if (SSL_set_session(c.ssl, session) != 1)
                die("SSL_set_session");
            handshake(&c, &s);
            if (!SSL_session_reused(c.ssl) || !SSL_session_reused(s.ssl))
                die("a measured handshake did not resume the session");
            end_free_resumable(&c);
            end_free_resumable(&s);
            count++;
        }
    }
    printf("rate=%.1f\n", count / (now() - start));
    SSL_SESSION_free(session);
}

static void records(double seconds, size_t size)
{
    end_t c, s;
    char *data = malloc(size), out[16384];
    long count = 0;
    double start, end;
    memset(data, 'x', size);
    end_init(&c, client_ctx, 0);
    end_init(&s, server_ctx, 1);
    handshake(&c, &s);
    start = now();
    end = start + seconds;
    while (more(count, end)) {
        int i;
        for (i = 0; i < 1000; i++) {
            char dgram[2048];
            int n;
            if (SSL_write(c.ssl, data, (int)size) != (int)size)
                die("SSL_write");
            n = BIO_read(c.out, dgram, sizeof(dgram));
            BIO_write(s.in, dgram, n);
            if (SSL_read(s.ssl, out, sizeof(out)) != (int)size)
                die("SSL_read");
        }
        count += 1000;
    }
    printf("rate=%.1f\n", count / (now() - start));
    free(data);
}

static SHA256_CTX cookie_inner, cookie_outer;

static void cookie_key(void)
{
    unsigned char pad[64];
    int i;
    for (i = 0; i < 64; i++)
        pad[i] = (unsigned char)('k' ^ 0x36);
    SHA256_Init(&cookie_inner);
    SHA256_Update(&cookie_inner, pad, 64);
    for (i = 0; i < 64; i++)
        pad[i] = (unsigned char)('k' ^ 0x5c);
    SHA256_Init(&cookie_outer);
    SHA256_Update(&cookie_outer, pad, 64);
}

static void cookie_mac(SSL *ssl, unsigned char out[32])
{
    unsigned char params[100], inner[32];
    SHA256_CTX ctx = cookie_inner;
    (void)ssl; /* DTLSv1_listen does not record the hello's random: hash fixed fields */
    memset(params, 0x5a, sizeof(params));
    memcpy(params, "127.0.0.1\0" "40000", 15);
    SHA256_Update(&ctx, params, sizeof(params));
    SHA256_Final(inner, &ctx);
    ctx = cookie_outer;
    SHA256_Update(&ctx, inner, 32);
    SHA256_Final(out, &ctx);
}

static int cookie_gen(SSL *ssl, unsigned char *cookie, unsigned int *len)
{
    cookie_mac(ssl, cookie);
    *len = 32;
    return 1;
}

static int cookie_verify(SSL *ssl, const unsigned char *cookie, unsigned int len)
{
    unsigned char mac[32];
    cookie_mac(ssl, mac);
    return len == 32 && CRYPTO_memcmp(cookie, mac, 32) == 0;
}

static void listen_loop(double seconds)
{
    end_t c, s;
    unsigned char hello[2048];
    int hello_len;
    long count = 0;
    double start, end;
    BIO_ADDR *peer = BIO_ADDR_new();
    end_init(&c, client_ctx, 0);
    SSL_do_handshake(c.ssl);
    hello_len = BIO_read(c.out, hello, sizeof(hello));
    end_init(&s, server_ctx, 1);
    SSL_set_options(s.ssl, SSL_OP_COOKIE_EXCHANGE);
    start = now();
    end = start + seconds;
    while (more(count, end)) {
        int i;
        for (i = 0; i < 1000; i++) {
            char reply[512];
            BIO_write(s.in, hello, hello_len);
            if (DTLSv1_listen(s.ssl, peer) != 0)
                die("DTLSv1_listen accepted a cookieless hello");
            if (BIO_read(s.out, reply, sizeof(reply)) <= 0)
                die("no HelloVerifyRequest");
        }
        count += 1000;
    }
    printf("rate=%.1f\n", count / (now() - start));
}

/* A full handshake with the cookie round: DTLSv1_listen answers the first
 * hello, accepts the second, then the handshake runs as usual. */
static void cookie_handshake_loop(double seconds)
{
    BIO_ADDR *peer = BIO_ADDR_new();
    long count = 0;
    double start = now(), end = start + seconds;
    while (more(count, end)) {
        int i;
        for (i = 0; i < 20; i++) {
            end_t c, s;
            int listened = 0, rounds;
            end_init(&c, client_ctx, 0);
            end_init(&s, server_ctx, 1);
            SSL_set_options(s.ssl, SSL_OP_COOKIE_EXCHANGE);
            for (rounds = 0; rounds < 4 && listened != 1; rounds++) {
                SSL_do_handshake(c.ssl);
                move(&c, &s);
                listened = DTLSv1_listen(s.ssl, peer);
                if (listened < 0)
                    die("DTLSv1_listen");
                move(&s, &c);
            }
            if (listened != 1)
                die("cookie exchange did not finish");
            SSL_set_mtu(s.ssl, MTU);
            handshake(&c, &s);
            SSL_free(c.ssl);
            SSL_free(s.ssl);
            count++;
        }
    }
    printf("rate=%.1f\n", count / (now() - start));
}

/* 64 records per round, written back to back, then packed whole into
 * datagrams of at most MTU bytes (what pydtls_ossl's pull does), each datagram
 * delivered and its records read before the next: a memory BIO would merge
 * datagrams and DTLS would then cut records. */
static void records_batch(double seconds, size_t size)
{
    end_t c, s;
    char *data = malloc(size), out[16384];
    static unsigned char wire[64 * 1400];
    long count = 0;
    double start, end;
    memset(data, 'x', size);
    end_init(&c, client_ctx, 0);
    end_init(&s, server_ctx, 1);
    handshake(&c, &s);
    start = now();
    end = start + seconds;
    while (more(count, end)) {
        int i, r;
        for (r = 0; r < 16; r++) {
            int n, off = 0, got = 0;
            for (i = 0; i < 64; i++)
                if (SSL_write(c.ssl, data, (int)size) != (int)size)
                    die("SSL_write");
            n = BIO_read(c.out, wire, sizeof(wire));
            while (off < n) {
                int len = 0;
                while (off + len + 13 <= n) {
                    int rec = 13 + ((wire[off + len + 11] << 8) | wire[off + len + 12]);
                    if (len > 0 && len + rec > MTU)
                        break;
                    len += rec;
                }
                BIO_write(s.in, wire + off, len);
                off += len;
                while (SSL_read(s.ssl, out, sizeof(out)) == (int)size)
                    got++;
            }
            if (got != 64)
                die("SSL_read");
        }
        count += 16 * 64;
    }
    printf("rate=%.1f\n", count / (now() - start));
    free(data);
}

static long rss_bytes(void)
{
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f == NULL || fscanf(f, "%ld %ld", &pages, &resident) != 2)
        die("statm");
    fclose(f);
    return resident * 4096;
}

static void memory(long count, int release)
{
    end_t *c = calloc((size_t)count, sizeof(end_t));
    end_t *s = calloc((size_t)count, sizeof(end_t));
    long i, before;
    char buf[64];
    before = rss_bytes();
    for (i = 0; i < count; i++) {
        end_init(&c[i], client_ctx, 0);
        end_init(&s[i], server_ctx, 1);
        handshake(&c[i], &s[i]);
        SSL_write(c[i].ssl, "ping", 4);
        move(&c[i], &s[i]);
        SSL_read(s[i].ssl, buf, sizeof(buf));
        SSL_write(s[i].ssl, "pong", 4);
        move(&s[i], &c[i]);
        SSL_read(c[i].ssl, buf, sizeof(buf));
        SSL_free(c[i].ssl); /* keep only the server side, as a server would */
        if (release && !SSL_free_buffers(s[i].ssl))
            die("SSL_free_buffers");
    }
    printf("bytes=%.1f\n", (double)(rss_bytes() - before) / (double)count);
}

int main(int argc, char **argv)
{
    double seconds;
    if (argc < 5) {
        fprintf(stderr, "usage: bench_c MODE SECONDS CERT KEY [ARG]\n");
        return 2;
    }
    if (argv[2][0] == 'n') {
        limit_count = atol(argv[2] + 1);
        seconds = 1e9;
    } else {
        seconds = atof(argv[2]);
    }
    server_ctx = make_ctx(argv[3], argv[4]);
    client_ctx = make_ctx(argv[3], NULL);
    cookie_key();
    SSL_CTX_set_cookie_generate_cb(server_ctx, cookie_gen);
    SSL_CTX_set_cookie_verify_cb(server_ctx, cookie_verify);
    if (strcmp(argv[1], "handshake") == 0) {
        int n = argc > 5 ? atoi(argv[5]) : 1, i;
        pthread_t tid[16];
        work_t work[16];
        double start = now();
        long total = 0;
        if (n < 1 || n > 16)
            die("threads");
        for (i = 0; i < n; i++) {
            work[i].seconds = seconds;
            pthread_create(&tid[i], NULL, handshake_loop, &work[i]);
        }
        for (i = 0; i < n; i++) {
            pthread_join(tid[i], NULL);
            total += work[i].count;
        }
        printf("rate=%.1f\n", total / (now() - start));
    } else if (strcmp(argv[1], "resume") == 0) {
        static const unsigned char sid_ctx[] = "bench_c";
        const char *how = argc > 5 ? argv[5] : "";
        if (strcmp(how, "cache") == 0) {
            SSL_CTX_set_session_cache_mode(server_ctx, SSL_SESS_CACHE_SERVER);
            SSL_CTX_set_options(server_ctx, SSL_OP_NO_TICKET);
        } else if (strcmp(how, "ticket") != 0) {
            die("resume: cache or ticket");
        }
        if (SSL_CTX_set_session_id_context(server_ctx, sid_ctx, sizeof(sid_ctx) - 1) != 1)
            die("SSL_CTX_set_session_id_context");
        resume_loop(seconds);
    } else if (strcmp(argv[1], "version") == 0) {
        printf("version=%s\n", OpenSSL_version(OPENSSL_VERSION));
    } else if (strcmp(argv[1], "cookie-handshake") == 0) {
        cookie_handshake_loop(seconds);
    } else if (strcmp(argv[1], "records-batch") == 0) {
        records_batch(seconds, (size_t)atoi(argv[5]));
    } else if (strcmp(argv[1], "records") == 0) {
        records(seconds, (size_t)atoi(argv[5]));
    } else if (strcmp(argv[1], "listen") == 0) {
        listen_loop(seconds);
    } else if (strcmp(argv[1], "memory") == 0) {
        memory((long)seconds, argc > 5 && strcmp(argv[5], "release") == 0);
    } else {
        die("unknown mode");
    }
    return 0;
}
