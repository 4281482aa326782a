#!/usr/bin/env bash
# tls_anchor.sh setup | start [inet|unix|all] | stop | status | pids inet|unix | qlen inet|unix | sink start [count|dump] | sink stop | sink count
#
# The anchor for the TLS submission workload (bench/tls_run.py): Postfix 3.7 as a
# submission server + OpenDKIM, relaying to Postfix's smtp-sink, all on loopback, all under
# $TLS_BENCH_TMP (default /tmp/relay-tls-bench). Built the way the shared harness
# (../shared/bench/anchor) builds its anchor, plus what submission needs:
#   - STARTTLS listeners (587-style) and smtpd_tls_wrappermode listeners (465-style), one
#     pair per certificate type (ECDSA P-256 and RSA-2048, the same files relay uses);
#   - SASL AUTH through Cyrus sasldb (auxprop), AUTH only after TLS, relaying only for
#     authenticated clients, senders of @example.com owned by the authenticated user;
#   - OpenDKIM as a milter, in the harness's two variants: inet (TCP socket, the reference)
#     and unix (UNIX socket).
# `setup` also makes what every target shares: the test CA and the two server
# certificates, the DKIM key (RSA-2048, selector s1, example.com) and the sasldb user.
# Processes are started and stopped by PID file (Postfix: its master.pid), never by name.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
T="${TLS_BENCH_TMP:-/tmp/relay-tls-bench}"
CERTS="$T/certs" KEYS="$T/keys" SINK_DIR="$T/sink"

# Loopback only; the ports are apart from the shared harness's (2525-2529, 8891).
SINK_PORT=2636
MILTER_PORT=8893
BENCH_USER=bench BENCH_PASSWORD=bench-password-1 SASL_REALM=bench.invalid

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

anchor_vars() {  # variant -> A_NAME A_DIR A_BASE (first port) A_MILTER A_DKIM_SOCKET A_UMASK
  case "$1" in
    inet) A_NAME=anchor; A_DIR="$T/anchor"; A_BASE=2650
          A_MILTER="inet:127.0.0.1:$MILTER_PORT"; A_DKIM_SOCKET="inet:$MILTER_PORT@127.0.0.1"; A_UMASK=007;;
    unix) A_NAME=anchor_unix; A_DIR="$T/anchor-unix"; A_BASE=2660
          A_MILTER="unix:$T/anchor-unix/odk/opendkim.sock"
          A_DKIM_SOCKET="local:$T/anchor-unix/odk/opendkim.sock"; A_UMASK=000;;
    *) echo "variant must be inet or unix" >&2; exit 2;;
  esac
  A_ETC="$A_DIR/etc"
}

wait_port() {
  local port=$1 t=${2:-20} i=0
  while (( i < t * 10 )); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1; i=$((i + 1))
  done
  echo "nothing listening on 127.0.0.1:$port after ${t}s" >&2
  return 1
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
kill_pidfile() {
  local f=$1 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

install_packages() {
  local need=() p
  for p in postfix opendkim opendkim-tools sasl2-bin libsasl2-modules libsasl2-modules-db openssl; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
  done
  ((${#need[@]})) || return 0
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

make_certs() {
  mkdir -p "$CERTS"
  [[ -s $CERTS/ca.crt && -s $CERTS/ecdsa.crt && -s $CERTS/rsa.crt ]] && return 0
  log "making the test CA and the ECDSA P-256 / RSA-2048 server certificates"
  local ext="$CERTS/server.ext"
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n%s\n%s\n' \
    'extendedKeyUsage=serverAuth' 'subjectAltName=DNS:bench.relay.test,IP:127.0.0.1' > "$ext"
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -subj "/CN=relay bench CA" -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" 2>/dev/null
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$CERTS/ecdsa.key" 2>/dev/null
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$CERTS/rsa.key" 2>/dev/null
  local kind
  for kind in ecdsa rsa; do
    openssl req -new -key "$CERTS/$kind.key" -subj "/CN=bench.relay.test" -out "$CERTS/$kind.csr"
    openssl x509 -req -in "$CERTS/$kind.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" -CAcreateserial \
      -days 825 -sha256 -extfile "$ext" -out "$CERTS/$kind.crt" 2>/dev/null
  done
  chmod 600 "$CERTS"/*.key
}

make_dkim_key() {
  mkdir -p "$KEYS"
  if [[ ! -s $KEYS/s1.private ]]; then
    log "generating the RSA-2048 DKIM key (selector s1, example.com)"
    opendkim-genkey -b 2048 -h sha256 -d example.com -s s1 -D "$KEYS"
  fi
  # OpenDKIM refuses keys others can read; relay runs as root and reads it all the same.
  chown -R opendkim:opendkim "$KEYS"; chmod 700 "$KEYS"; chmod 600 "$KEYS"/*
}

make_sasldb() {
  mkdir -p "$T/sasl"
  rm -f "$T/sasl/sasldb2"
  printf '%s' "$BENCH_PASSWORD" | saslpasswd2 -p -c -f "$T/sasl/sasldb2" -u "$SASL_REALM" "$BENCH_USER"
  chown postfix "$T/sasl/sasldb2"; chmod 600 "$T/sasl/sasldb2"
}

setup_variant() {
  anchor_vars "$1"
  mkdir -p "$A_DIR/odk" "$A_ETC/sasl" "$A_DIR/spool" "$A_DIR/data"
  chown opendkim "$A_DIR/odk"
  cat > "$A_DIR/opendkim.conf" <<CONF
# Sign-only, relaxed/relaxed, RSA-2048, one key (as the shared harness's anchor).
Syslog                  no
Mode                    s
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
Domain                  example.com
Selector                s1
KeyFile                 $KEYS/s1.private
Socket                  $A_DKIM_SOCKET
PidFile                 $A_DIR/odk/opendkim.pid
UserID                  opendkim
UMask                   $A_UMASK
InternalHosts           127.0.0.0/8
Nameservers             127.0.0.1
RequireSafeKeys         no
CONF
  cp /etc/postfix/postfix-files "$A_ETC/" 2>/dev/null || true
  cp -r /etc/postfix/postfix-files.d "$A_ETC/" 2>/dev/null || true
  cp /etc/postfix/dynamicmaps.cf "$A_ETC/" 2>/dev/null || true
  cp -r /etc/postfix/dynamicmaps.cf.d "$A_ETC/" 2>/dev/null || true
  cat > "$A_ETC/sasl/smtpd.conf" <<CONF
pwcheck_method: auxprop
auxprop_plugin: sasldb
mech_list: PLAIN LOGIN
sasldb_path: $T/sasl/sasldb2
CONF
  cat > "$A_ETC/main.cf" <<CONF
# Submission anchor: AUTH after TLS, DKIM through OpenDKIM, relay to smtp-sink.
compatibility_level = 3.6
config_directory = $A_ETC
queue_directory = $A_DIR/spool
data_directory = $A_DIR/data
meta_directory = $A_ETC
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = $T
maillog_file = $A_DIR/maillog

myhostname = ${A_NAME//_/-}.bench.invalid
mydomain = bench.invalid
myorigin = \$myhostname
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled
alias_maps =
alias_database =
biff = no
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
relayhost = [127.0.0.1]:$SINK_PORT
smtputf8_enable = no
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native

# Submission: only authenticated clients relay, only from their own domain (RFC 6409).
smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_chain_files = $CERTS/ecdsa.key, $CERTS/ecdsa.crt
smtpd_tls_session_cache_database = btree:\${data_directory}/smtpd_scache
smtpd_tls_loglevel = 0
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = $A_ETC/sasl
smtpd_sasl_local_domain = $SASL_REALM
smtpd_sasl_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_sender_login_maps = inline:{ @example.com=$BENCH_USER@$SASL_REALM }
smtpd_sender_restrictions = reject_sender_login_mismatch

smtpd_milters = $A_MILTER
non_smtpd_milters = \$smtpd_milters
milter_default_action = tempfail
milter_protocol = 6
CONF
  local e="$CERTS/ecdsa.key,$CERTS/ecdsa.crt" r="$CERTS/rsa.key,$CERTS/rsa.crt"
  cat > "$A_ETC/master.cf" <<CONF
# STARTTLS (587-style) and wrapper-mode (465-style) listeners, ECDSA and RSA certificates.
127.0.0.1:$((A_BASE + 0)) inet n - n - - smtpd -o smtpd_tls_chain_files=$e
127.0.0.1:$((A_BASE + 1)) inet n - n - - smtpd -o smtpd_tls_wrappermode=yes -o smtpd_tls_chain_files=$e
127.0.0.1:$((A_BASE + 2)) inet n - n - - smtpd -o smtpd_tls_chain_files=$r
127.0.0.1:$((A_BASE + 3)) inet n - n - - smtpd -o smtpd_tls_wrappermode=yes -o smtpd_tls_chain_files=$r
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
CONF
  pf set-permissions >/dev/null 2>&1 || true
  pf check
}

# postfix(1) reports errors only to syslog or a tty: run it under script(1).
pf() { script -qec "postfix -c $A_ETC $*" /dev/null; }
master_pid() { local f="$A_DIR/spool/pid/master.pid"; [[ -s $f ]] && awk '{print $1; exit}' "$f" || true; }
dkim_pidfile() { echo "$A_DIR/opendkim.run.pid"; }
pf_running() { pf status >/dev/null 2>&1; }

setup() {
  install_packages
  mkdir -p "$T" "$SINK_DIR"; chmod 755 "$T"
  make_certs
  make_dkim_key
  make_sasldb
  setup_variant inet
  setup_variant unix
  log "anchor configured under $T (certificates: $CERTS, DKIM key: $KEYS/s1.private)"
}

start_variant() {
  anchor_vars "$1"
  [[ -f $A_ETC/main.cf ]] || { echo "run $0 setup first" >&2; exit 1; }
  local pidfile; pidfile=$(dkim_pidfile)
  if ! { [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }; then
    if [[ $1 == inet ]]; then port_free "$MILTER_PORT" || { echo "port $MILTER_PORT busy" >&2; exit 1; }
    else rm -f "$A_DIR/odk/opendkim.sock"; fi
    nohup opendkim -f -x "$A_DIR/opendkim.conf" >"$A_DIR/opendkim.log" 2>&1 &
    echo $! > "$pidfile"
    if [[ $1 == inet ]]; then wait_port "$MILTER_PORT" 15
    else
      for _ in $(seq 100); do [[ -S $A_DIR/odk/opendkim.sock ]] && break; sleep 0.1; done
      [[ -S $A_DIR/odk/opendkim.sock ]] || { cat "$A_DIR/opendkim.log" >&2; exit 1; }
    fi
  fi
  if ! pf_running; then
    local p
    for p in 0 1 2 3; do port_free $((A_BASE + p)) || { echo "port $((A_BASE + p)) busy" >&2; exit 1; }; done
    pf start >/dev/null
    for p in 0 1 2 3; do wait_port $((A_BASE + p)) 20; done
  fi
  log "$A_NAME: postfix master $(master_pid), opendkim $(cat "$pidfile") on 127.0.0.1:$A_BASE-$((A_BASE + 3))"
}

stop_variant() {
  anchor_vars "$1"
  if [[ -f $A_ETC/main.cf ]] && pf_running; then
    local m; m=$(master_pid)
    pf stop >/dev/null || true
    for _ in $(seq 100); do [[ -n $m ]] && kill -0 "$m" 2>/dev/null || break; sleep 0.1; done
    postsuper -c "$A_ETC" -d ALL >/dev/null 2>&1 || true
  fi
  kill_pidfile "$(dkim_pidfile)"
}

sink() {
  local pidfile="$SINK_DIR/sink.pid"
  case "${1:-}" in
    start)
      mkdir -p "$SINK_DIR"; chown postfix "$SINK_DIR"
      if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "sink already running" >&2; exit 1; fi
      port_free "$SINK_PORT" || { echo "port $SINK_PORT busy" >&2; exit 1; }
      local extra=()
      if [[ ${2:-count} == dump ]]; then
        rm -rf "$SINK_DIR/dump"; mkdir -p "$SINK_DIR/dump"; chown postfix "$SINK_DIR/dump"
        extra=(-d "$SINK_DIR/dump/%H%M%S.")
      fi
      nohup smtp-sink -c -u postfix -m 1000 "${extra[@]}" "127.0.0.1:$SINK_PORT" 1024 \
        >"$SINK_DIR/count.out" 2>"$SINK_DIR/sink.err" &
      echo $! > "$pidfile"
      wait_port "$SINK_PORT" 10;;
    stop) kill_pidfile "$pidfile";;
    count) tail -c 200 "$SINK_DIR/count.out" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2;;
    pid) cat "$pidfile";;
    *) echo "usage: $0 sink start [count|dump] | stop | count | pid" >&2; exit 2;;
  esac
}

variants() { case "${1:-all}" in all) echo inet unix;; *) echo "$1";; esac; }

case "${1:-}" in
  setup) setup;;
  start) for v in $(variants "${2:-all}"); do start_variant "$v"; done;;
  stop) for v in inet unix; do stop_variant "$v"; done; sink stop; log "anchor and sink stopped";;
  status)
    for v in inet unix; do
      anchor_vars "$v"
      if [[ -f $A_ETC/main.cf ]] && pf_running; then echo "$A_NAME: postfix master $(master_pid)"; else echo "$A_NAME: postfix not running"; fi
    done;;
  pids) anchor_vars "$2"; echo "$(master_pid),$(cat "$(dkim_pidfile)")";;
  qlen) anchor_vars "$2"
        find "$A_DIR/spool/incoming" "$A_DIR/spool/active" "$A_DIR/spool/deferred" "$A_DIR/spool/hold" -type f 2>/dev/null | wc -l;;
  sink) shift; sink "$@";;
  *) echo "usage: $0 setup | start [inet|unix|all] | stop | status | pids inet|unix | qlen inet|unix | sink ..." >&2; exit 2;;
esac
