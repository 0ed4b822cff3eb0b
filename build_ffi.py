"""Build ``pydtls_ossl._openssl``: a cffi API-mode module compiled against libssl.

One block per OpenSSL header (its cdefs), plus the engine's C helpers from
``csrc/`` (cookies, the datagram BIO and hot paths, the record layer). OpenSSL 3.0 is the floor; later calls go behind
``PYDTLS_HAS_*`` flags so a 3.0 build never references a missing symbol.
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

CRYPTO = """
#define OPENSSL_VERSION_NUMBER ...
unsigned long OpenSSL_version_num(void);
const char *OpenSSL_version(int);
#define OPENSSL_VERSION ...
void CRYPTO_free(void *, const char *, int);
"""

ERR = """
unsigned long ERR_get_error_all(const char **, int *, const char **,
                                const char **, int *);
unsigned long ERR_peek_error(void);
void ERR_clear_error(void);
void ERR_error_string_n(unsigned long, char *, size_t);
#define ERR_TXT_STRING ...
"""

BIO = """
typedef ... BIO;
typedef ... BIO_METHOD;
BIO *BIO_new_mem_buf(const void *, int);
BIO *BIO_new(const BIO_METHOD *);
const BIO_METHOD *BIO_s_mem(void);
int BIO_free(BIO *);
long BIO_get_mem_data(BIO *, char **);
"""

EVP = """
typedef ... EVP_MD;
typedef ... EVP_PKEY;
const EVP_MD *EVP_get_digestbyname(const char *);
int EVP_MD_get_size(const EVP_MD *);
const EVP_MD *EVP_sha256(void);
void EVP_PKEY_free(EVP_PKEY *);
EVP_PKEY *EVP_EC_gen(const char *);
EVP_PKEY *EVP_RSA_gen(unsigned int);
EVP_PKEY *d2i_AutoPrivateKey(EVP_PKEY **, const unsigned char **, long);
"""

BN = """
typedef ... BIGNUM;
BIGNUM *BN_new(void);
void BN_free(BIGNUM *);
int BN_rand(BIGNUM *, int, int, int);
"""

ASN1 = """
typedef ... ASN1_INTEGER;
typedef ... ASN1_TIME;
ASN1_INTEGER *BN_to_ASN1_INTEGER(const BIGNUM *, ASN1_INTEGER *);
void ASN1_INTEGER_free(ASN1_INTEGER *);
"""

X509 = """
typedef ... X509;
typedef ... X509_NAME;
typedef ... X509_STORE;
typedef ... X509_EXTENSION;
typedef struct { ...; } X509V3_CTX;
X509 *X509_new(void);
void X509_free(X509 *);
int X509_set_version(X509 *, long);
int X509_set_serialNumber(X509 *, ASN1_INTEGER *);
ASN1_TIME *X509_getm_notBefore(X509 *);
ASN1_TIME *X509_getm_notAfter(X509 *);
ASN1_TIME *X509_gmtime_adj(ASN1_TIME *, long);
int X509_set_pubkey(X509 *, EVP_PKEY *);
const X509_NAME *X509_get_subject_name(const X509 *);
const X509_NAME *X509_get_issuer_name(const X509 *);
X509_NAME *X509_NAME_new(void);
void X509_NAME_free(X509_NAME *);
int X509_set_subject_name(X509 *, const X509_NAME *);
int X509_set_issuer_name(X509 *, const X509_NAME *);
int X509_NAME_add_entry_by_txt(X509_NAME *, const char *, int,
                               const unsigned char *, int, int, int);
int X509_NAME_print_ex(BIO *, const X509_NAME *, int, unsigned long);
#define XN_FLAG_RFC2253 ...
#define MBSTRING_UTF8 ...
int X509_sign(X509 *, EVP_PKEY *, const EVP_MD *);
int X509_check_private_key(const X509 *, const EVP_PKEY *);
int X509_digest(const X509 *, const EVP_MD *, unsigned char *, unsigned int *);
int X509_add_ext(X509 *, X509_EXTENSION *, int);
void X509_EXTENSION_free(X509_EXTENSION *);
void X509V3_set_ctx(X509V3_CTX *, X509 *, X509 *, void *, void *, int);
X509_EXTENSION *X509V3_EXT_conf_nid(void *, X509V3_CTX *, int, const char *);
#define NID_basic_constraints ...
#define NID_subject_alt_name ...
#define NID_key_usage ...
#define NID_subject_key_identifier ...
int i2d_X509(const X509 *, unsigned char **);
X509 *d2i_X509(X509 **, const unsigned char **, long);
int X509_STORE_add_cert(X509_STORE *, X509 *);
const char *X509_verify_cert_error_string(long);
#define X509_V_OK ...
#define X509_V_ERR_CERT_REJECTED ...
"""

PEM = """
X509 *PEM_read_bio_X509(BIO *, X509 **, void *, void *);
EVP_PKEY *PEM_read_bio_PrivateKey(BIO *, EVP_PKEY **, void *, void *);
int PEM_write_bio_X509(BIO *, const X509 *);
int PEM_write_bio_PKCS8PrivateKey(BIO *, const EVP_PKEY *, const void *,
                                  const char *, int, void *, void *);
"""

SSL = """
typedef ... SSL_METHOD;
typedef ... SSL_CTX;
typedef ... SSL;
typedef ... SSL_CIPHER;
const SSL_METHOD *DTLS_method(void);
SSL_CTX *SSL_CTX_new(const SSL_METHOD *);
void SSL_CTX_free(SSL_CTX *);
uint64_t SSL_CTX_set_options(SSL_CTX *, uint64_t);
int SSL_CTX_set_min_proto_version(SSL_CTX *, int);
int SSL_CTX_set_cipher_list(SSL_CTX *, const char *);
int SSL_CTX_set1_groups_list(SSL_CTX *, const char *);
long SSL_CTX_set_session_cache_mode(SSL_CTX *, long);
void SSL_CTX_set_verify(SSL_CTX *, int, void *);
int SSL_CTX_use_certificate(SSL_CTX *, X509 *);
int SSL_CTX_use_PrivateKey(SSL_CTX *, EVP_PKEY *);
int SSL_CTX_add1_chain_cert(SSL_CTX *, X509 *);
X509 *SSL_CTX_get0_certificate(const SSL_CTX *);
int SSL_CTX_load_verify_locations(SSL_CTX *, const char *, const char *);
X509_STORE *SSL_CTX_get_cert_store(const SSL_CTX *);
int SSL_set1_host(SSL *, const char *);
long SSL_set_tlsext_host_name(SSL *, char *);
const char *SSL_get_version(const SSL *);
const SSL_CIPHER *SSL_get_current_cipher(const SSL *);
const SSL_CIPHER *SSL_get_pending_cipher(const SSL *);
const char *SSL_CIPHER_get_name(const SSL_CIPHER *);
const char *SSL_CIPHER_get_version(const SSL_CIPHER *);
int SSL_CIPHER_get_bits(const SSL_CIPHER *, int *);
X509 *SSL_get0_peer_certificate(const SSL *);
long SSL_get_verify_result(const SSL *);
int SSL_session_reused(const SSL *);
int SSL_is_server(const SSL *);
int SSL_export_keying_material(SSL *, unsigned char *, size_t, const char *,
                               size_t, const unsigned char *, size_t, int);
#define DTLS1_2_VERSION ...
#define SSL_OP_NO_RENEGOTIATION ...
#define SSL_OP_NO_COMPRESSION ...
#define SSL_OP_CIPHER_SERVER_PREFERENCE ...
#define SSL_OP_NO_QUERY_MTU ...
#define SSL_OP_NO_ENCRYPT_THEN_MAC ...
long SSL_CTX_set_max_cert_list(SSL_CTX *, long);
#define SSL_SESS_CACHE_OFF ...
#define SSL_VERIFY_NONE ...
#define SSL_VERIFY_PEER ...
#define SSL_VERIFY_FAIL_IF_NO_PEER_CERT ...
"""

PSK = """
typedef unsigned int (*SSL_psk_client_cb_func)(SSL *, const char *, char *, unsigned int,
                                               unsigned char *, unsigned int);
typedef unsigned int (*SSL_psk_server_cb_func)(SSL *, const char *, unsigned char *,
                                               unsigned int);
void SSL_CTX_set_psk_client_callback(SSL_CTX *, SSL_psk_client_cb_func);
void SSL_CTX_set_psk_server_callback(SSL_CTX *, SSL_psk_server_cb_func);
int SSL_CTX_use_psk_identity_hint(SSL_CTX *, const char *);
const char *SSL_get_psk_identity(const SSL *);
SSL_CTX *SSL_get_SSL_CTX(const SSL *);
int SSL_CTX_set_ex_data(SSL_CTX *, int, void *);
void *SSL_CTX_get_ex_data(const SSL_CTX *, int);
void SSL_CTX_set_security_level(SSL_CTX *, int);
int SSL_CTX_get_security_level(const SSL_CTX *);
void SSL_set_verify(SSL *, int, void *);
extern "Python" unsigned int pd_psk_client_cb(SSL *, const char *, char *, unsigned int,
                                              unsigned char *, unsigned int);
extern "Python" unsigned int pd_psk_server_cb(SSL *, const char *, unsigned char *,
                                              unsigned int);
"""

ALPN_KEYLOG = """
int SSL_CTX_set_alpn_protos(SSL_CTX *, const unsigned char *, unsigned int);
void SSL_get0_alpn_selected(const SSL *, const unsigned char **, unsigned int *);
void pd_ctx_alpn_select(SSL_CTX *, const unsigned char *, unsigned int);
typedef void (*SSL_CTX_keylog_cb_func)(const SSL *, const char *);
void SSL_CTX_set_keylog_callback(SSL_CTX *, SSL_CTX_keylog_cb_func);
extern "Python" void pd_keylog_cb(const SSL *, const char *);
"""

SRTP = """
typedef struct {
    const char *name;
    unsigned long id;
} SRTP_PROTECTION_PROFILE;
int SSL_CTX_set_tlsext_use_srtp(SSL_CTX *, const char *);
SRTP_PROTECTION_PROFILE *SSL_get_selected_srtp_profile(SSL *);
"""

ENGINE = """
#define PD_STATE_NEW ...
#define PD_STATE_HANDSHAKING ...
#define PD_STATE_ESTABLISHED ...
#define PD_STATE_PEER_CLOSED ...
#define PD_STATE_FAILED ...
#define PD_STATE_CLOSED ...
#define PD_STATE_EXPORTED ...
#define PD_ERR_SSL ...
#define PD_ERR_TOO_BIG ...
#define PD_ERR_OVERSIZE ...
#define PD_NEW_HELLO ...
#define PD_HVR_LEN ...
#define PD_HELLO_VALID ...
#define PD_MAX_PINS ...
typedef struct pd_conn {
    SSL *ssl;
    int state;
    int is_server;
    int ssl_error;
    int alert_received;
    int alert_sent;
    int pin_mismatch;
    int buffers_released;
    int require_srtp;
    int srtp_refused;
    int compact;
    unsigned int mtu;
    size_t max_plaintext;
    const char *data;
    size_t plain_count;
    size_t plain_bytes;
    unsigned long long plain_dropped;
    size_t out_len;
    void *verify_hook;
    int hook_refused;
    unsigned long long handshake_timeout_ns;
    int deadline_passed;
    unsigned int protected_seen;
    int keep_session;
    int keep_peer_cert;
    ...;
} pd_conn;
typedef struct { ...; } pd_cookie_keys;
void pd_cookie_keys_set(pd_cookie_keys *, const unsigned char *, size_t,
                        const unsigned char *, size_t);
int pd_cookie_hello(const pd_cookie_keys *, const unsigned char *, size_t, unsigned int,
                    const unsigned char *, size_t, unsigned char *);
void pd_ctx_enable_cookies(SSL_CTX *);
int pd_accept_hello(pd_conn *, const unsigned char *, size_t);
void pd_set_cookie_peer(pd_conn *, const pd_cookie_keys *, const unsigned char *, size_t,
                        unsigned int);
int pd_init(void);
pd_conn *pd_dead_conn(void);
pd_conn *pd_conn_new(SSL_CTX *, int, unsigned int, unsigned int, unsigned int);
void pd_conn_free(pd_conn *);
int pd_add_pin(pd_conn *, const EVP_MD *, const unsigned char *, unsigned int);
void pd_verify_peer(pd_conn *, int);
void pd_ctx_require_srtp(SSL_CTX *);
int pd_handshake(pd_conn *);
int pd_feed(pd_conn *, const unsigned char *, size_t);
long pd_pull(pd_conn *);
int pd_write(pd_conn *, const char *, size_t);
long pd_read(pd_conn *);
long pd_write_batch(pd_conn *, const char *, const size_t *, size_t, size_t *, size_t *);
long pd_feed_read(pd_conn *, const unsigned char *, const size_t *, size_t, char *, size_t,
                  size_t *, int *);
double pd_get_timeout(pd_conn *);
int pd_handle_timeout(pd_conn *);
void pd_shutdown(pd_conn *);
int pd_release_buffers(pd_conn *);
int pd_export(pd_conn *, unsigned char *, size_t, const char *, size_t,
              const unsigned char *, size_t, int);
const char *pd_version(pd_conn *);
const SSL_CIPHER *pd_cipher(pd_conn *);
const SRTP_PROTECTION_PROFILE *pd_srtp_profile(pd_conn *);
int pd_session_reused(pd_conn *);
const char *pd_psk_identity(pd_conn *);
unsigned int pd_alpn(pd_conn *, const unsigned char **);
int pd_peer_der(pd_conn *, const unsigned char **);
const unsigned char *pd_peer_sha256(pd_conn *);
int pd_compact(pd_conn *);
pd_conn *pd_conn_of(const SSL *);
void pd_expire(pd_conn *);
int pd_ctx_level_for_ciphers(SSL_CTX *);
extern "Python" int pd_verify_hook_cb(void *, const unsigned char *, int);
int pd_extms(pd_conn *);
int pd_ctx_enable_cid(SSL_CTX *);
int pd_set_cid(pd_conn *, const unsigned char *, size_t, unsigned int);
int pd_get_cid(pd_conn *, int, const unsigned char **);
int pd_cid_advanced(pd_conn *);
int pd_cid_failed(pd_conn *);
"""

SESSIONS = """
typedef ... SSL_SESSION;
typedef struct { ...; } pd_ticket_secret;
#define PD_TICKET_SECRET_MAX ...
int pd_ctx_fleet_tickets(SSL_CTX *, pd_ticket_secret *);
void pd_ticket_secret_set(pd_ticket_secret *, const unsigned char *, size_t, unsigned long long);
void pd_ticket_secret_clear(pd_ticket_secret *);
int pd_set_session(pd_conn *, const unsigned char *, size_t);
int pd_offer_session(pd_conn *, SSL_CTX *, SSL_SESSION *, int, const char *);
void SSL_SESSION_free(SSL_SESSION *);
#define PD_OFFER_OK ...
#define PD_OFFER_NOT_RESUMABLE ...
#define PD_OFFER_EXPIRED ...
#define PD_OFFER_PIN ...
#define PD_OFFER_CA ...
#define PD_OFFER_NO_CERT ...
#define PD_OFFER_CERT ...
#define PD_OFFER_REFUSED ...
#define PD_CHECK_NONE ...
#define PD_CHECK_PINS ...
#define PD_CHECK_CA ...
#define PD_CHECK_ANY ...
#define PD_CHECK_PSK ...
long pd_session_bytes(pd_conn *, unsigned char *, size_t);
const unsigned char *pd_session_id(SSL_SESSION *, unsigned int *);
long pd_session_to_der(SSL_SESSION *, unsigned char *, size_t);
SSL_SESSION *pd_session_from_der(const unsigned char *, size_t);
void pd_ctx_session_callbacks(SSL_CTX *, int, int);
"""

ASSOCIATION = """
#define PD_ASSOC_ERR_STATE ...
#define PD_ASSOC_ERR_PENDING ...
#define PD_ASSOC_ERR_SPACE ...
#define PD_ASSOC_ERR_CRYPTO ...
#define PD_ASSOC_ERR_FORMAT ...
#define PD_ASSOC_ERR_VERSION ...
#define PD_ASSOC_ERR_KEY ...
#define PD_ASSOC_ERR_AUTH ...
#define PD_ASSOC_ERR_SUITE ...
#define PD_ASSOC_ERR_NOMEM ...
long pd_export_association(pd_conn *, const unsigned char *, const unsigned char *,
                           const unsigned char *, unsigned long long, unsigned char *, size_t);
pd_conn *pd_import_association(SSL_CTX *, const unsigned char *, size_t, const unsigned char *,
                               const unsigned char *, size_t, unsigned int, unsigned int, int *);
extern "Python" int pd_new_session_py(SSL *, SSL_SESSION *);
extern "Python" SSL_SESSION *pd_get_session_py(SSL *, const unsigned char *, int, int *);
extern "Python" void pd_remove_session_py(SSL_CTX *, SSL_SESSION *);
long SSL_CTX_sess_set_cache_size(SSL_CTX *, long);
long SSL_CTX_set_timeout(SSL_CTX *, long);
long SSL_CTX_ctrl(SSL_CTX *, int, long, void *);
int SSL_CTX_set_session_id_context(SSL_CTX *, const unsigned char *, unsigned int);
int SSL_set_session_id_context(SSL *, const unsigned char *, unsigned int);
uint64_t SSL_set_options(SSL *, uint64_t);
#define SSL_SESS_CACHE_CLIENT ...
#define SSL_SESS_CACHE_SERVER ...
#define SSL_SESS_CACHE_NO_INTERNAL ...
#define SSL_OP_NO_TICKET ...
"""

# ---- batched datagram I/O (csrc/io.c): recvmmsg/sendmmsg, UDP GSO/GRO; used by the
# socket surfaces through pydtls_ossl/_batch_io.py. Kept apart from the OpenSSL blocks.
IO = """
#define PD_IO_ADDR_LEN ...
#define PD_IO_CHUNK ...
int pd_io_available(void);
int pd_io_recv(int, char *, int, int, int *, int *, unsigned char *, int, int *);
int pd_io_send(int, const char *, const int *, const unsigned char *, int, int, int *);
"""
IO_SOURCES = ("io.c",)
# ---- end of batched datagram I/O

# DtlsServer's memory budgets (csrc/memory.c): one engine's bytes, estimated.
MEMORY = """
#define PD_MEM_SSL_HANDSHAKE ...
#define PD_MEM_SSL_ESTABLISHED ...
#define PD_MEM_SSL_RELEASED ...
#define PD_MEM_CIPHER_CTX ...
size_t pd_memory(const pd_conn *);
"""

# DtlsServer's parked idle associations (csrc/lot.c): owned by the lot while parked.
LOT = """
#define PD_LOT_KEY_MAX ...
typedef struct pd_lot pd_lot;
pd_lot *pd_lot_new(SSL_CTX *, unsigned int, unsigned int);
void pd_lot_free(pd_lot *);
size_t pd_lot_put(pd_lot *, const unsigned char *, size_t, const unsigned char *, size_t, pd_conn *,
                  double);
pd_conn *pd_lot_take(pd_lot *, int, const unsigned char *, size_t, unsigned char *, size_t *, double *,
                     long long *);
int pd_lot_has(pd_lot *, const unsigned char *, size_t);
double pd_lot_oldest_seen(const pd_lot *);
pd_conn *pd_lot_take_oldest(pd_lot *, double, unsigned char *, size_t *, double *, long long *);
size_t pd_lot_count(const pd_lot *);
void pd_trim_heap(void);
"""

# DtlsServer's established peers by raw sockaddr for the batched surfaces (csrc/fast.c):
# a batch in, decrypted; every record queued for them, out in sendmmsg calls. Borrows conns.
FAST = """
#define PD_FAST_ADDR ...
#define PD_FAST_SLOW ...
#define PD_FAST_FULL ...
#define PD_FAST_NOT_ENGINE ...
#define PD_FAST_DONE ...
#define PD_FAST_UNTOUCHED ...
#define PD_FAST_ROOM ...
#define PD_FAST_FED ...
typedef struct pd_fast pd_fast;
pd_fast *pd_fast_new(void);
void pd_fast_free(pd_fast *);
int pd_fast_put(pd_fast *, const unsigned char *, pd_conn *);
void pd_fast_drop(pd_fast *, int);
size_t pd_fast_count(const pd_fast *);
int pd_fast_input(pd_fast *, const char *, const int *, const int *, const unsigned char *, int, int,
                  char *, size_t, size_t *, int *, int, int *);
int pd_fast_write(pd_fast *, int, const char *, size_t, size_t);
int pd_fast_take_dirty(pd_fast *, int *, int);
size_t pd_fast_waiting(const pd_fast *);
int pd_fast_send(pd_fast *, int, int *);
"""

HEADERS = ("openssl/ssl.h", "openssl/err.h", "openssl/evp.h", "openssl/x509.h",
           "openssl/x509v3.h", "openssl/pem.h", "openssl/bn.h", "openssl/rsa.h",
           "openssl/ec.h", "openssl/crypto.h", "openssl/srtp.h", "openssl/sha.h",
           "openssl/rand.h", "openssl/core_names.h", "openssl/params.h")


def _source() -> str:
    includes = "".join(f"#include <{h}>\n" for h in HEADERS)
    guard = (
        "#if OPENSSL_VERSION_NUMBER < 0x30000000L\n"
        '#error "pydtls_ossl needs OpenSSL 3.0 or newer"\n'
        "#endif\n"
    )
    sources = "".join((HERE / "csrc" / name).read_text()
                      for name in ("cookie.c", "engine.c", "records.c", "cid.c", "sessions.c", "association.c",
                                   "memory.c", "lot.c")  # after the structs they measure
                      + IO_SOURCES + ("fast.c",))  # fast.c: after io.c, whose sendmmsg helpers it uses
    # SHA256_Init & co. (deprecated in 3.0) keep precomputed HMAC states for cookies.
    return "#define OPENSSL_SUPPRESS_DEPRECATED\n" + includes + guard + sources + _gil_policy()


# cffi releases the GIL around every call. These are bounded and never block (their
# sockets are read and written with MSG_DONTWAIT), run once per record or per batch,
# and take no longer than the release itself; in a threaded server each release would
# also hand the GIL to a waiting thread, one context switch more per call. Everything
# else, the handshake above all, still runs without the GIL.
KEEP_GIL = ("pd_pull", "pd_read", "pd_write", "pd_write_batch", "pd_get_timeout", "pd_cookie_hello",
            "pd_io_recv", "pd_io_send", "pd_io_available", "pd_lot_has", "pd_lot_count",
            "pd_fast_input", "pd_fast_send", "pd_fast_write", "pd_fast_put", "pd_fast_drop",
            "pd_fast_count", "pd_fast_waiting", "pd_fast_take_dirty")


def _gil_policy() -> str:
    """C that makes cffi's call wrappers keep the GIL for the ``KEEP_GIL`` functions.

    Each wrapper, ``_cffi_f_<name>``, brackets its call with ``Py_BEGIN_ALLOW_THREADS``
    and ``Py_END_ALLOW_THREADS``; redefined here, they test the wrapper's own name,
    which the compiler folds to a constant. A cffi that stopped using these macros
    would release the GIL as before (tests/test_gil.py notices).
    """
    kept = " || ".join(f'strcmp(wrapper, "_cffi_f_{name}") == 0' for name in KEEP_GIL)
    return (
        "\n#include <string.h>\nstatic inline __attribute__((always_inline)) int pd_keeps_gil(const char *wrapper)\n"
        f"{{\n    return {kept};\n}}\n"
        "#undef Py_BEGIN_ALLOW_THREADS\n"
        "#define Py_BEGIN_ALLOW_THREADS \\\n"
        "    { PyThreadState *_save = pd_keeps_gil(__func__) ? NULL : PyEval_SaveThread();\n"
        "#undef Py_END_ALLOW_THREADS\n"
        "#define Py_END_ALLOW_THREADS if (_save != NULL) PyEval_RestoreThread(_save); }\n"
    )


def _sanitizers() -> list[str]:
    """Compiler and linker flags for ``PYDTLS_SANITIZE``: unset, empty or ``0`` for none;
    ``1`` for ``address,undefined``; or a list of GCC/Clang sanitizers as ``-fsanitize=``
    takes it. CPython is not built with them: preload the runtime to import the module
    (``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``)."""
    value = os.environ.get("PYDTLS_SANITIZE", "").strip().lower()
    if value in ("", "0", "no", "off", "false"):
        return []
    if value in ("1", "yes", "on", "true"):
        value = "address,undefined"
    if not all(name and name.replace("-", "").isalnum() for name in value.split(",")):
        raise ValueError(f"PYDTLS_SANITIZE={value!r}: expected 1 or names such as address,undefined")
    return [f"-fsanitize={value}", "-fno-omit-frame-pointer", "-g"]


SANITIZE = _sanitizers()
ffi = FFI()
ffi.cdef(CRYPTO + ERR + BIO + EVP + BN + ASN1 + X509 + PEM + SSL + PSK + ALPN_KEYLOG + SRTP + ENGINE + SESSIONS
         + ASSOCIATION + MEMORY + LOT + IO + FAST)
ffi.set_source(
    "pydtls_ossl._openssl",
    _source(),
    libraries=["ssl", "crypto"],
    extra_compile_args=["-O1" if SANITIZE else "-O2", "-Wall", "-Wno-unused-function"]
    + (["-Werror"] if os.environ.get("PYDTLS_WERROR") else []) + SANITIZE,
    extra_link_args=SANITIZE,
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
