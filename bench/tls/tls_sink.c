/*
 * tls_sink: the cheapest server that speaks tls_load's dialogue, to show what the load
 * client can drive on this machine.  It pays the TLS handshake with the given certificate
 * (the same cost as any real server) and nothing else: AUTH is always accepted, the
 * message is read and thrown away.  One thread per connection.
 *
 *   tls_sink -c CERT -k KEY [-i] [-T MAX_SECONDS] 127.0.0.1:PORT
 *
 *   -i  implicit TLS from the first byte (RFC 8314 §3.3); default: STARTTLS (RFC 3207)
 *
 * Exits by itself after MAX_SECONDS (default 600) or on SIGTERM; loopback binds only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static SSL_CTX *ctx;
static int implicit_tls;

typedef struct {
    int fd;
    SSL *ssl;
    char buf[16384];
    size_t len;
} conn_t;

static int put(conn_t *c, const char *s) {
    size_t n = strlen(s);
    if (c->ssl) return SSL_write(c->ssl, s, (int)n) == (int)n ? 0 : -1;
    return send(c->fd, s, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

/* Next line (without CRLF) into out; -1 on EOF or error. */
static int get_line(conn_t *c, char *out, size_t outlen) {
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        if (nl) {
            size_t n = (size_t)(nl - c->buf) + 1, keep = n - 1;
            if (keep && c->buf[keep - 1] == '\r') keep--;
            if (keep >= outlen) keep = outlen - 1;
            memcpy(out, c->buf, keep);
            out[keep] = 0;
            memmove(c->buf, c->buf + n, c->len - n);
            c->len -= n;
            return 0;
        }
        if (c->len == sizeof c->buf) c->len = 0;  /* overlong line: drop it */
        int r;
        if (c->ssl) r = SSL_read(c->ssl, c->buf + c->len, (int)(sizeof c->buf - c->len));
        else r = (int)recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
        if (r <= 0) return -1;
        c->len += (size_t)r;
    }
}

static int handshake(conn_t *c) {
    c->ssl = SSL_new(ctx);
    SSL_set_fd(c->ssl, c->fd);
    if (SSL_accept(c->ssl) != 1) { ERR_clear_error(); return -1; }
    return 0;
}

static void *session(void *arg) {
    conn_t *c = arg;
    char line[1024];
    struct timeval tv = { .tv_sec = 30 };
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (implicit_tls && handshake(c)) goto out;
    if (put(c, "220 sink ESMTP\r\n")) goto out;
    while (get_line(c, line, sizeof line) == 0) {
        if (!strncasecmp(line, "EHLO", 4)) {
            put(c, c->ssl ? "250-sink\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"
                          : "250-sink\r\n250-STARTTLS\r\n250 8BITMIME\r\n");
        } else if (!strncasecmp(line, "STARTTLS", 8) && !c->ssl) {
            put(c, "220 go ahead\r\n");
            c->len = 0;
            if (handshake(c)) goto out;
        } else if (!strncasecmp(line, "AUTH", 4)) {
            put(c, "235 2.7.0 ok\r\n");
        } else if (!strncasecmp(line, "DATA", 4)) {
            put(c, "354 go ahead\r\n");
            while (get_line(c, line, sizeof line) == 0 && strcmp(line, ".") != 0) {}
            put(c, "250 2.0.0 ok\r\n");
        } else if (!strncasecmp(line, "QUIT", 4)) {
            put(c, "221 bye\r\n");
            break;
        } else {
            put(c, "250 ok\r\n");
        }
    }
out:
    if (c->ssl) { SSL_shutdown(c->ssl); SSL_free(c->ssl); }
    close(c->fd);
    free(c);
    return NULL;
}

static void on_alarm(int sig) { (void)sig; _exit(0); }

int main(int argc, char **argv) {
    const char *cert = NULL, *key = NULL;
    double max_seconds = 600;
    int opt;
    while ((opt = getopt(argc, argv, "c:k:iT:")) != -1) {
        switch (opt) {
        case 'c': cert = optarg; break;
        case 'k': key = optarg; break;
        case 'i': implicit_tls = 1; break;
        case 'T': max_seconds = atof(optarg); break;
        default: goto usage;
        }
    }
    char host[64];
    int port;
    struct sockaddr_in addr = { .sin_family = AF_INET };
    if (!cert || !key || optind >= argc || sscanf(argv[optind], "%63[^:]:%d", host, &port) != 2) goto usage;
    addr.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1 || (ntohl(addr.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "refusing non-loopback bind %s\n", host);
        return 2;
    }
    ctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 || SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        fprintf(stderr, "cannot load %s / %s\n", cert, key);
        return 2;
    }
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"tls_sink", 8);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    alarm((unsigned)max_seconds);
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 1024)) { perror("bind"); return 1; }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) continue;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = calloc(1, sizeof *c);
        c->fd = fd;
        pthread_t th;
        if (pthread_create(&th, &attr, session, c)) { close(fd); free(c); }
    }
usage:
    fprintf(stderr, "usage: tls_sink -c CERT -k KEY [-i] [-T SECONDS] 127.0.0.1:PORT\n");
    return 2;
}
