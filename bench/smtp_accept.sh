#!/usr/bin/env bash
# SMTP acceptance benchmark: Postfix's smtp-source against mailplat and, in the same run, against
# a private Postfix instance (bench/postfix_private.sh).  Prints messages/s for 1 KB, 10 KB and
# 100 KB messages at 10 and 50 sessions, for two paths:
#   MX          mailplat's MX port (25 role), mail for a hosted mailbox (sink@bench.test), vs
#               Postfix delivering the same mail into a maildir.
#   submission  mailplat's submission port (587 role) without AUTH from a trusted network
#               (smtp.trusted_networks = 127.0.0.0/8; the sender bench@bench.test is in a created
#               domain), mail for a remote domain (sink@relay.test) queued for relay, vs Postfix
#               accepting the same mail from mynetworks and queueing it for relay.  Neither side
#               delivers it: mailplat's relay service is not started (MAILPLAT_SERVICES below)
#               and Postfix defers its smtp transport, so both measure acceptance up to the
#               committed queue entry and neither spends the shared cores on delivery attempts.
# Every mailplat 250 follows the store commit; Postfix's follows its queue-file fsync.
#
# Usage: bench/smtp_accept.sh [messages-per-run]      (needs: apt-get install postfix)
# Each figure is the best of REPEAT (default 3) alternating runs.
# mailplat runs with smtp.processes = SMTP_PROCESSES (default 1, the config default); with 2 the
# submission port is served by two processes (Postfix runs an smtpd process per session).
# Env: SIZES="1024 10240 102400" SESSIONS="10 50" PATHS="mx submission" SKIP_POSTFIX=1
#      MAILPLAT_SERVICES="api smtpd" SPLIT=1 KEEP=1 (keep the work directory and processes)
#      PY=python with mailplat's dependencies (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
N=${1:-2000}
SIZES=${SIZES:-"1024 10240 102400"}
SESSIONS=${SESSIONS:-"10 50"}
PATHS=${PATHS:-"mx submission"}
SMTP_PROCESSES=${SMTP_PROCESSES:-1}
WORK=$(mktemp -d /tmp/smtp-bench.XXXXXX)
MP_DIR="$WORK/mailplat"
PF_DIR="$WORK/postfix"
PF_PORT=${PF_PORT:-25526}
command -v smtp-source >/dev/null || { echo "smtp-source missing: apt-get install postfix" >&2; exit 1; }

cleanup() {
    [ -n "${MP_PID:-}" ] && kill "$MP_PID" 2>/dev/null && wait "$MP_PID" 2>/dev/null || true
    [ -n "${MP2_PID:-}" ] && kill "$MP2_PID" 2>/dev/null && wait "$MP2_PID" 2>/dev/null || true
    bench/postfix_private.sh stop "$PF_DIR"
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
      --set smtp.max_connections_per_ip=1000 --set smtp.trusted_networks=127.0.0.0/8 --set mailaccess.quota_bytes=1000000000000 \
      --set smtp.processes="$SMTP_PROCESSES" | sed -n 's/^primary API key: \(key-[^ ]*\).*/\1/p')
# MAILPLAT_SERVICES="api smtpd" measures acceptance alone; SPLIT=1 runs api+smtpd in one
# process and mailaccess+hooks (mailaccess files inbound mail into mailboxes) in a second one,
# as separate systemd units would; the default is one `mailplat serve` with every service but
# the relay (submitted mail stays queued, see above).
SERVICES=${MAILPLAT_SERVICES:-api smtpd mailaccess hooks}
[ -n "${SPLIT:-}" ] && SERVICES="api smtpd"
# shellcheck disable=SC2086
"$PY" -m mailplat.cli serve --data-dir "$MP_DIR" $SERVICES >"$WORK/mailplat.log" 2>&1 &
MP_PID=$!
for _ in $(seq 1 300); do [ -s "$MP_DIR/ports.json" ] && break; sleep 0.1; done
port() { "$PY" -c "import json,sys; print(json.load(open('$MP_DIR/ports.json'))['$1'])"; }
MP_PORT=$(port smtp)
MP_SUB_PORT=$(port submission)
API="http://127.0.0.1:$(port api)"
if [ -n "${SPLIT:-}" ]; then
    rm -f "$MP_DIR/ports.json"
    "$PY" -m mailplat.cli serve --data-dir "$MP_DIR" mailaccess hooks >"$WORK/mailplat2.log" 2>&1 &
    MP2_PID=$!
    for _ in $(seq 1 300); do [ -s "$MP_DIR/ports.json" ] && break; sleep 0.1; done
fi
curl -sf -u "api:$KEY" "$API/v3/domains" -d name=bench.test >/dev/null
curl -sf -u "api:$KEY" "$API/v3/bench.test/mailboxes" -d mailbox=sink -d password=sink-pass-1 >/dev/null

# -- private Postfix (bench/postfix_private.sh: 127.0.0.0/8 trusted, bench.test -> maildir,
# other domains queued for relay and held) --------------------------------------------------
[ -z "${SKIP_POSTFIX:-}" ] && bench/postfix_private.sh start "$PF_DIR" "$PF_PORT"

# path -> smtp-source envelope: the MX path mails a hosted mailbox from a foreign sender; the
# submission path mails a remote domain from a sender in our domain.
envelope() { [ "$1" = mx ] && echo "bench@sender.test sink@bench.test" || echo "bench@bench.test sink@relay.test"; }

run() {  # port size sessions from to -> msgs/s
    local port=$1 size=$2 sess=$3 from=$4 to=$5 start end
    start=$(date +%s.%N)
    if ! smtp-source -s "$sess" -m "$N" -l "$size" -f "$from" -t "$to" \
        "127.0.0.1:$port" >/dev/null 2>"$WORK/smtp-source.err"; then
        echo "FAILED($(head -c 60 "$WORK/smtp-source.err" | tr '\n' ' '))"
        return
    fi
    end=$(date +%s.%N)
    "$PY" -c "print(f'{$N / ($end - $start):.0f}')"
}

# Warm-up (file system caches, first connections).
for path in $PATHS; do
    # shellcheck disable=SC2046
    set -- $(envelope "$path")
    mp_port=$MP_PORT; [ "$path" = submission ] && mp_port=$MP_SUB_PORT
    smtp-source -s 10 -m 200 -l 1024 -f "$1" -t "$2" "127.0.0.1:$mp_port" >/dev/null
    [ -z "${SKIP_POSTFIX:-}" ] && smtp-source -s 10 -m 200 -l 1024 -f "$1" -t "$2" "127.0.0.1:$PF_PORT" >/dev/null
done

best() { "$PY" -c "import sys; v=[int(x) for x in sys.argv[1:] if x.isdigit()]; print(max(v) if len(v) == len(sys.argv[1:]) else 'FAILED')" "$@"; }

# Each cell is the best of REPEAT runs, mailplat and Postfix alternating, so that load from
# other processes on the machine hits both alike.
REPEAT=${REPEAT:-3}
echo "load before: $(uptime); mailplat smtp.processes=$SMTP_PROCESSES"
printf "%-11s %-8s %-9s %14s %14s %8s\n" path size sessions "mailplat msg/s" "postfix msg/s" ratio
for path in $PATHS; do
    # shellcheck disable=SC2046
    set -- $(envelope "$path")
    from=$1; to=$2
    mp_port=$MP_PORT; [ "$path" = submission ] && mp_port=$MP_SUB_PORT
    for size in $SIZES; do
        for sess in $SESSIONS; do
            mps=(); pfs=()
            for _ in $(seq 1 "$REPEAT"); do
                mps+=("$(run "$mp_port" "$size" "$sess" "$from" "$to")")
                [ -z "${SKIP_POSTFIX:-}" ] && pfs+=("$(run "$PF_PORT" "$size" "$sess" "$from" "$to")")
            done
            mp=$(best "${mps[@]}")
            pf=-; ratio=-
            if [ -z "${SKIP_POSTFIX:-}" ]; then
                pf=$(best "${pfs[@]}")
                ratio=$("$PY" -c "print(f'{$mp / $pf:.2f}x')" 2>/dev/null || echo -)
            fi
            printf "%-11s %-8s %-9s %14s %14s %8s   (runs: %s | %s)\n" "$path" "$size" "$sess" "$mp" "$pf" \
                "$ratio" "${mps[*]}" "${pfs[*]:-}"
        done
    done
done
echo "load after: $(uptime)"
per_path=$((200 + N * REPEAT * $(echo $SIZES | wc -w) * $(echo $SESSIONS | wc -w)))
counts=$("$PY" - <<PYEOF
import sqlite3
db = sqlite3.connect("$MP_DIR/mailplat.db")
n = db.execute("select count(*) from inbound_job").fetchone()[0]
done = db.execute("select count(*) from inbound_job where state = 'done'").fetchone()[0]
full = db.execute("select count(*) from inbound_job where last_error = 'mailbox full'").fetchone()[0]
queued = db.execute("select count(*) from queue_item where state = 'queued'").fetchone()[0]
print(f"inbound jobs {n} ({done} already filed into the mailbox, {full} waiting for quota);"
      f" submitted messages queued for relay {queued}")
PYEOF
)
echo "mailplat committed: $counts (expected $per_path for each path run: $PATHS)"
if [ -z "${SKIP_POSTFIX:-}" ]; then
    echo "postfix maildir files so far: $(find "$PF_DIR/mail" -type f | wc -l);" \
         "queued for relay: $(find "$PF_DIR/spool/incoming" "$PF_DIR/spool/active" "$PF_DIR/spool/deferred" -type f | wc -l)"
fi
