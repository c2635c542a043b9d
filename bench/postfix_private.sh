#!/usr/bin/env bash
# A private Postfix instance for the acceptance benchmarks (own config and queue directories,
# smtpd on a high loopback port, no chroot), so mailplat and Postfix are measured side by side
# with the same load generator (smtp-source) on the same machine.
#
#   bench/postfix_private.sh start DIR PORT     (needs: apt-get install postfix; run as root)
#   bench/postfix_private.sh stop DIR
#
# Clients on 127.0.0.0/8 are trusted (mynetworks), as mailplat's smtp.trusted_networks trusts
# them on the submission port.  Mail for bench.test is delivered into DIR/mail (one maildir,
# like mailplat's MX filing into a sink mailbox); mail for any other domain is accepted and
# queued for relay but never sent (defer_transports = smtp), like mailplat's submission with
# the relay service stopped: both then measure acceptance up to the committed queue entry.
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:?directory}
case $cmd in
stop)
    [ -f "$dir/etc/main.cf" ] && postfix -c "$dir/etc" stop >/dev/null 2>&1 || true
    exit 0 ;;
start) port=${3:?port} ;;
*) echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
command -v postfix >/dev/null || { echo "postfix missing: apt-get install postfix" >&2; exit 1; }
mkdir -p "$dir/etc" "$dir/spool" "$dir/data" "$dir/mail"
chmod 755 "$(dirname "$dir")" "$dir"
chown postfix "$dir/data"; chown -R nobody "$dir/mail"
cp /etc/postfix/master.cf "$dir/etc/master.cf"
# No chroot (the private queue has no /etc copies); smtpd on our high loopback port.
sed -i -E 's/^([a-z][^ ]*[[:space:]]+[a-z]+[[:space:]]+[-yn][[:space:]]+[-yn][[:space:]]+)y([[:space:]])/\1n\2/' "$dir/etc/master.cf"
sed -i -E "s/^smtp([[:space:]]+inet)/127.0.0.1:$port\1/" "$dir/etc/master.cf"
cat >"$dir/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $dir/spool
data_directory = $dir/data
myhostname = postfix-bench.localhost
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = bench.test
virtual_mailbox_base = $dir/mail
virtual_mailbox_maps = static:sink/
virtual_uid_maps = static:$(id -u nobody)
virtual_gid_maps = static:$(id -g nobody)
defer_transports = smtp
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
smtpd_banner = \$myhostname ESMTP
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
master_service_disable =
CF
postfix -c "$dir/etc" check || { echo "postfix check failed" >&2; exit 1; }
postfix -c "$dir/etc" start >/dev/null 2>&1
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && exit 0
    sleep 0.1
done
echo "postfix did not listen on 127.0.0.1:$port" >&2
exit 1
