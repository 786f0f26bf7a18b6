"""Where a MariaDB catch-up pass spends its time: reading a backlog, and marking it delivered.

    python benchmarks/mariadb_mark_cost.py [--mysql-url mysql://root@127.0.0.1:3306/] [--messages 5000]

Creates a fresh database with Niki's schema, queues ``--messages`` for one client
with ``enqueue_many``, then delivers them the way the server does (batches of 500:
lock the client row, read the batch, mark it, commit), with a writer that does
nothing, and times the whole pass through ``Storage.deliver_pending``.  Then it
replays the same reads and marks as bare statements, to split the time between
the ``SELECT`` and the ``UPDATE`` + ``COMMIT``.  Prints figures; decides nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import List, Sequence
from urllib.parse import urlsplit

import pymysql

from messaging_server.storage import StoredMessage, open_storage

BATCH = 500


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mysql-url", default="mysql://root@127.0.0.1:3306/")
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    base = urlsplit(args.mysql_url)
    name = f"niki_markcost_{uuid.uuid4().hex[:8]}"
    storage = open_storage(base._replace(path=f"/{name}").geturl(), create=True)
    try:
        storage.create_schema()
        for label, replay in (("Storage.deliver_pending", False), ("bare statements", True)):
            client = storage.new_client()
            for start in range(0, args.messages, 1000):
                count = min(1000, args.messages - start)
                storage.enqueue_many([(client.client_id, f"m{start + i}") for i in range(count)], 0.0)
            if replay:
                select_s, update_s = replay_statements(base, name, client.client_id)
                print(f"{label}: SELECT {select_s * 1000:.1f} ms, UPDATE + COMMIT {update_s * 1000:.1f} ms")
            else:
                began = time.perf_counter()
                delivered = 0
                while True:
                    result = storage.deliver_pending(client.client_id, client.session, write_all, BATCH)
                    delivered += result.delivered
                    if not result.more:
                        break
                took = time.perf_counter() - began
                print(f"{label}: {delivered} messages in {took * 1000:.1f} ms "
                      f"({took / max(delivered, 1) * 1e6:.1f} us each)")
    finally:
        storage.close()
        con = pymysql.connect(host=base.hostname, port=base.port or 3306, user=base.username or "root",
                              password=base.password or "", autocommit=True)
        con.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        con.close()
    return 0


def write_all(messages: Sequence[StoredMessage]) -> int:
    return len(messages)


def replay_statements(base, database: str, client_id: int) -> tuple[float, float]:
    con = pymysql.connect(host=base.hostname, port=base.port or 3306, user=base.username or "root",
                          password=base.password or "", database=database, autocommit=False)
    cur = con.cursor()
    select_s = update_s = 0.0
    last = 0
    while True:
        t0 = time.perf_counter()
        cur.execute("SELECT id, body FROM messages WHERE client_id = %s AND status = 'pending' "
                    "AND id > %s ORDER BY id LIMIT %s", (client_id, last, BATCH))
        ids: List[int] = [row[0] for row in cur.fetchall()]
        t1 = time.perf_counter()
        select_s += t1 - t0
        if not ids:
            con.commit()
            break
        last = ids[-1]
        cur.execute("UPDATE messages SET status = 'delivered', delivered_at = NOW(6) WHERE client_id = %s "
                    f"AND status IN ('pending', 'expired') AND id IN ({', '.join(['%s'] * len(ids))})",
                    [client_id, *ids])
        con.commit()
        update_s += time.perf_counter() - t1
    con.close()
    return select_s, update_s


if __name__ == "__main__":
    sys.exit(main())
