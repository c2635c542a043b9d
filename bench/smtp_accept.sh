#!/usr/bin/env bash
# SMTP acceptance benchmark: Postfix's smtp-source against mailplat's MX and, in the same run,
# against a private Postfix instance (own config and queue directories, high port, delivering
# to a maildir).  Prints messages/s for 1 KB, 10 KB and 100 KB messages at 10 and 50 sessions.
# Every mailplat 250 follows the store commit; Postfix's follows its queue-file fsync.
#
# Usage: bench/smtp_accept.sh [messages-per-run]      (needs: apt-get install postfix)
# Each figure is the best of REPEAT (default 3) alternating runs.
# Env: SIZES="1024 10240 102400" SESSIONS="10 50" SKIP_POSTFIX=1 MAILPLAT_SERVICES="api smtpd"
#      SPLIT=1 KEEP=1 (keep the work directory and processes for inspection)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
N=${1:-2000}
SIZES=${SIZES:-"1024 10240 102400"}
SESSIONS=${SESSIONS:-"10 50"}
WORK=$(mktemp -d /tmp/smtp-bench.XXXXXX)
MP_DIR="$WORK/mailplat"
PF_DIR="$WORK/postfix"
PF_PORT=${PF_PORT:-25526}
command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }

cleanup() {
    [ -n "${MP_PID:-}" ] && kill "$MP_PID" 2>/dev/null && wait "$MP_PID" 2>/dev/null || true
    [ -n "${MP2_PID:-}" ] && kill "$MP2_PID" 2>/dev/null && wait "$MP2_PID" 2>/dev/null || true
    [ -f "$PF_DIR/etc/main.cf" ] && postfix -c "$PF_DIR/etc" stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT

# -- mailplat ---------------------------------------------------------------------------------
# The sink mailbox's quota is lifted: with the default 1 GiB the 100 KB runs would fill it and
# the rest of the mail would wait for quota instead of being filed (less work than Postfix does).
KEY=$("$PY" -m mailplat.cli init --data-dir "$MP_DIR" --hostname bench.localhost \
      --api-port 0 --smtp-port 0 --submission-port 0 --submissions-port 0 --imap-port 0 \
      --imaps-port 0 --pop3-port 0 --pop3s-port 0 --set log.level=WARNING \
      --set smtp.max_connections_per_ip=1000 --set mailaccess.quota_bytes=1000000000000 | sed -n 's/^primary API key: \(key-[^ ]*\).*/\1/p')
# MAILPLAT_SERVICES="api smtpd" measures acceptance alone; SPLIT=1 runs api+smtpd in one
# process and the rest (mailaccess files inbound mail into mailboxes) in a second one, as
# separate systemd units would; the default is one `mailplat serve` with every service.
SERVICES=${MAILPLAT_SERVICES:-}
[ -n "${SPLIT:-}" ] && SERVICES="api smtpd"
# shellcheck disable=SC2086
"$PY" -m mailplat.cli serve --data-dir "$MP_DIR" $SERVICES >"$WORK/mailplat.log" 2>&1 &
MP_PID=$!
for _ in $(seq 1 300); do [ -s "$MP_DIR/ports.json" ] && break; sleep 0.1; done
port() { "$PY" -c "import json,sys; print(json.load(open('$MP_DIR/ports.json'))['$1'])"; }
MP_PORT=$(port smtp)
API="http://127.0.0.1:$(port api)"
if [ -n "${SPLIT:-}" ]; then
    rm -f "$MP_DIR/ports.json"
    "$PY" -m mailplat.cli serve --data-dir "$MP_DIR" relay mailaccess hooks >"$WORK/mailplat2.log" 2>&1 &
    MP2_PID=$!
    for _ in $(seq 1 300); do [ -s "$MP_DIR/ports.json" ] && break; sleep 0.1; done
fi
curl -sf -u "api:$KEY" "$API/v3/domains" -d name=bench.test >/dev/null
curl -sf -u "api:$KEY" "$API/v3/bench.test/mailboxes" -d mailbox=sink -d password=sink-pass-1 >/dev/null

# -- private Postfix ----------------------------------------------------------------------------
if [ -z "${SKIP_POSTFIX:-}" ]; then
    mkdir -p "$PF_DIR/etc" "$PF_DIR/spool" "$PF_DIR/data" "$PF_DIR/mail"
    chmod 755 "$WORK" "$PF_DIR"
    chown postfix "$PF_DIR/data"; chown -R nobody "$PF_DIR/mail"
    cp /etc/postfix/master.cf "$PF_DIR/etc/master.cf"
    # No chroot (the private queue has no /etc copies); smtpd on our high loopback port.
    sed -i -E 's/^([a-z][^ ]*[[:space:]]+[a-z]+[[:space:]]+[-yn][[:space:]]+[-yn][[:space:]]+)y([[:space:]])/\1n\2/' "$PF_DIR/etc/master.cf"
    sed -i -E "s/^smtp([[:space:]]+inet)/127.0.0.1:$PF_PORT\1/" "$PF_DIR/etc/master.cf"
    cat >"$PF_DIR/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $PF_DIR/spool
data_directory = $PF_DIR/data
myhostname = postfix-bench.localhost
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = bench.test
virtual_mailbox_base = $PF_DIR/mail
virtual_mailbox_maps = static:sink/
virtual_uid_maps = static:$(id -u nobody)
virtual_gid_maps = static:$(id -g nobody)
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
smtpd_banner = \$myhostname ESMTP
maillog_file = $PF_DIR/maillog
maillog_file_prefixes = $PF_DIR
master_service_disable =
CF
    postfix -c "$PF_DIR/etc" check || { echo "postfix check failed" >&2; exit 1; }
    postfix -c "$PF_DIR/etc" start >/dev/null 2>&1
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PF_PORT) 2>/dev/null && break; sleep 0.1; done
fi

run() {  # target port size sessions -> msgs/s
    local port=$1 size=$2 sess=$3 start end
    start=$(date +%s.%N)
    if ! smtp-source -s "$sess" -m "$N" -l "$size" -f bench@sender.test -t sink@bench.test \
        "127.0.0.1:$port" >/dev/null 2>"$WORK/smtp-source.err"; then
        echo "FAILED($(head -c 60 "$WORK/smtp-source.err" | tr '\n' ' '))"
        return
    fi
    end=$(date +%s.%N)
    "$PY" -c "print(f'{$N / ($end - $start):.0f}')"
}

# Warm-up (file system caches, first connections).
smtp-source -s 10 -m 200 -l 1024 -f bench@sender.test -t sink@bench.test "127.0.0.1:$MP_PORT" >/dev/null
[ -z "${SKIP_POSTFIX:-}" ] && smtp-source -s 10 -m 200 -l 1024 -f bench@sender.test -t sink@bench.test "127.0.0.1:$PF_PORT" >/dev/null

best() { "$PY" -c "import sys; v=[int(x) for x in sys.argv[1:] if x.isdigit()]; print(max(v) if len(v) == len(sys.argv[1:]) else 'FAILED')" "$@"; }

# Each cell is the best of REPEAT runs, mailplat and Postfix alternating, so that load from
# other processes on the machine hits both alike.
REPEAT=${REPEAT:-3}
printf "%-8s %-9s %14s %14s %8s\n" size sessions "mailplat msg/s" "postfix msg/s" ratio
for size in $SIZES; do
    for sess in $SESSIONS; do
        mps=(); pfs=()
        for _ in $(seq 1 "$REPEAT"); do
            mps+=("$(run "$MP_PORT" "$size" "$sess")")
            [ -z "${SKIP_POSTFIX:-}" ] && pfs+=("$(run "$PF_PORT" "$size" "$sess")")
        done
        mp=$(best "${mps[@]}")
        pf=-; ratio=-
        if [ -z "${SKIP_POSTFIX:-}" ]; then
            pf=$(best "${pfs[@]}")
            ratio=$("$PY" -c "print(f'{$mp / $pf:.2f}x')" 2>/dev/null || echo -)
        fi
        printf "%-8s %-9s %14s %14s %8s   (runs: %s | %s)\n" "$size" "$sess" "$mp" "$pf" "$ratio" \
            "${mps[*]}" "${pfs[*]:-}"
    done
done
jobs=$("$PY" - <<PYEOF
import sqlite3
db = sqlite3.connect("$MP_DIR/mailplat.db")
n = db.execute("select count(*) from inbound_job").fetchone()[0]
done = db.execute("select count(*) from inbound_job where state = 'done'").fetchone()[0]
full = db.execute("select count(*) from inbound_job where last_error = 'mailbox full'").fetchone()[0]
print(f"{n} ({done} already filed into the mailbox, {full} waiting for quota)")
PYEOF
)
echo "mailplat committed inbound jobs: $jobs (expected $((200 + N * REPEAT * $(echo $SIZES | wc -w) * $(echo $SESSIONS | wc -w))))"
if [ -z "${SKIP_POSTFIX:-}" ]; then
    echo "postfix maildir files so far: $(find "$PF_DIR/mail" -type f | wc -l)"
fi
