/* memory.c: what one engine holds, in bytes, for DtlsServer's memory budgets.
 *
 * pd_memory() adds up the engine's own allocations from their sizes (each as
 * a 64-bit glibc chunk: 8 bytes of header, 16-byte aligned) and, for what
 * libssl holds, constants measured by benchmarks/memory_constants.py with
 * glibc's mallinfo2() over 1,000 engines (OpenSSL 3.0.19, x86_64, an
 * ECDHE-ECDSA P-256 server; a PSK handshake holds less):
 *   - an SSL object mid-handshake (after our first flight: the handshake
 *     buffers, transcript, ECDHE key, the flight kept for retransmission);
 *   - an SSL object that stays after the handshake (libssl's record layer),
 *     with its buffers, and after SSL_free_buffers;
 *   - one EVP_CIPHER_CTX holding an AEAD key (the engine's record layer keeps
 *     two while active and none while idle).
 * These are bytes the allocator hands out (mallinfo2), more than the RSS the
 * README reports: libssl's 17 KB record buffers are not all touched.
 * Estimates for budgets, not an allocator census: one C call, no walking of
 * libssl's internals. */

/* measured: 76,706 (ECDHE-ECDSA) and 75,362 (PSK-CCM_8) */
#define PD_MEM_SSL_HANDSHAKE 77000
/* measured: 69,775 and 36,416 (ECDHE-ECDSA-AES128-GCM, record_layer="openssl") */
#define PD_MEM_SSL_ESTABLISHED 70000
#define PD_MEM_SSL_RELEASED 36500
/* measured: 1,168 (AES-128-GCM), 625 (AES-128-CCM_8) */
#define PD_MEM_CIPHER_CTX 1200

static size_t pd_chunk(size_t request)
{
    size_t n = (request + 8 + 15) & ~(size_t)15;
    return n < 32 ? 32 : n;
}

static size_t pd_nodes_memory(const pd_node *n)
{
    size_t total = 0;
    for (; n != NULL; n = n->next)
        total += pd_chunk(sizeof(pd_node) + n->len);
    return total;
}

static size_t pd_rl_memory(const struct pd_rl *rl)
{
    size_t total;
    if (rl == NULL)
        return 0;
    total = pd_chunk(sizeof(*rl)) + pd_nodes_memory(rl->flight);
    if (rl->peer_der != NULL && rl->peer_der_len > 0)
        total += pd_chunk((size_t)rl->peer_der_len);
    if (rl->psk_identity != NULL)
        total += pd_chunk(strlen(rl->psk_identity) + 1);
    if (rl->alpn != NULL)
        total += pd_chunk(rl->alpn_len);
    if (rl->session_der != NULL && rl->session_der_len > 0)
        total += pd_chunk((size_t)rl->session_der_len);
    total += (rl->enc != NULL ? PD_MEM_CIPHER_CTX : 0) + (rl->dec != NULL ? PD_MEM_CIPHER_CTX : 0);
    return total;
}

size_t pd_memory(const pd_conn *c)
{
    size_t total;
    if (c == NULL || c == &pd_dead)
        return 0;
    total = pd_chunk(sizeof(*c)) + pd_nodes_memory(c->in_head) + pd_nodes_memory(c->plain_head)
        + pd_nodes_memory(c->early);
    if (c->taken != NULL) /* one node, its next pointer stale */
        total += pd_chunk(sizeof(pd_node) + c->taken->len);
    if (c->out != NULL)
        total += pd_chunk(c->out_cap);
    if (c->pins != NULL)
        total += pd_chunk(sizeof(pd_pin) * (size_t)c->npins);
    if (c->peer != NULL)
        total += pd_chunk(c->peer_len ? c->peer_len : 1);
    if (c->cid != NULL)
        total += pd_chunk(sizeof(*c->cid) + c->cid->rx_len + c->cid->tx_len)
            + pd_rl_memory(c->cid->xl);
    total += pd_rl_memory(c->rl);
    if (c->ssl != NULL)
        total += c->state < PD_STATE_ESTABLISHED ? PD_MEM_SSL_HANDSHAKE
            : c->buffers_released ? PD_MEM_SSL_RELEASED : PD_MEM_SSL_ESTABLISHED;
    return total;
}
