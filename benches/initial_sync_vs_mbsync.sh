#!/usr/bin/env bash
# Initial-sync benchmark: crm-mailsync vs mbsync (isync) on the same mailbox.
#
# Loads N generated messages (default 50,000) into one user's INBOX of the
# testservers Dovecot, then in the same run times
#   1. crm-mailsync's initial sync over IMAPS (fresh state dir, until the admin
#      API counts N activities), and
#   2. mbsync downloading the same INBOX over IMAPS into an empty Maildir
#      (`Sync Pull`, `Create Near`; FSync as BENCH_MBSYNC_FSYNC, default yes =
#      mbsync's default; crm-mailsync fsyncs once per committed batch).
# and prints both times and the ratio crm-mailsync / mbsync.
#
# Usage (from the project root, servers running):
#   source /tmp/crm-mailsync-testservers/env.sh
#   benches/initial_sync_vs_mbsync.sh            # N=50000, release build
#   BENCH_N=5000 BENCH_PROFILE=dev benches/initial_sync_vs_mbsync.sh
# Env: BENCH_N, BENCH_USER (default user00100; its mail is replaced!),
#      BENCH_PROFILE (release|dev), BENCH_BATCH (crm-mailsync batch_size, 500),
#      BENCH_MBSYNC_FSYNC (yes|no).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SCRIPTS="$ROOT/../shared/testservers"
N=${BENCH_N:-50000}
USER_=${BENCH_USER:-user00100}
PROFILE=${BENCH_PROFILE:-release}
BATCH=${BENCH_BATCH:-500}
FSYNC=${BENCH_MBSYNC_FSYNC:-yes}

: "${IMAPS_PORT:?source the testservers env.sh first (IMAPS_PORT unset)}"
: "${TESTSERVERS_CA_CERT:?source the testservers env.sh first}"

if ! command -v mbsync >/dev/null; then
  echo "installing isync (mbsync)..." >&2
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get install -y --no-install-recommends isync >/dev/null ||
    { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends isync >/dev/null; }
fi

if [ "$PROFILE" = release ]; then
  cargo build --release --quiet
  BIN="$ROOT/target/release/crm-mailsync"
else
  cargo build --quiet
  BIN="$ROOT/target/debug/crm-mailsync"
fi

WORK=$(mktemp -d /tmp/cms-bench.XXXXXX)
DAEMON_PID=
cleanup() {
  [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=/dev/null
source "$SCRIPTS/lib.sh"
echo "loading $N messages into $USER_/INBOX..." >&2
ts_doveadm expunge -u "$USER_" mailbox '*' all >/dev/null 2>&1 || true
"$SCRIPTS/bulk-load.sh" "$USER_" --generate "$N" --seed 1 >&2

now() { date +%s.%N; }

# --- crm-mailsync ------------------------------------------------------------
ADMIN_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TOKEN=bench-token-0123456789
cat >"$WORK/crm.toml" <<EOF
[daemon]
state_dir = "$WORK/state"
log_format = "json"
log_level = "warn"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"
token = "$TOKEN"

[[profiles]]
name = "bench"
type = "imap_smtp"
host = "${IMAP_HOST:-127.0.0.1}"
port = $IMAPS_PORT
tls = "implicit"
ca_file = "$TESTSERVERS_CA_CERT"
tls_server_name = "${TESTSERVERS_TLS_SERVER_NAME:-localhost}"
poll_interval = "60s"
batch_size = $BATCH

[[mailboxes]]
name = "bench"
profile = "bench"
email = "$USER_@example.test"
approval = "approved"
username = "$USER_"
password = "${TESTSERVERS_PASSWORD:-secret}"
EOF
total() {
  curl -s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$ADMIN_PORT/api/v1/activities?limit=1" |
    python3 -c 'import json,sys
try: print(json.load(sys.stdin)["total"])
except Exception: print(0)'
}
echo "crm-mailsync ($PROFILE build) initial sync..." >&2
t0=$(now)
"$BIN" run --config "$WORK/crm.toml" 2>"$WORK/crm.log" &
DAEMON_PID=$!
while :; do
  n=$(total)
  [ "$n" -ge "$N" ] && break
  kill -0 "$DAEMON_PID" 2>/dev/null || { echo "daemon died:" >&2; tail "$WORK/crm.log" >&2; exit 1; }
  sleep 0.2
done
t1=$(now)
kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" || true; DAEMON_PID=
CRM=$(python3 -c "print(round($t1-$t0,2))")

# --- mbsync ------------------------------------------------------------------
mkdir -p "$WORK/mbsync-mail"
cat >"$WORK/mbsyncrc" <<EOF
FSync $FSYNC

IMAPAccount bench
Host ${TESTSERVERS_TLS_SERVER_NAME:-localhost}
Port $IMAPS_PORT
User $USER_
Pass ${TESTSERVERS_PASSWORD:-secret}
SSLType IMAPS
CertificateFile $TESTSERVERS_CA_CERT

IMAPStore remote
Account bench

MaildirStore local
Path $WORK/mbsync-mail/
Inbox $WORK/mbsync-mail/INBOX

Channel bench
Far :remote:
Near :local:
Patterns INBOX
Sync Pull
Create Near
SyncState *
EOF
echo "mbsync initial sync (FSync $FSYNC)..." >&2
t0=$(now)
mbsync -q -c "$WORK/mbsyncrc" bench
t1=$(now)
MB=$(python3 -c "print(round($t1-$t0,2))")
GOT=$(find "$WORK/mbsync-mail/INBOX" -type f -path '*/cur/*' -o -type f -path '*/new/*' | wc -l)

echo "messages: $N (mbsync stored $GOT)"
echo "crm-mailsync initial sync ($PROFILE, batch $BATCH): ${CRM}s"
echo "mbsync (FSync $FSYNC): ${MB}s"
python3 -c "print(f'ratio crm-mailsync/mbsync: {$CRM/$MB:.2f}')"
