/*
 * tls_load: the applications' submission workload, one TLS connection per message.
 *
 * Each message is what a Django send_mail, a PHP mailer or a cron job does: connect,
 * EHLO, STARTTLS (RFC 3207) or implicit TLS from the first byte (RFC 8314 §3.3), EHLO,
 * AUTH PLAIN (RFC 4616), MAIL, RCPT, DATA with one message, QUIT.  SESSIONS threads do
 * this concurrently until COUNT messages were attempted or MAX_SECONDS passed.
 *
 *   tls_load -s SESSIONS -m COUNT -T MAX_SECONDS -l BODY_BYTES
 *            -e starttls|implicit|plain -V 1.2|1.3 [-r] -A CA_FILE [-n SERVER_NAME]
 *            -u USER -p PASSWORD [-b EVERY] [-f FROM] [-t TO] [-M HELO] [-o LAT_FILE]
 *            127.0.0.1:PORT
 *
 *   -r        resume TLS sessions (each thread offers the last ticket/session it got);
 *             off by default, as in most application mail libraries
 *   -A        verify the server certificate against this CA (always on with TLS)
 *   -n        expected server name (SNI + host name check); default: the target IP
 *   -b EVERY  every EVERY-th message authenticates with a wrong password and must get
 *             535; those are counted apart and not in the latency figures
 *
 * Latency is from connect() to the reply to the final "." (the acknowledgement the
 * application waits for); QUIT follows and is not timed.  Prints one JSON object:
 * msgs/s, p50/p90/p99/max, mean time in the TLS handshake and in AUTH, resumed sessions,
 * failures by stage and reply code, and this process's own CPU time.
 *
 * Bounded: at most COUNT messages, none started after MAX_SECONDS, every socket read and
 * write times out after 30 s.  Only loopback (127.0.0.0/8) targets are accepted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

enum mode { MODE_STARTTLS, MODE_IMPLICIT, MODE_PLAIN };

static const char *from = "a@example.com", *to = "b@example.net";
static const char *helo = "bench.example.com", *subject = "bench";
static const char *user, *password, *server_name, *ca_file;
static enum mode mode = MODE_STARTTLS;
static int tls_version = TLS1_3_VERSION, resume, bad_every;
static int sessions = 1, count = 1, bodylen = 10240;
static double max_seconds = 60;
static struct sockaddr_in addr;
static char target_ip[64];
static SSL_CTX *ctx;
static char *body, auth_ok[512], auth_bad[512];
static size_t body_size;

static double *lat;              /* per message latency in seconds; 0 = not a timed success */
static atomic_int next_idx, n_ok, n_err, n_bad_rejected, n_resumed, n_handshakes, n_auths;
static _Atomic long long tls_ns, auth_ns;
static double deadline;

/* failures by "stage:code" (code is the SMTP reply, or a word for transport errors) */
#define MAX_KINDS 64
static struct { char key[48]; int n; } kinds[MAX_KINDS];
static int n_kinds;
static pthread_mutex_t kinds_lock = PTHREAD_MUTEX_INITIALIZER;

static void count_failure(const char *stage, const char *what) {
    char key[48];
    snprintf(key, sizeof key, "%s:%s", stage, what);
    pthread_mutex_lock(&kinds_lock);
    int i;
    for (i = 0; i < n_kinds && strcmp(kinds[i].key, key) != 0; i++) {}
    if (i == n_kinds && n_kinds < MAX_KINDS) { strcpy(kinds[n_kinds].key, key); n_kinds++; }
    if (i < MAX_KINDS) kinds[i].n++;
    pthread_mutex_unlock(&kinds_lock);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct {
    int fd;
    SSL *ssl;
    char buf[8192];
    size_t len;
} conn_t;

/* one per thread: the session offered on the next connection when -r is given */
typedef struct { SSL_SESSION *session; } slot_t;
static int slot_index;

static int new_session(SSL *ssl, SSL_SESSION *session) {
    slot_t *slot = SSL_get_ex_data(ssl, slot_index);
    if (!slot) return 0;
    if (slot->session) SSL_SESSION_free(slot->session);
    slot->session = session;
    return 1;  /* we keep the reference */
}

static int send_all(conn_t *c, const char *p, size_t n) {
    while (n) {
        if (c->ssl) {
            int w = SSL_write(c->ssl, p, (int)n);
            if (w <= 0) return -1;
            p += w; n -= (size_t)w;
        } else {
            ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
            if (w < 0) { if (errno == EINTR) continue; return -1; }
            p += w; n -= (size_t)w;
        }
    }
    return 0;
}

/* Read one (possibly multi-line) reply; its code, or -1 on EOF, timeout or TLS error. */
static int read_reply(conn_t *c) {
    for (;;) {
        char *nl;
        while ((nl = memchr(c->buf, '\n', c->len)) != NULL) {
            size_t linelen = (size_t)(nl - c->buf) + 1;
            int code = -1, last = 0;
            if (linelen >= 4) { code = atoi(c->buf); last = (c->buf[3] != '-'); }
            memmove(c->buf, c->buf + linelen, c->len - linelen);
            c->len -= linelen;
            if (last) return code;
        }
        if (c->len == sizeof c->buf) return -1;  /* a reply line longer than 8 KB */
        int r;
        if (c->ssl) {
            r = SSL_read(c->ssl, c->buf + c->len, (int)(sizeof c->buf - c->len));
        } else {
            ssize_t got = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
            if (got < 0 && errno == EINTR) continue;
            r = (int)got;
        }
        if (r <= 0) return -1;
        c->len += (size_t)r;
    }
}

/* Send a command (or nothing) and check the reply's first digit; count a failure if not. */
static int step(conn_t *c, const char *stage, const char *line, int want) {
    if (line && send_all(c, line, strlen(line)) < 0) { count_failure(stage, "write"); return -1; }
    int code = read_reply(c);
    if (code < 0) { count_failure(stage, "eof"); return -1; }
    if (code / 100 != want / 100) {
        char what[16];
        snprintf(what, sizeof what, "%d", code);
        count_failure(stage, what);
        return -1;
    }
    return code;
}

static int start_tls(conn_t *c, slot_t *slot) {
    c->ssl = SSL_new(ctx);
    if (!c->ssl) { count_failure("tls", "ssl_new"); return -1; }
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_ex_data(c->ssl, slot_index, slot);
    if (server_name) {
        SSL_set_tlsext_host_name(c->ssl, server_name);
        SSL_set1_host(c->ssl, server_name);
    } else {
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), target_ip);
    }
    if (resume && slot->session) SSL_set_session(c->ssl, slot->session);
    double t0 = now();
    if (SSL_connect(c->ssl) != 1) {
        long v = SSL_get_verify_result(c->ssl);
        count_failure("tls", v != X509_V_OK ? "verify" : "handshake");
        ERR_clear_error();
        return -1;
    }
    atomic_fetch_add(&tls_ns, (long long)((now() - t0) * 1e9));
    atomic_fetch_add(&n_handshakes, 1);
    if (SSL_session_reused(c->ssl)) atomic_fetch_add(&n_resumed, 1);
    return 0;
}

/* 0: accepted (latency in *elapsed); 1: the wrong password was refused as it should be;
 * -1: a failure (already counted). */
static int one_message(int idx, slot_t *slot, double *elapsed) {
    conn_t c = { .fd = -1, .ssl = NULL, .len = 0 };
    char line[600], hdr[1024], date[64];
    int rc = -1, bad = bad_every > 0 && idx % bad_every == bad_every - 1;
    double t0 = now();
    c.fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c.fd < 0) { count_failure("connect", "socket"); return -1; }
    struct timeval tv = { .tv_sec = 30 };
    setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c.fd, (struct sockaddr *)&addr, sizeof addr) < 0) { count_failure("connect", "refused"); goto out; }
    if (mode == MODE_IMPLICIT && start_tls(&c, slot)) goto out;
    if (step(&c, "greeting", NULL, 220) < 0) goto out;
    snprintf(line, sizeof line, "EHLO %s\r\n", helo);
    if (step(&c, "ehlo", line, 250) < 0) goto out;
    if (mode == MODE_STARTTLS) {
        if (step(&c, "starttls", "STARTTLS\r\n", 220) < 0) goto out;
        if (c.len) { count_failure("starttls", "pipelined_plaintext"); goto out; }  /* RFC 3207 §5 */
        if (start_tls(&c, slot)) goto out;
        if (step(&c, "ehlo_tls", line, 250) < 0) goto out;
    }
    if (user) {
        double ta = now();
        snprintf(line, sizeof line, "AUTH PLAIN %s\r\n", bad ? auth_bad : auth_ok);
        if (bad) {
            int code = step(&c, "auth_bad", line, 535);
            if (code == 535) { rc = 1; step(&c, "quit", "QUIT\r\n", 221); }
            goto out;
        }
        if (step(&c, "auth", line, 235) < 0) goto out;
        atomic_fetch_add(&auth_ns, (long long)((now() - ta) * 1e9));
        atomic_fetch_add(&n_auths, 1);
    }
    snprintf(line, sizeof line, "MAIL FROM:<%s>\r\n", from);
    if (step(&c, "mail", line, 250) < 0) goto out;
    snprintf(line, sizeof line, "RCPT TO:<%s>\r\n", to);
    if (step(&c, "rcpt", line, 250) < 0) goto out;
    if (step(&c, "data", "DATA\r\n", 354) < 0) goto out;
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S +0000", &tm);
    int hl = snprintf(hdr, sizeof hdr,
        "From: <%s>\r\nTo: <%s>\r\nDate: %s\r\nMessage-Id: <%d.%d.%ld@%s>\r\nSubject: %s\r\n\r\n",
        from, to, date, idx, (int)getpid(), (long)t, helo, subject);
    if (send_all(&c, hdr, (size_t)hl) < 0 || send_all(&c, body, body_size) < 0) {
        count_failure("message", "write");
        goto out;
    }
    if (step(&c, "dot", ".\r\n", 250) < 0) goto out;
    *elapsed = now() - t0;
    rc = 0;
    step(&c, "quit", "QUIT\r\n", 221);  /* counted if it fails, but the message is in */
out:
    if (c.ssl) {
        SSL_shutdown(c.ssl);  /* send close_notify; do not wait for the server's */
        SSL_free(c.ssl);
    }
    close(c.fd);
    return rc;
}

static void *worker(void *arg) {
    (void)arg;
    slot_t slot = { NULL };
    for (;;) {
        int idx = atomic_fetch_add(&next_idx, 1);
        if (idx >= count || now() > deadline) break;
        double elapsed = 0;
        int rc = one_message(idx, &slot, &elapsed);
        if (rc == 0) { lat[idx] = elapsed; atomic_fetch_add(&n_ok, 1); }
        else if (rc == 1) atomic_fetch_add(&n_bad_rejected, 1);
        else atomic_fetch_add(&n_err, 1);
    }
    if (slot.session) SSL_SESSION_free(slot.session);
    return NULL;
}

static int dcmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(const double *v, int n, double p) {
    if (n == 0) return 0;
    int i = (int)(p / 100.0 * (n - 1) + 0.5);
    return v[i];
}

static void auth_plain(char *out, size_t outlen, const char *u, const char *p) {
    /* RFC 4616: authzid NUL authcid NUL passwd, base64 */
    unsigned char raw[300];
    size_t ul = strlen(u), pl = strlen(p);
    if (ul + pl + 2 > sizeof raw || (ul + pl + 2) * 4 / 3 + 4 > outlen) { fprintf(stderr, "credentials too long\n"); exit(2); }
    raw[0] = 0;
    memcpy(raw + 1, u, ul);
    raw[1 + ul] = 0;
    memcpy(raw + 2 + ul, p, pl);
    EVP_EncodeBlock((unsigned char *)out, raw, (int)(ul + pl + 2));
}

static int usage(void) {
    fprintf(stderr,
            "usage: tls_load -s SESSIONS -m COUNT [-T SECONDS] [-l BODY_BYTES] [-e starttls|implicit|plain]\n"
            "                [-V 1.2|1.3] [-r] -A CA_FILE [-n NAME] [-u USER -p PASS] [-b EVERY]\n"
            "                [-f FROM] [-t TO] [-M HELO] [-o LAT_FILE] 127.0.0.1:PORT\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *latfile = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "s:m:T:l:e:V:rA:n:u:p:b:f:t:M:S:o:")) != -1) {
        switch (opt) {
        case 's': sessions = atoi(optarg); break;
        case 'm': count = atoi(optarg); break;
        case 'T': max_seconds = atof(optarg); break;
        case 'l': bodylen = atoi(optarg); break;
        case 'e':
            if (!strcmp(optarg, "starttls")) mode = MODE_STARTTLS;
            else if (!strcmp(optarg, "implicit")) mode = MODE_IMPLICIT;
            else if (!strcmp(optarg, "plain")) mode = MODE_PLAIN;
            else return usage();
            break;
        case 'V':
            if (!strcmp(optarg, "1.2")) tls_version = TLS1_2_VERSION;
            else if (!strcmp(optarg, "1.3")) tls_version = TLS1_3_VERSION;
            else return usage();
            break;
        case 'r': resume = 1; break;
        case 'A': ca_file = optarg; break;
        case 'n': server_name = optarg; break;
        case 'u': user = optarg; break;
        case 'p': password = optarg; break;
        case 'b': bad_every = atoi(optarg); break;
        case 'f': from = optarg; break;
        case 't': to = optarg; break;
        case 'M': helo = optarg; break;
        case 'S': subject = optarg; break;
        case 'o': latfile = optarg; break;
        default: return usage();
        }
    }
    if (optind >= argc || sessions < 1 || count < 1 || bodylen < 0 || max_seconds <= 0) return usage();
    if (mode != MODE_PLAIN && !ca_file) { fprintf(stderr, "TLS needs -A CA_FILE (the server certificate is verified)\n"); return 2; }
    if (!user != !password) { fprintf(stderr, "-u and -p go together\n"); return 2; }
    int port;
    if (sscanf(argv[optind], "%63[^:]:%d", target_ip, &port) != 2) return usage();
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, target_ip, &addr.sin_addr) != 1 || (ntohl(addr.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "refusing non-loopback target %s\n", target_ip);
        return 2;
    }
    if (user) {
        auth_plain(auth_ok, sizeof auth_ok, user, password);
        char wrong[300];
        snprintf(wrong, sizeof wrong, "%s-wrong", password);
        auth_plain(auth_bad, sizeof auth_bad, user, wrong);
    }

    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, tls_version);
    SSL_CTX_set_max_proto_version(ctx, tls_version);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (ca_file && SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
        fprintf(stderr, "cannot load CA file %s\n", ca_file);
        return 2;
    }
    slot_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    if (resume) {
        /* keep sessions ourselves, one per thread (TLS 1.3 tickets arrive after the handshake) */
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(ctx, new_session);
    } else {
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    }

    /* body: 78 'X' + CRLF lines (like smtp-source), the last one shorter */
    body = malloc((size_t)bodylen + 8);
    size_t p = 0;
    while (p + 2 < (size_t)bodylen) {
        size_t n = (size_t)bodylen - p - 2;
        if (n > 78) n = 78;
        memset(body + p, 'X', n);
        p += n;
        body[p++] = '\r';
        body[p++] = '\n';
    }
    if (p == 0) { memcpy(body, "X\r\n", 3); p = 3; }
    body_size = p;

    lat = calloc((size_t)count, sizeof *lat);
    pthread_t *th = calloc((size_t)sessions, sizeof *th);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    double t_start = now();
    deadline = t_start + max_seconds;
    for (int i = 0; i < sessions; i++) pthread_create(&th[i], &attr, worker, NULL);
    for (int i = 0; i < sessions; i++) pthread_join(th[i], NULL);
    double wall = now() - t_start;

    int ok = atomic_load(&n_ok), err = atomic_load(&n_err);
    double *v = malloc(sizeof(double) * (size_t)(ok + 1));
    int k = 0;
    double sum = 0;
    for (int i = 0; i < count; i++) if (lat[i] > 0) { v[k++] = lat[i]; sum += lat[i]; }
    qsort(v, (size_t)k, sizeof *v, dcmp);
    if (latfile) {
        FILE *f = fopen(latfile, "w");
        if (f) { for (int i = 0; i < k; i++) fprintf(f, "%.6f\n", v[i]); fclose(f); }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    int hs = atomic_load(&n_handshakes);
    printf("{\"tool\":\"tls_load\",\"mode\":\"%s\",\"tls\":\"%s\",\"resume\":%s,\"sessions\":%d,\"requested\":%d,"
           "\"ok\":%d,\"errors\":%d,\"bad_auth_refused\":%d,\"body_bytes\":%d,\"wall_s\":%.4f,\"msgs_per_s\":%.2f,"
           "\"lat_mean_ms\":%.3f,\"lat_p50_ms\":%.3f,\"lat_p90_ms\":%.3f,\"lat_p99_ms\":%.3f,\"lat_max_ms\":%.3f,"
           "\"handshakes\":%d,\"resumed\":%d,\"tls_mean_ms\":%.3f,\"auth_mean_ms\":%.3f,"
           "\"client_cpu_s\":%.3f,\"failures\":{",
           mode == MODE_STARTTLS ? "starttls" : mode == MODE_IMPLICIT ? "implicit" : "plain",
           mode == MODE_PLAIN ? "none" : tls_version == TLS1_3_VERSION ? "1.3" : "1.2",
           resume ? "true" : "false", sessions, count, ok, err, atomic_load(&n_bad_rejected), bodylen, wall,
           ok / wall, k ? sum / k * 1e3 : 0, pct(v, k, 50) * 1e3, pct(v, k, 90) * 1e3, pct(v, k, 99) * 1e3,
           k ? v[k - 1] * 1e3 : 0, hs, atomic_load(&n_resumed), hs ? (double)atomic_load(&tls_ns) / hs / 1e6 : 0,
           atomic_load(&n_auths) ? (double)atomic_load(&auth_ns) / atomic_load(&n_auths) / 1e6 : 0, cpu);
    for (int i = 0; i < n_kinds; i++) printf("%s\"%s\":%d", i ? "," : "", kinds[i].key, kinds[i].n);
    printf("}}\n");
    SSL_CTX_free(ctx);
    return err ? 1 : 0;
}
