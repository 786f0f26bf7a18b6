#!/usr/bin/env bash
# Runs the black-box conformance kit (../shared/conformance) against a fresh Niki server.
# Usage: scripts/conformance.sh sqlite|mysql|url [blackbox.py arguments after "conformance"]
# MySQL uses NIKI_TEST_MYSQL_URL's server (default mysql://root@127.0.0.1:3306/...);
# url uses the database at NIKI_CONFORMANCE_DB (e.g. a Galera cluster's multi-host URL),
# which the caller creates and drops.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
kit="${NIKI_CONFORMANCE_KIT:-$top/../shared/conformance}"
kind="${1:-sqlite}"; shift || true
py="${PYTHON:-python3}"
[ -f "$kit/blackbox.py" ] || { echo "conformance kit not found at $kit" >&2; exit 2; }

tmp=$(mktemp -d)
case "$kind" in
  sqlite) db="sqlite:///$tmp/conformance.sqlite3" ;;
  mysql)
    base="${NIKI_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/niki_test}"
    db="${base%/*}/niki_conformance_$$" ;;
  url) db="${NIKI_CONFORMANCE_DB:?NIKI_CONFORMANCE_DB must name the database}" ;;
  *) echo "usage: $0 sqlite|mysql|url" >&2; exit 2 ;;
esac
# The server runs with its default --workers: worker i listens for wake-ups on port + 1 + i,
# and broadcast mode (NIKI_PEERS) must name every one of them.
workers=$("$py" -c 'import sys; from messaging_server.config.settings import default_workers; print(default_workers(sys.argv[1]))' "$db")
port=$("$py" - "$workers" <<'PY'
import socket, sys
workers = int(sys.argv[1])
for _ in range(100):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p + workers >= 65536:
        continue
    taken = []
    try:
        for i in range(workers):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            taken.append(u)
            u.bind(("0.0.0.0", p + 1 + i))
    except OSError:
        continue
    finally:
        for u in taken:
            u.close()
    print(p); break
PY
)
peers=$(seq -s, -f "127.0.0.1:%g" $((port + 1)) $((port + workers)))
export NIKI_DB="$db" NIKI_PEERS="$peers"

"$py" -m messaging_server -p "$port" --http-port 0 >"$tmp/server.log" 2>&1 &
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
  [ "$(grep -c "wake-ups, UDP" "$tmp/server.log" 2>/dev/null)" -ge "$workers" ] && break  # each worker
  kill -0 "$server" 2>/dev/null || { cat "$tmp/server.log" >&2; exit 1; }
  sleep 0.1
done
echo "conformance kit on $kind ($("$py" -c 'import sys; from messaging_server.storage import describe_url; print(describe_url(sys.argv[1]))' "$db")), port $port, $workers worker(s)"
status=0
PYTHONPATH="$top${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$py" "$kit/blackbox.py" --host 127.0.0.1 --port "$port" \
  --enqueue-cmd "$py $kit/niki_driver.py" conformance "$@" | sed "s/^\([0-9]* passed, [0-9]* failed\)$/conformance ($kind): \1/" || status=$?
[ "$status" -eq 0 ] || { echo "server log tail:" >&2; tail -20 "$tmp/server.log" >&2; }
exit "$status"
