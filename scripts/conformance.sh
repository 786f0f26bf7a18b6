#!/usr/bin/env bash
# Runs the black-box conformance kit (../shared/conformance) against a fresh Niki server.
# Usage: scripts/conformance.sh sqlite|mysql [blackbox.py arguments after "conformance"]
# MySQL uses NIKI_TEST_MYSQL_URL's server (default mysql://root@127.0.0.1:3306/...).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
kit="${NIKI_CONFORMANCE_KIT:-$top/../shared/conformance}"
kind="${1:-sqlite}"; shift || true
py="${PYTHON:-python3}"
[ -f "$kit/blackbox.py" ] || { echo "conformance kit not found at $kit" >&2; exit 2; }

tmp=$(mktemp -d)
port=$("$py" - <<'PY'
import socket
for _ in range(100):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p >= 65535:
        continue
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("0.0.0.0", p + 1)); u.close(); print(p); break
    except OSError:
        u.close()
PY
)
case "$kind" in
  sqlite) db="sqlite:///$tmp/conformance.sqlite3" ;;
  mysql)
    base="${NIKI_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/niki_test}"
    db="${base%/*}/niki_conformance_$$" ;;
  *) echo "usage: $0 sqlite|mysql" >&2; exit 2 ;;
esac
export NIKI_DB="$db" NIKI_PEERS="127.0.0.1:$((port + 1))"

"$py" -m messaging_server -p "$port" >"$tmp/server.log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  if [ "$kind" = mysql ]; then
    "$py" -c "import pymysql,sys,urllib.parse as u; p=u.urlsplit(sys.argv[1]); c=pymysql.connect(host=p.hostname, port=p.port or 3306, user=p.username or 'root', password=p.password or ''); c.cursor().execute('DROP DATABASE IF EXISTS \`%s\`' % p.path.strip('/'))" "$db" || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
for _ in $(seq 100); do
  grep -q "wake-ups, UDP" "$tmp/server.log" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$tmp/server.log" >&2; exit 1; }
  sleep 0.1
done
echo "conformance kit on $kind ($("$py" -c 'import sys; from messaging_server.storage import describe_url; print(describe_url(sys.argv[1]))' "$db")), port $port"
status=0
PYTHONPATH="$top${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$py" "$kit/blackbox.py" --host 127.0.0.1 --port "$port" \
  --enqueue-cmd "$py $kit/niki_driver.py" conformance "$@" | sed "s/^\([0-9]* passed, [0-9]* failed\)$/conformance ($kind): \1/" || status=$?
[ "$status" -eq 0 ] || { echo "server log tail:" >&2; tail -20 "$tmp/server.log" >&2; }
exit "$status"
