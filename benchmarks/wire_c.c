/*
 * The over-the-wire benchmark's C parts, on libssl, over real UDP on loopback.
 *
 *   wire_c server PORT CERT KEY LIFETIME
 *       The reference echo server: DTLSv1_listen (stateless cookies) on one
 *       socket, then one connected UDP socket per peer on the same port,
 *       all in one epoll loop; every record read is written back.  Prints
 *       "port=<n>" once listening; exits after LIFETIME seconds at most.
 *
 *   wire_c client HOST PORT N SIZE WARMUP WINDOW SERVER_PID
 *       The load generator: N associations (one connected socket each),
 *       closed-loop echo with one request of SIZE bytes in flight per
 *       association; WARMUP seconds unmeasured, then WINDOW seconds counted.
 *       A request unanswered for 1 s is counted as a timeout and replaced.
 *       Prints one line: echoes, rate, p50/p99 latency (us), timeouts, and
 *       the CPU time per echo of the server process (all its threads, from
 *       /proc/SERVER_PID/task/<tid>/schedstat) and of this client.
 *
 * Profile: DTLS 1.2, ECDHE-ECDSA-AES128-GCM-SHA256, groups X25519:P-256,
 * MTU 1200, the client does not verify the certificate (the handshakes are
 * not what is measured).
 */
#define _GNU_SOURCE
#define OPENSSL_SUPPRESS_DEPRECATED
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#define CIPHER "ECDHE-ECDSA-AES128-GCM-SHA256"
#define GROUPS "X25519:P-256"
#define MTU 1200
#define HIST_US 2000000

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "wire_c: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(1);
}

static void nonblocking(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* ------------------------------------------------------------------ server */

static unsigned char cookie_secret[32];

static int cookie_of(SSL *ssl, unsigned char *out, unsigned int *len)
{
    BIO_ADDR *peer = BIO_ADDR_new();
    unsigned char raw[32];
    size_t rawlen = 0;
    unsigned short port;
    unsigned int mdlen = 0;
    unsigned char md[EVP_MAX_MD_SIZE];
    if (peer == NULL || BIO_dgram_get_peer(SSL_get_rbio(ssl), peer) <= 0) {
        BIO_ADDR_free(peer);
        return 0;
    }
    BIO_ADDR_rawaddress(peer, raw, &rawlen);
    port = BIO_ADDR_rawport(peer);
    memcpy(raw + rawlen, &port, sizeof(port));
    BIO_ADDR_free(peer);
    HMAC(EVP_sha256(), cookie_secret, sizeof(cookie_secret), raw, rawlen + sizeof(port), md, &mdlen);
    memcpy(out, md, 16);
    *len = 16;
    return 1;
}

static int cookie_verify(SSL *ssl, const unsigned char *cookie, unsigned int len)
{
    unsigned char want[16];
    unsigned int wlen;
    return cookie_of(ssl, want, &wlen) && len == wlen && CRYPTO_memcmp(want, cookie, len) == 0;
}

typedef struct sconn {
    SSL *ssl;
    int fd;
    int handshaking;
    struct sconn *next;
} sconn;

static SSL *new_listener(SSL_CTX *ctx, int fd)
{
    SSL *ssl = SSL_new(ctx);
    BIO *bio = BIO_new_dgram(fd, BIO_NOCLOSE);
    if (ssl == NULL || bio == NULL)
        die("SSL_new");
    SSL_set_bio(ssl, bio, bio);
    SSL_set_options(ssl, SSL_OP_COOKIE_EXCHANGE | SSL_OP_NO_QUERY_MTU);
    SSL_set_mtu(ssl, MTU);
    return ssl;
}

static void close_conn(int ep, sconn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    SSL_free(c->ssl);
    close(c->fd);
    c->ssl = NULL;
    c->fd = -1;
}

static void serve_conn(int ep, sconn *c, unsigned char *buf)
{
    for (;;) {
        int r = SSL_read(c->ssl, buf, 16384);
        if (r > 0) {
            SSL_write(c->ssl, buf, r);
            continue;
        }
        switch (SSL_get_error(c->ssl, r)) {
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE:
            if (c->handshaking && SSL_is_init_finished(c->ssl))
                c->handshaking = 0;
            return;
        default:
            ERR_clear_error();
            close_conn(ep, c);
            return;
        }
    }
}

static int server_main(int argc, char **argv)
{
    int port = atoi(argv[2]), one = 1, ep, lfd;
    double lifetime = atof(argv[5]), last_timers = 0;
    struct sockaddr_in local;
    socklen_t llen = sizeof(local);
    SSL_CTX *ctx = SSL_CTX_new(DTLS_server_method());
    SSL *lssl;
    sconn *conns = NULL;
    unsigned char *buf = malloc(65536);
    struct epoll_event evs[256], ev;
    BIO_ADDR *peer = BIO_ADDR_new();

    (void)argc;
    alarm((unsigned)(lifetime + 1));
    RAND_bytes(cookie_secret, sizeof(cookie_secret));
    if (ctx == NULL || SSL_CTX_use_certificate_chain_file(ctx, argv[3]) != 1
        || SSL_CTX_use_PrivateKey_file(ctx, argv[4], SSL_FILETYPE_PEM) != 1
        || SSL_CTX_set_cipher_list(ctx, CIPHER) != 1 || SSL_CTX_set1_groups_list(ctx, GROUPS) != 1)
        die("server context");
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_cookie_generate_cb(ctx, cookie_of);
    SSL_CTX_set_cookie_verify_cb(ctx, cookie_verify);
    lfd = socket(AF_INET, SOCK_DGRAM, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(&local, 0, sizeof(local));
    local.sin_family = AF_INET;
    local.sin_port = htons(port);
    local.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&local, sizeof(local)) != 0)
        die("bind");
    getsockname(lfd, (struct sockaddr *)&local, &llen);
    nonblocking(lfd);
    printf("port=%d\n", ntohs(local.sin_port));
    fflush(stdout);
    ep = epoll_create1(0);
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    lssl = new_listener(ctx, lfd);
    for (double end = now_s() + lifetime; now_s() < end;) {
        int n = epoll_wait(ep, evs, 256, 50), i;
        for (i = 0; i < n; i++) {
            sconn *c = evs[i].data.ptr;
            if (c != NULL) {
                if (c->ssl != NULL)
                    serve_conn(ep, c, buf);
                continue;
            }
            while (DTLSv1_listen(lssl, peer) > 0) {  /* a hello with a valid cookie */
                struct sockaddr_in to;
                size_t alen = sizeof(to.sin_addr);
                int fd = socket(AF_INET, SOCK_DGRAM, 0);
                BIO *bio = SSL_get_rbio(lssl);
                memset(&to, 0, sizeof(to));
                to.sin_family = AF_INET;
                BIO_ADDR_rawaddress(peer, &to.sin_addr, &alen);
                to.sin_port = BIO_ADDR_rawport(peer);
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
                if (bind(fd, (struct sockaddr *)&local, sizeof(local)) != 0
                    || connect(fd, (struct sockaddr *)&to, sizeof(to)) != 0)
                    die("child socket");
                nonblocking(fd);
                BIO_set_fd(bio, fd, BIO_NOCLOSE);
                BIO_ctrl(bio, BIO_CTRL_DGRAM_SET_CONNECTED, 0, peer);
                c = calloc(1, sizeof(*c));
                c->ssl = lssl;
                c->fd = fd;
                c->handshaking = 1;
                c->next = conns;
                conns = c;
                ev.events = EPOLLIN;
                ev.data.ptr = c;
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                serve_conn(ep, c, buf);  /* continues the handshake: the server's flight */
                lssl = new_listener(ctx, lfd);
            }
            ERR_clear_error();
        }
        if (now_s() - last_timers > 0.05) {  /* handshake retransmissions */
            last_timers = now_s();
            for (sconn *c = conns; c != NULL; c = c->next)
                if (c->ssl != NULL && c->handshaking && DTLSv1_handle_timeout(c->ssl) < 0)
                    close_conn(ep, c);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ client */

typedef struct {
    SSL *ssl;
    int fd;
    int state;  /* 0 waiting to start, 1 handshaking, 2 established */
    uint64_t seq, sent_ns;
} client;

static uint64_t cpu_ns_of(int pid)
{
    char path[64];
    DIR *d;
    struct dirent *e;
    uint64_t total = 0;
    snprintf(path, sizeof(path), "/proc/%d/task", pid);
    d = opendir(path);
    if (d == NULL)
        return 0;
    while ((e = readdir(d)) != NULL) {
        char p[300];
        FILE *f;
        unsigned long long run = 0;
        if (e->d_name[0] == '.')
            continue;
        snprintf(p, sizeof(p), "/proc/%d/task/%s/schedstat", pid, e->d_name);
        f = fopen(p, "r");
        if (f != NULL) {
            if (fscanf(f, "%llu", &run) == 1)
                total += run;
            fclose(f);
        }
    }
    closedir(d);
    return total;
}

static uint64_t own_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void send_request(client *c, unsigned char *buf, int size)
{
    c->seq++;
    memcpy(buf, &c->seq, sizeof(c->seq));
    c->sent_ns = now_ns();
    if (SSL_write(c->ssl, buf, size) <= 0)
        ERR_clear_error();  /* a full socket buffer: the timeout replaces it */
}

static int client_main(int argc, char **argv)
{
    const char *host = argv[2];
    int port = atoi(argv[3]), n = atoi(argv[4]), size = atoi(argv[5]), i, ep;
    double warmup = atof(argv[6]), window = atof(argv[7]);
    int server_pid = atoi(argv[8]);
    SSL_CTX *ctx = SSL_CTX_new(DTLS_client_method());
    client *cs = calloc(n, sizeof(client));
    struct sockaddr_in to;
    unsigned char *buf = calloc(1, 65536), *out = calloc(1, 65536);
    struct epoll_event *evs = calloc(256, sizeof(*evs)), ev;
    uint32_t *hist = calloc(HIST_US + 1, sizeof(uint32_t));
    int started = 0, inflight = 0, established = 0, counting = 0;
    uint64_t echoes = 0, timeouts = 0, srv0 = 0, own0 = 0, srv1, own1, t_start = 0;
    double deadline, phase_end, last_check = 0;
    BIO_ADDR *server = BIO_ADDR_new();

    (void)argc;
    alarm((unsigned)(warmup + window + 120));
    if (ctx == NULL || SSL_CTX_set_cipher_list(ctx, CIPHER) != 1
        || SSL_CTX_set1_groups_list(ctx, GROUPS) != 1)
        die("client context");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    memset(&to, 0, sizeof(to));
    to.sin_family = AF_INET;
    to.sin_port = htons(port);
    inet_pton(AF_INET, host, &to.sin_addr);
    BIO_ADDR_rawmake(server, AF_INET, &to.sin_addr, sizeof(to.sin_addr), to.sin_port);
    ep = epoll_create1(0);
    for (i = 0; i < n; i++) {
        client *c = &cs[i];
        int rcv = 1 << 16;
        c->fd = socket(AF_INET, SOCK_DGRAM, 0);
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
        if (connect(c->fd, (struct sockaddr *)&to, sizeof(to)) != 0)
            die("connect");
        nonblocking(c->fd);
        c->ssl = SSL_new(ctx);
        BIO *bio = BIO_new_dgram(c->fd, BIO_NOCLOSE);
        BIO_ctrl(bio, BIO_CTRL_DGRAM_SET_CONNECTED, 0, server);
        SSL_set_bio(c->ssl, bio, bio);
        SSL_set_options(c->ssl, SSL_OP_NO_QUERY_MTU);
        SSL_set_mtu(c->ssl, MTU);
        SSL_set_connect_state(c->ssl);
        ev.events = EPOLLIN;
        ev.data.ptr = c;
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    /* handshakes, at most 32 at once */
    deadline = now_s() + 60;
    while (established < n) {
        int k;
        if (now_s() > deadline) {
            fprintf(stderr, "wire_c: only %d of %d handshakes done\n", established, n);
            return 2;
        }
        while (inflight < 32 && started < n) {
            client *c = &cs[started++];
            c->state = 1;
            inflight++;
            if (SSL_do_handshake(c->ssl) == 1) {
                c->state = 2;
                inflight--;
                established++;
            }
            ERR_clear_error();
        }
        k = epoll_wait(ep, evs, 256, 10);
        for (i = 0; i < k; i++) {
            client *c = evs[i].data.ptr;
            if (c->state != 1)
                continue;
            int r = SSL_do_handshake(c->ssl);
            if (r == 1) {
                c->state = 2;
                inflight--;
                established++;
            } else {
                int e = SSL_get_error(c->ssl, r);
                if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                    die("client handshake");
            }
            ERR_clear_error();
        }
        for (i = 0; i < started; i++)
            if (cs[i].state == 1)
                DTLSv1_handle_timeout(cs[i].ssl);
    }
    /* echo: warm-up, then the counted window */
    memset(out, 'x', size);
    for (i = 0; i < n; i++)
        send_request(&cs[i], out, size);
    phase_end = now_s() + warmup;
    for (;;) {
        double t = now_s();
        int k;
        if (t >= phase_end) {
            if (counting)
                break;
            counting = 1;
            phase_end = t + window;
            t_start = now_ns();
            srv0 = cpu_ns_of(server_pid);
            own0 = own_cpu_ns();
        }
        k = epoll_wait(ep, evs, 256, 10);
        for (i = 0; i < k; i++) {
            client *c = evs[i].data.ptr;
            for (;;) {
                int r = SSL_read(c->ssl, buf, 65536);
                if (r <= 0) {
                    int e = SSL_get_error(c->ssl, r);
                    ERR_clear_error();
                    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                        break;
                    die("client read");
                }
                uint64_t seq;
                memcpy(&seq, buf, sizeof(seq));
                if (seq != c->seq || r != size)
                    continue;  /* a late answer to a replaced request */
                if (counting) {
                    uint64_t us = (now_ns() - c->sent_ns) / 1000;
                    hist[us > HIST_US ? HIST_US : us]++;
                    echoes++;
                }
                send_request(c, out, size);
                break;  /* the one answer in flight: no second read (epoll says if more came) */
            }
        }
        if (t - last_check > 0.01) {
            uint64_t limit = now_ns() - 1000000000ull;
            last_check = t;
            for (i = 0; i < n; i++)
                if (cs[i].sent_ns < limit) {
                    if (counting)
                        timeouts++;
                    send_request(&cs[i], out, size);
                }
        }
    }
    srv1 = cpu_ns_of(server_pid);
    own1 = own_cpu_ns();
    {
        double secs = (now_ns() - t_start) / 1e9;
        uint64_t acc = 0, p50 = 0, p99 = 0, u;
        int have50 = 0;
        for (u = 0; u <= HIST_US; u++) {
            acc += hist[u];
            if (!have50 && acc * 2 >= echoes) {
                p50 = u;
                have50 = 1;
            }
            if (acc * 100 >= echoes * 99) {
                p99 = u;
                break;
            }
        }
        printf("echoes=%llu seconds=%.3f rate=%.1f p50_us=%llu p99_us=%llu timeouts=%llu "
               "server_cpu_us=%.3f client_cpu_us=%.3f client_busy=%.3f\n",
               (unsigned long long)echoes, secs, echoes / secs, (unsigned long long)p50,
               (unsigned long long)p99, (unsigned long long)timeouts,
               echoes ? (srv1 - srv0) / 1e3 / echoes : 0.0,
               echoes ? (own1 - own0) / 1e3 / echoes : 0.0, (own1 - own0) / 1e9 / secs);
    }
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc == 6 && strcmp(argv[1], "server") == 0)
        return server_main(argc, argv);
    if (argc == 9 && strcmp(argv[1], "client") == 0)
        return client_main(argc, argv);
    fprintf(stderr, "usage: wire_c server PORT CERT KEY LIFETIME\n"
                    "       wire_c client HOST PORT N SIZE WARMUP WINDOW SERVER_PID\n");
    return 2;
}
