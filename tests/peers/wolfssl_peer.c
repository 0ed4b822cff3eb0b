/*
 * wolfssl_peer: a DTLS 1.2 peer built on wolfSSL, for RFC 9146 Connection ID
 * (CID) interop tests.  It is compiled and run inside a Debian sid root made
 * by `bash .ci/wolfssl` (sid's libwolfssl is built with WOLFSSL_DTLS_CID);
 * tests/wolfssl.py starts it with chroot.
 *
 * Usage:
 *   wolfssl_peer client|server --port P [--host 127.0.0.1]
 *                [--cid HEX | --cid-empty | --no-cid]        (default --no-cid)
 *                [--cert F --key F] [--ca F | --no-verify] [--request-cert]
 *                [--psk-identity ID --psk-key HEX] [--cipher LIST]
 *                [--timeout S]
 *   wolfssl_peer --version        print "wolfSSL <version>" and exit
 *   wolfssl_peer --list-ciphers   print wolfSSL's cipher list, one a line
 *
 *   client: --host/--port name the server.  server: the address to bind
 *   (--port 0 binds an ephemeral port; READY prints the real one).
 *   --cid HEX     negotiate CID; HEX is the CID we ask the peer to put in the
 *                 records it sends us (our rx CID), 1..10 bytes (this build's
 *                 DTLS_CID_MAX_SIZE is 10; wolfSSL_dtls_cid_max_size()).
 *   --cid-empty   negotiate CID with a zero-length rx CID: we use the peer's
 *                 CID in what we send, and want none in what we receive.
 *   --no-cid      no connection_id extension at all.
 *   --cert/--key  PEM certificate and key (ECDSA P-256 in the tests).
 *   --ca F        PEM CA file: verify the peer (the server then requires a
 *                 client certificate).  Without it nothing is verified.
 *   --request-cert  server without --ca: ask for a client certificate and
 *                 accept any.
 *   --psk-identity/--psk-key  PSK (key in hex).  The default cipher list
 *                 with PSK is ECDHE-PSK-CHACHA20-POLY1305:PSK-CHACHA20-POLY1305
 *                 (Debian's wolfSSL has no plain-PSK AES suites; it does have
 *                 ECDHE-PSK-AES128-GCM-SHA256 and DHE-PSK-*: --cipher).
 *   --cipher LIST wolfSSL/OpenSSL-style cipher list.
 *   --timeout S   server: exit after S seconds without a datagram (default
 *                 30); client: handshake deadline (default 30).
 *
 * Line protocol on stdout (every line flushed):
 *   READY <port>            bound (server: listening port; client: local port)
 *   PEER <ip>:<port>        server: the address it sends to, at first and
 *                           whenever it changes
 *   PENDING <ip>:<port>     server: a CID record from a new address was handed
 *                           to wolfSSL as a pending peer (adopted only if it
 *                           decrypts: a PEER line follows)
 *   DROP <ip>:<port> <why>  server: a datagram from a new address ignored
 *   HANDSHAKE cipher=<name> tx_cid=<hex|-> rx_cid=<hex|-> cid=<on|off>
 *                           tx = CID in records we send, rx = CID we expect
 *                           in records we receive; cid=on when the extension
 *                           was negotiated (possibly with empty CIDs; the
 *                           client reads that off the ServerHello itself)
 *   RECV <text>             one application record received; bytes outside
 *                           0x20..0x7e and backslash are written \xHH
 *   REBOUND <port>          client: now on a new UDP socket with this port
 *   CLOSED                  close_notify sent (client) / received (server)
 *   TIMEOUT                 server: --timeout of inactivity; exit status 3
 *   ERROR <message>         failure; exit status 1 (2: bad command line)
 *
 * Server: one association.  Every application record is echoed back as
 * "echo:<data>".  The socket is unconnected, and our I/O callbacks do the
 * recvfrom/sendto: wolfSSL's own receive path drops datagrams from any
 * address but the current peer.  After the handshake, when CID is in use
 * (non-empty rx CID), a datagram from a new address whose first record is a
 * tls12_cid record (content type 25) is handed to wolfSSL after
 * wolfSSL_dtls_set_pending_peer(); wolfSSL makes it the peer only once that
 * record decrypts (its dtlsProcessPendingPeer).  Other datagrams from new
 * addresses are dropped (DROP).  Sends go to wolfSSL_dtls_get0_peer().
 * Note: wolfSSL 5.9.2 promotes the pending peer for any record that
 * decrypts, without RFC 9146's "newer than the newest" sequence check
 * (wolfSSL issue #10609).
 *
 * Client: connects, handshakes, prints HANDSHAKE, then reads stdin lines:
 *   send <text>   send one record, wait up to 5 s for one back, print RECV
 *   rebind        move to a new UDP socket (new source port), print REBOUND
 *   close         send close_notify, print CLOSED, exit 0 (also on EOF)
 *
 * wolfSSL's CID (5.9.2): RFC 9146 final format -- extension 54, record
 * content type tls12_cid (25) with the CID after the sequence number, and
 * the AAD/MAC input with seq_num_placeholder (8 x 0xff), tls12_cid,
 * cid_length, tls12_cid, version, epoch+seq, cid, length.
 * The rx CID is only what --cid sets: wolfSSL makes none up itself.
 *
 * Known behaviour: a wolfSSL DTLS 1.2 client that offers a non-empty CID
 * cannot finish a handshake with a server that ignores CID (openssl
 * s_server -dtls1_2: the server completes, this client times out).  Only
 * the server side drops the CID state when the extension is not
 * negotiated; the client keeps its rx CID, and the AAD it decrypts with is
 * chosen by its rx CID size, not by the record's content type, so the
 * server's Finished (a plain type-22 record) never authenticates.  With
 * --cid-empty (rx CID of size 0) the handshake succeeds.
 */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef WOLFSSL_DTLS_CID
#error "this wolfSSL is built without WOLFSSL_DTLS_CID"
#endif

#define TLS12_CID_TYPE 25
#define MAX_CID 255
#define REPLY_TIMEOUT 5.0

enum cid_mode { CID_OFF, CID_EMPTY, CID_VALUE };

struct opts {
    int server;
    const char *host;
    int port;
    enum cid_mode cid;
    unsigned char cid_val[MAX_CID];
    unsigned int cid_len;
    const char *cert, *key, *ca, *cipher, *psk_id;
    unsigned char psk_key[64];
    unsigned int psk_len;
    int request_cert;
    double timeout;
};

struct io {
    int fd;
    int server;
    double last_rx;                 /* monotonic time of the last datagram */
    struct sockaddr_storage shown;  /* the peer address last printed */
    socklen_t shown_len;
    int sh_seen;                    /* client: a ServerHello was parsed */
    int sh_cid;                     /* ... and it had connection_id (54) */
};

static struct opts O;
static struct io IO;

/* ------------------------------------------------------------- output */

static void out(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

static void fail(const char *fmt, ...)
{
    va_list ap;
    fputs("ERROR ", stdout);
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
    exit(1);
}

static void usage(const char *msg)
{
    out("ERROR usage: %s", msg);
    fprintf(stderr,
            "usage: wolfssl_peer client|server --port P [--host H] "
            "[--cid HEX|--cid-empty|--no-cid] [--cert F --key F] "
            "[--ca F|--no-verify] [--request-cert] [--psk-identity ID "
            "--psk-key HEX] [--cipher LIST] [--timeout S] [--list-ciphers]\n");
    exit(2);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *addr_str(const struct sockaddr_storage *sa, char *buf,
                            size_t len)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s->sin_addr, ip, sizeof ip);
        port = ntohs(s->sin_port);
        snprintf(buf, len, "%s:%d", ip, port);
    } else if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s->sin6_addr, ip, sizeof ip);
        port = ntohs(s->sin6_port);
        snprintf(buf, len, "[%s]:%d", ip, port);
    } else {
        snprintf(buf, len, "?:0");
    }
    return buf;
}

static int same_addr(const void *a, socklen_t alen, const void *b,
                     socklen_t blen)
{
    const struct sockaddr *x = a, *y = b;
    if (a == NULL || b == NULL || alen == 0 || blen == 0)
        return 0;
    if (x->sa_family != y->sa_family)
        return 0;
    if (x->sa_family == AF_INET) {
        const struct sockaddr_in *p = a, *q = b;
        return p->sin_port == q->sin_port &&
               p->sin_addr.s_addr == q->sin_addr.s_addr;
    }
    if (x->sa_family == AF_INET6) {
        const struct sockaddr_in6 *p = a, *q = b;
        return p->sin6_port == q->sin6_port &&
               memcmp(&p->sin6_addr, &q->sin6_addr, sizeof p->sin6_addr) == 0;
    }
    return alen == blen && memcmp(a, b, alen) == 0;
}

static void print_text(const char *tag, const unsigned char *buf, int n)
{
    int i;
    fputs(tag, stdout);
    for (i = 0; i < n; i++) {
        unsigned char c = buf[i];
        if (c < 0x20 || c > 0x7e || c == '\\')
            printf("\\x%02x", c);
        else
            fputc(c, stdout);
    }
    fputc('\n', stdout);
    fflush(stdout);
}

static void hex_of(const unsigned char *b, unsigned int n, char *outbuf)
{
    unsigned int i;
    if (n == 0) {
        strcpy(outbuf, "-");
        return;
    }
    for (i = 0; i < n; i++)
        sprintf(outbuf + 2 * i, "%02x", b[i]);
}

static int parse_hex(const char *s, unsigned char *outbuf, unsigned int max,
                     unsigned int *len)
{
    size_t n = strlen(s), i;
    if (n % 2 != 0 || n / 2 > max)
        return -1;
    for (i = 0; i < n / 2; i++) {
        unsigned int v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            return -1;
        outbuf[i] = (unsigned char)v;
    }
    *len = (unsigned int)(n / 2);
    return 0;
}

/* Print PEER when the address wolfSSL sends to differs from the last one. */
static void report_peer(WOLFSSL *ssl)
{
    const void *peer = NULL;
    unsigned int psz = 0;
    char buf[80];
    if (!IO.server)
        return;
    if (wolfSSL_dtls_get0_peer(ssl, &peer, &psz) != WOLFSSL_SUCCESS ||
        peer == NULL || psz == 0 || psz > sizeof IO.shown)
        return;
    if (same_addr(peer, psz, &IO.shown, IO.shown_len))
        return;
    memset(&IO.shown, 0, sizeof IO.shown);
    memcpy(&IO.shown, peer, psz);
    IO.shown_len = psz;
    out("PEER %s", addr_str(&IO.shown, buf, sizeof buf));
}

/* ------------------------------------------------------------ I/O callbacks */

static int cid_rx_len(WOLFSSL *ssl)
{
    unsigned int n = 0;
    if (wolfSSL_dtls_cid_get_rx_size(ssl, &n) != WOLFSSL_SUCCESS)
        return 0;
    return (int)n;
}

/* Client: note whether the ServerHello carries the connection_id extension.
 * A wolfSSL 5.9 DTLS 1.2 client keeps its CID state when the server ignores
 * the extension (only the server side drops it), so
 * wolfSSL_dtls_cid_is_enabled() cannot tell; the plaintext ServerHello can. */
static void scan_server_hello(const unsigned char *d, size_t n)
{
    size_t off = 0;
    while (off + 13 <= n) {
        const unsigned char *h = d + off;  /* record header */
        const unsigned char *r = h + 13;   /* record body */
        size_t rlen = ((size_t)h[11] << 8) | h[12];
        if (off + 13 + rlen > n)
            return;
        off += 13 + rlen;
        /* epoch-0 handshake record holding an unfragmented ServerHello */
        if (h[0] != 22 || h[3] != 0 || h[4] != 0 || rlen < 12 || r[0] != 2)
            continue;
        {
            size_t hlen = ((size_t)r[1] << 16) | ((size_t)r[2] << 8) | r[3];
            size_t foff = ((size_t)r[6] << 16) | ((size_t)r[7] << 8) | r[8];
            size_t flen = ((size_t)r[9] << 16) | ((size_t)r[10] << 8) | r[11];
            const unsigned char *b = r + 12;
            size_t i = 2 + 32, elen, end;
            if (foff != 0 || flen != hlen || 12 + hlen > rlen)
                continue;
            if (i + 1 > hlen)
                return;
            i += 1 + b[i];  /* session_id */
            i += 2 + 1;     /* cipher_suite, compression_method */
            IO.sh_seen = 1;
            IO.sh_cid = 0;
            if (i + 2 > hlen)
                return;     /* no extensions */
            elen = ((size_t)b[i] << 8) | b[i + 1];
            i += 2;
            end = i + elen < hlen ? i + elen : hlen;
            while (i + 4 <= end) {
                unsigned int type = ((unsigned int)b[i] << 8) | b[i + 1];
                size_t len = ((size_t)b[i + 2] << 8) | b[i + 3];
                if (type == 54)
                    IO.sh_cid = 1;
                i += 4 + len;
            }
            return;
        }
    }
}

static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
    struct io *io = ctx;
    for (;;) {
        struct sockaddr_storage from;
        socklen_t flen = sizeof from;
        const void *peer = NULL;
        unsigned int psz = 0;
        char abuf[80];
        ssize_t n;

        memset(&from, 0, sizeof from);
        n = recvfrom(io->fd, buf, (size_t)sz, 0, (struct sockaddr *)&from,
                     &flen);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return WOLFSSL_CBIO_ERR_WANT_READ;
            if (errno == ECONNREFUSED)  /* ICMP for an earlier send */
                return WOLFSSL_CBIO_ERR_WANT_READ;
            return WOLFSSL_CBIO_ERR_GENERAL;
        }
        if (!io->server) {  /* connected socket: the kernel filters */
            io->last_rx = now();
            if (!wolfSSL_is_init_finished(ssl))
                scan_server_hello((const unsigned char *)buf, (size_t)n);
            return (int)n;
        }
        wolfSSL_dtls_get0_peer(ssl, &peer, &psz);
        if (peer == NULL || psz == 0) {
            /* first datagram of the association: its source is the peer */
            if (wolfSSL_dtls_set_peer(ssl, &from, flen) != WOLFSSL_SUCCESS)
                return WOLFSSL_CBIO_ERR_GENERAL;
            io->last_rx = now();
            report_peer(ssl);
            return (int)n;
        }
        if (same_addr(peer, psz, &from, flen)) {
            io->last_rx = now();
            return (int)n;
        }
        addr_str(&from, abuf, sizeof abuf);
        if (!wolfSSL_is_init_finished(ssl)) {
            out("DROP %s handshake in progress with another address", abuf);
            continue;
        }
        if (cid_rx_len(ssl) == 0) {
            out("DROP %s no CID in use", abuf);
            continue;
        }
        if (n < 1 || (unsigned char)buf[0] != TLS12_CID_TYPE) {
            out("DROP %s not a CID record", abuf);
            continue;
        }
        if (wolfSSL_dtls_set_pending_peer(ssl, &from, flen) !=
            WOLFSSL_SUCCESS) {
            out("DROP %s wolfSSL_dtls_set_pending_peer failed", abuf);
            continue;
        }
        out("PENDING %s", abuf);
        io->last_rx = now();
        return (int)n;
    }
}

static int io_send(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
    struct io *io = ctx;
    ssize_t n;
    for (;;) {
        if (io->server) {
            const void *peer = NULL;
            unsigned int psz = 0;
            if (wolfSSL_dtls_get0_peer(ssl, &peer, &psz) != WOLFSSL_SUCCESS ||
                peer == NULL || psz == 0)
                return WOLFSSL_CBIO_ERR_GENERAL;
            report_peer(ssl);
            n = sendto(io->fd, buf, (size_t)sz, 0,
                       (const struct sockaddr *)peer, (socklen_t)psz);
        } else {
            n = send(io->fd, buf, (size_t)sz, 0);
        }
        if (n >= 0)
            return (int)n;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return WOLFSSL_CBIO_ERR_WANT_WRITE;
        if (errno == ECONNREFUSED)  /* an earlier datagram got ICMP; lost */
            return sz;
        return WOLFSSL_CBIO_ERR_GENERAL;
    }
}

/* --------------------------------------------------------------- driving */

enum { OP_HANDSHAKE, OP_READ, OP_WRITE, OP_SHUTDOWN };
#define DRIVE_TIMEOUT (-1000000)

/* Runs one wolfSSL operation on the non-blocking socket to completion,
 * polling and firing DTLS retransmission timers, until the deadline
 * (absolute monotonic time; for the server's inactivity timeout, measured
 * from the last datagram).  Returns wolfSSL's result (> 0 or
 * WOLFSSL_SUCCESS), 0 for a close_notify on read, DRIVE_TIMEOUT, or a
 * negative wolfSSL error code. */
static int drive(WOLFSSL *ssl, int op, void *buf, int len, double deadline,
                 int idle)
{
    for (;;) {
        int ret, err, wait_ms;
        double left;
        struct pollfd pfd;

        switch (op) {
        case OP_HANDSHAKE:
            ret = IO.server ? wolfSSL_accept(ssl) : wolfSSL_connect(ssl);
            if (ret == WOLFSSL_SUCCESS)
                return ret;
            break;
        case OP_READ:
            ret = wolfSSL_read(ssl, buf, len);
            report_peer(ssl);
            if (ret > 0)
                return ret;
            break;
        case OP_WRITE:
            ret = wolfSSL_write(ssl, buf, len);
            if (ret > 0)
                return ret;
            break;
        default:
            ret = wolfSSL_shutdown(ssl);
            if (ret == WOLFSSL_SUCCESS || ret == WOLFSSL_SHUTDOWN_NOT_DONE)
                return WOLFSSL_SUCCESS;
            break;
        }
        err = wolfSSL_get_error(ssl, ret);
        if (err == WOLFSSL_ERROR_ZERO_RETURN)
            return 0;
        if (err != WOLFSSL_ERROR_WANT_READ && err != WOLFSSL_ERROR_WANT_WRITE)
            return err < 0 ? err : -err - 1;

        left = (idle ? IO.last_rx + (deadline) : deadline) - now();
        if (left <= 0)
            return DRIVE_TIMEOUT;
        wait_ms = (int)(left * 1000) + 1;
        if (!wolfSSL_is_init_finished(ssl)) {
            int t = wolfSSL_dtls_get_current_timeout(ssl);
            if (t > 0 && t * 1000 < wait_ms)
                wait_ms = t * 1000;
        }
        pfd.fd = IO.fd;
        pfd.events = err == WOLFSSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN;
        pfd.revents = 0;
        ret = poll(&pfd, 1, wait_ms);
        if (ret < 0 && errno != EINTR)
            return -1;
        if (ret == 0 && !wolfSSL_is_init_finished(ssl)) {
            if (wolfSSL_dtls_got_timeout(ssl) != WOLFSSL_SUCCESS) {
                err = wolfSSL_get_error(ssl, 0);
                if (err != WOLFSSL_ERROR_WANT_READ &&
                    err != WOLFSSL_ERROR_WANT_WRITE)
                    return err < 0 ? err : -1;
            }
        }
    }
}

static const char *err_text(WOLFSSL *ssl, int code, char *buf, size_t len)
{
    (void)ssl;
    if (code == DRIVE_TIMEOUT)
        return "timeout";
    wolfSSL_ERR_error_string_n((unsigned long)(code < 0 ? -code : code), buf,
                               len);
    snprintf(buf + strlen(buf), len - strlen(buf), " (%d)", code);
    return buf;
}

/* ------------------------------------------------------------------ setup */

static unsigned int psk_client_cb(WOLFSSL *ssl, const char *hint,
                                  char *identity, unsigned int id_max,
                                  unsigned char *key, unsigned int key_max)
{
    (void)ssl;
    (void)hint;
    if (strlen(O.psk_id) + 1 > id_max || O.psk_len > key_max)
        return 0;
    strcpy(identity, O.psk_id);
    memcpy(key, O.psk_key, O.psk_len);
    return O.psk_len;
}

static unsigned int psk_server_cb(WOLFSSL *ssl, const char *identity,
                                  unsigned char *key, unsigned int key_max)
{
    (void)ssl;
    if (identity == NULL || strcmp(identity, O.psk_id) != 0 ||
        O.psk_len > key_max)
        return 0;
    memcpy(key, O.psk_key, O.psk_len);
    return O.psk_len;
}

static int accept_any_cb(int preverify, WOLFSSL_X509_STORE_CTX *store)
{
    (void)preverify;
    (void)store;
    return 1;
}

static int open_socket(int server)
{
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        fail("socket: %s", strerror(errno));
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    if (inet_pton(AF_INET, O.host, &sa.sin_addr) != 1)
        fail("bad IPv4 address %s", O.host);
    if (server) {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sa.sin_port = htons((unsigned short)O.port);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
            fail("bind %s:%d: %s", O.host, O.port, strerror(errno));
    } else {
        sa.sin_port = htons((unsigned short)O.port);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
            fail("connect %s:%d: %s", O.host, O.port, strerror(errno));
    }
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0)
        fail("fcntl: %s", strerror(errno));
    return fd;
}

static int local_port(int fd)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    if (getsockname(fd, (struct sockaddr *)&sa, &len) != 0)
        fail("getsockname: %s", strerror(errno));
    return ntohs(sa.sin_port);
}

static void parse_args(int argc, char **argv)
{
    int i;
    memset(&O, 0, sizeof O);
    O.host = "127.0.0.1";
    O.port = -1;
    O.timeout = 30;
    O.cid = CID_OFF;
    if (argc >= 2 && strcmp(argv[1], "--version") == 0) {
        printf("wolfSSL %s\n", wolfSSL_lib_version());
        exit(0);
    }
    if (argc >= 2 && strcmp(argv[1], "--list-ciphers") == 0) {
        char buf[16384], *p;
        wolfSSL_Init();
        if (wolfSSL_get_ciphers(buf, sizeof buf) != WOLFSSL_SUCCESS)
            fail("wolfSSL_get_ciphers failed");
        for (p = strtok(buf, ":"); p != NULL; p = strtok(NULL, ":"))
            puts(p);
        exit(0);
    }
    if (argc < 2)
        usage("client or server first");
    if (strcmp(argv[1], "server") == 0)
        O.server = 1;
    else if (strcmp(argv[1], "client") != 0)
        usage("client or server first");
    for (i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV()                                                     \
    do {                                                            \
        if (v == NULL)                                              \
            usage("option needs a value");                          \
        i++;                                                        \
    } while (0)
        if (strcmp(a, "--port") == 0) {
            NEEDV();
            O.port = atoi(v);
        } else if (strcmp(a, "--host") == 0) {
            NEEDV();
            O.host = v;
        } else if (strcmp(a, "--cid") == 0) {
            NEEDV();
            if (parse_hex(v, O.cid_val, MAX_CID, &O.cid_len) != 0 ||
                O.cid_len == 0)
                usage("--cid takes 1..255 bytes of hex");
            O.cid = CID_VALUE;
        } else if (strcmp(a, "--cid-empty") == 0) {
            O.cid = CID_EMPTY;
        } else if (strcmp(a, "--no-cid") == 0) {
            O.cid = CID_OFF;
        } else if (strcmp(a, "--cert") == 0) {
            NEEDV();
            O.cert = v;
        } else if (strcmp(a, "--key") == 0) {
            NEEDV();
            O.key = v;
        } else if (strcmp(a, "--ca") == 0) {
            NEEDV();
            O.ca = v;
        } else if (strcmp(a, "--no-verify") == 0 ||
                   strcmp(a, "--fingerprint-free") == 0) {
            O.ca = NULL;
        } else if (strcmp(a, "--request-cert") == 0) {
            O.request_cert = 1;
        } else if (strcmp(a, "--psk-identity") == 0) {
            NEEDV();
            O.psk_id = v;
        } else if (strcmp(a, "--psk-key") == 0) {
            NEEDV();
            if (parse_hex(v, O.psk_key, sizeof O.psk_key, &O.psk_len) != 0 ||
                O.psk_len == 0)
                usage("--psk-key takes 1..64 bytes of hex");
        } else if (strcmp(a, "--cipher") == 0) {
            NEEDV();
            O.cipher = v;
        } else if (strcmp(a, "--timeout") == 0) {
            NEEDV();
            O.timeout = atof(v);
            if (O.timeout <= 0)
                usage("--timeout must be positive");
        } else {
            usage("unknown option");
        }
#undef NEEDV
    }
    if (O.port < 0 || O.port > 65535 || (!O.server && O.port == 0))
        usage("--port is required");
    if ((O.psk_id == NULL) != (O.psk_len == 0))
        usage("--psk-identity and --psk-key go together");
    if ((O.cert == NULL) != (O.key == NULL))
        usage("--cert and --key go together");
    if (O.server && O.cert == NULL && O.psk_id == NULL)
        usage("the server needs --cert/--key or a PSK");
}

static WOLFSSL_CTX *make_ctx(void)
{
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(O.server ? wolfDTLSv1_2_server_method()
                                                : wolfDTLSv1_2_client_method());
    const char *ciphers = O.cipher;
    if (ctx == NULL)
        fail("wolfSSL_CTX_new failed");
    if (O.cert != NULL) {
        if (wolfSSL_CTX_use_certificate_chain_file(ctx, O.cert) !=
            WOLFSSL_SUCCESS)
            fail("cannot load certificate %s", O.cert);
        if (wolfSSL_CTX_use_PrivateKey_file(ctx, O.key, WOLFSSL_FILETYPE_PEM) !=
            WOLFSSL_SUCCESS)
            fail("cannot load key %s", O.key);
    }
    if (O.ca != NULL) {
        if (wolfSSL_CTX_load_verify_locations(ctx, O.ca, NULL) !=
            WOLFSSL_SUCCESS)
            fail("cannot load CA file %s", O.ca);
        wolfSSL_CTX_set_verify(ctx,
                               O.server ? WOLFSSL_VERIFY_PEER |
                                              WOLFSSL_VERIFY_FAIL_IF_NO_PEER_CERT
                                        : WOLFSSL_VERIFY_PEER,
                               NULL);
    } else if (O.server && O.request_cert) {
        wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_PEER, accept_any_cb);
    } else {
        wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_NONE, NULL);
    }
    if (O.psk_id != NULL) {
        if (O.server) {
            wolfSSL_CTX_set_psk_server_callback(ctx, psk_server_cb);
            wolfSSL_CTX_use_psk_identity_hint(ctx, "wolfssl_peer");
        } else {
            wolfSSL_CTX_set_psk_client_callback(ctx, psk_client_cb);
        }
        if (ciphers == NULL)
            ciphers = "ECDHE-PSK-CHACHA20-POLY1305:PSK-CHACHA20-POLY1305";
    }
    if (ciphers != NULL &&
        wolfSSL_CTX_set_cipher_list(ctx, ciphers) != WOLFSSL_SUCCESS)
        fail("cipher list not accepted: %s", ciphers);
    wolfSSL_CTX_SetIORecv(ctx, io_recv);
    wolfSSL_CTX_SetIOSend(ctx, io_send);
    return ctx;
}

static WOLFSSL *make_ssl(WOLFSSL_CTX *ctx)
{
    WOLFSSL *ssl = wolfSSL_new(ctx);
    if (ssl == NULL)
        fail("wolfSSL_new failed");
    wolfSSL_SetIOReadCtx(ssl, &IO);
    wolfSSL_SetIOWriteCtx(ssl, &IO);
    wolfSSL_dtls_set_using_nonblock(ssl, 1);
    if (O.cid != CID_OFF) {
        int ret;
        if (wolfSSL_dtls_cid_use(ssl) != WOLFSSL_SUCCESS)
            fail("wolfSSL_dtls_cid_use failed");
        if (O.cid == CID_VALUE) {
            if (O.cid_len > (unsigned int)wolfSSL_dtls_cid_max_size())
                fail("--cid of %u bytes: this wolfSSL takes at most %d",
                     O.cid_len, wolfSSL_dtls_cid_max_size());
            ret = wolfSSL_dtls_cid_set(ssl, O.cid_val, O.cid_len);
            if (ret != WOLFSSL_SUCCESS)
                fail("wolfSSL_dtls_cid_set failed (%d)", ret);
        }
    }
    return ssl;
}

static void print_handshake(WOLFSSL *ssl)
{
    unsigned char cid[MAX_CID];
    char tx[2 * MAX_CID + 2] = "-", rx[2 * MAX_CID + 2] = "-";
    unsigned int n = 0;
    int on = wolfSSL_dtls_cid_is_enabled(ssl);
    if (!O.server && IO.sh_seen && !IO.sh_cid)
        on = 0;  /* offered, but the ServerHello had no connection_id */
    if (on) {
        if (wolfSSL_dtls_cid_get_tx_size(ssl, &n) == WOLFSSL_SUCCESS &&
            n > 0 && n <= sizeof cid &&
            wolfSSL_dtls_cid_get_tx(ssl, cid, sizeof cid) == WOLFSSL_SUCCESS)
            hex_of(cid, n, tx);
        n = 0;
        if (wolfSSL_dtls_cid_get_rx_size(ssl, &n) == WOLFSSL_SUCCESS &&
            n > 0 && n <= sizeof cid &&
            wolfSSL_dtls_cid_get_rx(ssl, cid, sizeof cid) == WOLFSSL_SUCCESS)
            hex_of(cid, n, rx);
    }
    out("HANDSHAKE cipher=%s tx_cid=%s rx_cid=%s cid=%s",
        wolfSSL_get_cipher_name(ssl), tx, rx, on ? "on" : "off");
}

/* ------------------------------------------------------------------ modes */

static int run_server(WOLFSSL *ssl)
{
    unsigned char buf[16384 + 5];
    char ebuf[160];
    int ret;

    IO.last_rx = now();
    ret = drive(ssl, OP_HANDSHAKE, NULL, 0, O.timeout, 1);
    if (ret == DRIVE_TIMEOUT) {
        out("TIMEOUT");
        return 3;
    }
    if (ret != WOLFSSL_SUCCESS)
        fail("handshake failed: %s", err_text(ssl, ret, ebuf, sizeof ebuf));
    report_peer(ssl);
    print_handshake(ssl);
    for (;;) {
        ret = drive(ssl, OP_READ, buf + 5, (int)sizeof buf - 5, O.timeout, 1);
        if (ret == DRIVE_TIMEOUT) {
            out("TIMEOUT");
            return 3;
        }
        if (ret == 0) {
            out("CLOSED");
            (void)wolfSSL_shutdown(ssl);
            return 0;
        }
        if (ret < 0)
            fail("read failed: %s", err_text(ssl, ret, ebuf, sizeof ebuf));
        print_text("RECV ", buf + 5, ret);
        memcpy(buf, "echo:", 5);
        ret = drive(ssl, OP_WRITE, buf, ret + 5, now() + REPLY_TIMEOUT, 0);
        if (ret <= 0)
            fail("write failed: %s", err_text(ssl, ret, ebuf, sizeof ebuf));
    }
}

static int run_client(WOLFSSL *ssl)
{
    char line[16384];
    unsigned char buf[16384];
    char ebuf[160];
    int ret;

    ret = drive(ssl, OP_HANDSHAKE, NULL, 0, now() + O.timeout, 0);
    if (ret != WOLFSSL_SUCCESS)
        fail("handshake failed: %s", err_text(ssl, ret, ebuf, sizeof ebuf));
    print_handshake(ssl);
    while (fgets(line, sizeof line, stdin) != NULL) {
        size_t n = strlen(line);
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = '\0';
        if (n == 0)
            continue;
        if (strncmp(line, "send ", 5) == 0 || strcmp(line, "send") == 0) {
            const char *text = n > 5 ? line + 5 : "";
            int len = (int)strlen(text);
            ret = drive(ssl, OP_WRITE, (void *)text, len,
                        now() + REPLY_TIMEOUT, 0);
            if (ret <= 0)
                fail("write failed: %s", err_text(ssl, ret, ebuf, sizeof ebuf));
            ret = drive(ssl, OP_READ, buf, (int)sizeof buf,
                        now() + REPLY_TIMEOUT, 0);
            if (ret == 0)
                fail("peer sent close_notify");
            if (ret < 0)
                fail("no reply: %s", err_text(ssl, ret, ebuf, sizeof ebuf));
            print_text("RECV ", buf, ret);
        } else if (strcmp(line, "rebind") == 0) {
            int fd = open_socket(0);
            close(IO.fd);
            IO.fd = fd;
            out("REBOUND %d", local_port(fd));
        } else if (strcmp(line, "close") == 0) {
            break;
        } else {
            fail("unknown command: %s", line);
        }
    }
    ret = drive(ssl, OP_SHUTDOWN, NULL, 0, now() + 1.0, 0);
    (void)ret;  /* close_notify is sent; the peer's reply is not awaited */
    out("CLOSED");
    return 0;
}

int main(int argc, char **argv)
{
    WOLFSSL_CTX *ctx;
    WOLFSSL *ssl;
    int rc;

    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    parse_args(argc, argv);
    if (wolfSSL_Init() != WOLFSSL_SUCCESS)
        fail("wolfSSL_Init failed");

    memset(&IO, 0, sizeof IO);
    IO.server = O.server;
    IO.fd = open_socket(O.server);
    ctx = make_ctx();
    ssl = make_ssl(ctx);
    out("READY %d", local_port(IO.fd));

    rc = O.server ? run_server(ssl) : run_client(ssl);

    wolfSSL_free(ssl);
    wolfSSL_CTX_free(ctx);
    wolfSSL_Cleanup();
    close(IO.fd);
    return rc;
}
