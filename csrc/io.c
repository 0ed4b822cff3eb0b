/*
 * Batched datagram I/O for the socket surfaces: many UDP datagrams per
 * system call (recvmmsg / sendmmsg), optionally with UDP GSO (UDP_SEGMENT)
 * for runs of equal-size datagrams to one address and UDP GRO on receive.
 *
 * The boundary is two calls over caller-owned flat arrays, no structs:
 *
 *   pd_io_recv(fd, arena, slot, n, offs, lens, addrs, cap, stats)
 *       up to n datagrams in one recvmmsg; message i lands at arena + i*slot
 *       (at most slot bytes). For each kept datagram j < return value:
 *       offs[j], lens[j], and its sender in addrs + j*PD_IO_ADDR_LEN (the raw
 *       sockaddr, zero-padded, so equal senders are equal bytes).
 *       stats[0] = messages the kernel gave, stats[1] = datagrams dropped as
 *       truncated (MSG_TRUNC: longer than slot; never handed on cut short).
 *       A GRO-coalesced message is split back into its datagrams (cap bounds
 *       how many entries the arrays hold).  Returns the kept count, 0 when
 *       nothing waits, or -errno.
 *
 *   pd_io_send(fd, data, lens, addrs, n, gso, stats)
 *       datagram i is lens[i] bytes of data (all concatenated) to the
 *       sockaddr at addrs + i*PD_IO_ADDR_LEN, in as few sendmmsg calls as it
 *       takes. With gso, a run of consecutive datagrams to the same address
 *       whose sizes are equal (the last may be shorter) goes as one
 *       UDP_SEGMENT message: the kernel cuts it back into exactly those
 *       datagrams. A datagram the kernel refuses (other than EAGAIN) is
 *       skipped and counted in stats[0]; at EAGAIN the rest are left unsent.
 *       Returns how many datagrams were handled (sent or refused): the caller
 *       keeps datagrams [ret, n) for later.
 *
 * Elsewhere than Linux both return -ENOSYS and the Python side falls back to
 * recvfrom/sendto.
 */
#define PD_IO_ADDR_LEN 28          /* a sockaddr_in6; a sockaddr_in fits */
#define PD_IO_CHUNK 64             /* messages per recvmmsg / sendmmsg */
#define PD_IO_GSO_MAX_SEGS 64      /* UDP_MAX_SEGMENTS */
#define PD_IO_GSO_MAX_BYTES 65000  /* below the largest UDP payload over IPv4 */

#if defined(__linux__)
#include <errno.h>
#include <string.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <netinet/udp.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

static int pd_io_available(void) { return 1; }

static int pd_io_recv(int fd, char *arena, int slot, int n, int *offs, int *lens,
                      unsigned char *addrs, int cap, int *stats)
{
    struct mmsghdr msgs[PD_IO_CHUNK];
    struct iovec iov[PD_IO_CHUNK];
    struct sockaddr_in6 names[PD_IO_CHUNK];
    /* room for one UDP_GRO cmsg per message (an int) */
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } ctl[PD_IO_CHUNK];
    int i, got, kept = 0;

    stats[0] = stats[1] = 0;
    if (n > PD_IO_CHUNK)
        n = PD_IO_CHUNK;
    if (n <= 0 || slot <= 0 || cap <= 0)
        return -EINVAL;
    memset(msgs, 0, sizeof(msgs[0]) * n);
    for (i = 0; i < n; i++) {
        iov[i].iov_base = arena + (size_t)i * slot;
        iov[i].iov_len = slot;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = sizeof(names[i]);
        msgs[i].msg_hdr.msg_control = ctl[i].buf;
        msgs[i].msg_hdr.msg_controllen = sizeof(ctl[i].buf);
    }
    do {
        got = recvmmsg(fd, msgs, n, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
    stats[0] = got;
    for (i = 0; i < got; i++) {
        struct msghdr *h = &msgs[i].msg_hdr;
        unsigned int len = msgs[i].msg_len;
        int seg = 0, off;
        struct cmsghdr *c;
        unsigned char name[PD_IO_ADDR_LEN];

        if (h->msg_flags & MSG_TRUNC) {  /* longer than a slot: drop it whole */
            stats[1]++;
            continue;
        }
        for (c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c))
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO)
                memcpy(&seg, CMSG_DATA(c), sizeof(seg));
        memset(name, 0, sizeof(name));
        memcpy(name, &names[i], h->msg_namelen < sizeof(name) ? h->msg_namelen : sizeof(name));
        if (seg <= 0 || (unsigned int)seg >= len)
            seg = (int)len;  /* one datagram (an empty one too) */
        off = 0;
        do {
            int this_len = (int)len - off < seg ? (int)len - off : seg;
            if (kept >= cap) {  /* no room left: count the rest as dropped */
                stats[1]++;
            } else {
                offs[kept] = i * slot + off;
                lens[kept] = this_len;
                memcpy(addrs + (size_t)kept * PD_IO_ADDR_LEN, name, PD_IO_ADDR_LEN);
                kept++;
            }
            off += seg;
        } while (off < (int)len);
    }
    return kept;
}

static socklen_t pd_io_namelen(const unsigned char *addr)
{
    sa_family_t family;
    memcpy(&family, addr, sizeof(family));
    return family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

/* One sendmsg per datagram of messages [first, first+count) after a GSO send failed. */
static int pd_io_send_each(int fd, const char *data, const int *lens, const size_t *starts,
                           const unsigned char *addrs, int first, int count, int *stats)
{
    int i;
    for (i = first; i < first + count; i++) {
        struct iovec v = { (void *)(data + starts[i]), (size_t)lens[i] };
        struct msghdr h;
        ssize_t r;
        memset(&h, 0, sizeof(h));
        h.msg_name = (void *)(addrs + (size_t)i * PD_IO_ADDR_LEN);
        h.msg_namelen = pd_io_namelen(addrs + (size_t)i * PD_IO_ADDR_LEN);
        h.msg_iov = &v;
        h.msg_iovlen = 1;
        do {
            r = sendmsg(fd, &h, MSG_DONTWAIT);
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return i - first;
            stats[0]++;
        }
    }
    return count;
}

static int pd_io_send(int fd, const char *data, const int *lens, const unsigned char *addrs,
                      int n, int gso, int *stats)
{
    struct mmsghdr msgs[PD_IO_CHUNK];
    struct iovec iov[PD_IO_CHUNK * 4];
    union { char buf[CMSG_SPACE(sizeof(uint16_t))]; struct cmsghdr align; } ctl[PD_IO_CHUNK];
    int first_dgram[PD_IO_CHUNK], dgrams[PD_IO_CHUNK];
    size_t starts_local[PD_IO_CHUNK * 4];
    size_t pos = 0;
    int done = 0;

    stats[0] = 0;
    if (n < 0)
        return -EINVAL;
    while (done < n) {
        int m = 0, v = 0, i = done, sent, k;
        /* build up to PD_IO_CHUNK messages from datagrams [done, ...) */
        while (i < n && m < PD_IO_CHUNK && v < PD_IO_CHUNK * 4) {
            const unsigned char *a = addrs + (size_t)i * PD_IO_ADDR_LEN;
            int run = 1, seg = lens[i];
            size_t bytes = (size_t)lens[i];
            if (gso && seg > 0) {  /* equal sizes to the same address, the last may be shorter */
                while (i + run < n && run < PD_IO_GSO_MAX_SEGS && v + run < PD_IO_CHUNK * 4
                       && lens[i + run] > 0 && lens[i + run] <= seg
                       && bytes + (size_t)lens[i + run] <= PD_IO_GSO_MAX_BYTES
                       && memcmp(a, addrs + (size_t)(i + run) * PD_IO_ADDR_LEN, PD_IO_ADDR_LEN) == 0) {
                    bytes += (size_t)lens[i + run];
                    run++;
                    if (lens[i + run - 1] < seg)
                        break;  /* a shorter one ends the run */
                }
            }
            memset(&msgs[m], 0, sizeof(msgs[m]));
            msgs[m].msg_hdr.msg_name = (void *)a;
            msgs[m].msg_hdr.msg_namelen = pd_io_namelen(a);
            msgs[m].msg_hdr.msg_iov = &iov[v];
            msgs[m].msg_hdr.msg_iovlen = run;
            for (k = 0; k < run; k++) {
                iov[v + k].iov_base = (void *)(data + pos);
                iov[v + k].iov_len = (size_t)lens[i + k];
                starts_local[v + k] = pos;
                pos += (size_t)lens[i + k];
            }
            if (run > 1) {
                struct cmsghdr *c;
                uint16_t s = (uint16_t)seg;
                msgs[m].msg_hdr.msg_control = ctl[m].buf;
                msgs[m].msg_hdr.msg_controllen = sizeof(ctl[m].buf);
                c = CMSG_FIRSTHDR(&msgs[m].msg_hdr);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                memcpy(CMSG_DATA(c), &s, sizeof(s));
            }
            first_dgram[m] = v;
            dgrams[m] = run;
            v += run;
            i += run;
            m++;
        }
        /* send them; a failed message is skipped (GSO ones retried one by one) */
        k = 0;
        while (k < m) {
            do {
                sent = sendmmsg(fd, msgs + k, m - k, MSG_DONTWAIT);
            } while (sent < 0 && errno == EINTR);
            if (sent < 0) {
                int err = errno, handled;
                if (err == EAGAIN || err == EWOULDBLOCK)
                    return done;
                if (dgrams[k] > 1) {
                    /* GSO refused (no offload here, or too large): plain datagrams */
                    size_t starts[PD_IO_GSO_MAX_SEGS];
                    int lens_run[PD_IO_GSO_MAX_SEGS], j;
                    for (j = 0; j < dgrams[k]; j++) {
                        starts[j] = starts_local[first_dgram[k] + j] - starts_local[first_dgram[k]];
                        lens_run[j] = (int)iov[first_dgram[k] + j].iov_len;
                    }
                    {
                        unsigned char one[PD_IO_GSO_MAX_SEGS * PD_IO_ADDR_LEN];
                        for (j = 0; j < dgrams[k]; j++)
                            memcpy(one + (size_t)j * PD_IO_ADDR_LEN, msgs[k].msg_hdr.msg_name,
                                   PD_IO_ADDR_LEN);
                        handled = pd_io_send_each(fd, (const char *)iov[first_dgram[k]].iov_base,
                                                  lens_run, starts, one, 0, dgrams[k], stats);
                    }
                    if (handled < dgrams[k])
                        return done + handled;
                } else {
                    stats[0]++;
                }
                done += dgrams[k];
                k++;
                continue;
            }
            for (; sent > 0; sent--, k++)
                done += dgrams[k];
        }
    }
    return done;
}

#else  /* not Linux: no batching, the Python side uses recvfrom/sendto */
#include <errno.h>
#ifndef ENOSYS
#define ENOSYS 38
#endif
static int pd_io_available(void) { return 0; }
static int pd_io_recv(int fd, char *arena, int slot, int n, int *offs, int *lens,
                      unsigned char *addrs, int cap, int *stats)
{
    (void)fd; (void)arena; (void)slot; (void)n; (void)offs; (void)lens; (void)addrs; (void)cap;
    stats[0] = stats[1] = 0;
    return -ENOSYS;
}
static int pd_io_send(int fd, const char *data, const int *lens, const unsigned char *addrs,
                      int n, int gso, int *stats)
{
    (void)fd; (void)data; (void)lens; (void)addrs; (void)n; (void)gso;
    stats[0] = 0;
    return -ENOSYS;
}
#endif
