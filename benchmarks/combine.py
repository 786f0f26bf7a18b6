"""One Markdown table from a SQLite run and a MariaDB run of the suite, side by side.

    python benchmarks/combine.py /tmp/bench/sqlite.json /tmp/bench/mysql.json

Each suite run measures Niki on one database and Mosquitto beside it; this puts
the key figures of both runs in one table (docs/PERFORMANCE.md), each Niki figure
with its ratio to the Mosquitto figure measured in the same run.  Cells are
medians, with min-max in brackets.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import report

# (scenario, metric key, label, format, higher is better)
ROWS: Sequence[Tuple[str, str, str, str, bool]] = (
    ("B1", "p50", "B1 latency p50, ms", ".2f", False),
    ("B1", "p99", "B1 latency p99, ms", ".2f", False),
    ("B1", "call_p50", "B1 the queueing call alone, p50, ms", ".2f", False),
    ("B2 c=100", "rate", "B2 100 clients, single-message API, msg/s", ",.0f", True),
    ("B2 c=100 batch", "rate", "B2 100 clients, `enqueue_many`, msg/s", ",.0f", True),
    ("B2 c=1000", "rate", "B2 1,000 clients, single-message API, msg/s", ",.0f", True),
    ("B2 c=1000 batch", "rate", "B2 1,000 clients, `enqueue_many`, msg/s", ",.0f", True),
    ("B3", "rate", "B3 catch-up, connect to last message, msg/s", ",.0f", True),
    ("B3", "enqueue_rate", "B3 queueing the backlog, msg/s", ",.0f", True),
    ("B4 c=3000", "handshakes_per_s", "B4 3,000 clients: handshakes/s", ",.0f", True),
    ("B4 c=3000", "kb_per_client", "B4 3,000 clients: RSS per client, KB", ".1f", False),
    ("B4 c=10000", "handshakes_per_s", "B4 10,000 clients: handshakes/s", ",.0f", True),
    ("B4 c=10000", "kb_per_client", "B4 10,000 clients: RSS per client, KB", ".1f", False),
    ("B4 c=10000", "last_message_ms", "B4 10,000 clients: message to the last one, ms", ".2f", False),
)


def cell(summary: Dict[str, Any], scenario: str, key: str, system: str, fmt: str) -> str:
    row = summary.get(scenario, {}).get(key)
    return report.fmt_cell(row.get(system) if row else None, fmt)


def ratio(summary: Dict[str, Any], scenario: str, key: str) -> Optional[float]:
    row = summary.get(scenario, {}).get(key)
    return row.get("ratio") if row else None


def table(sqlite: Dict[str, Any], mysql: Dict[str, Any]) -> List[str]:
    s, m = sqlite["summary"], mysql["summary"]
    lines = ["| Scenario | Niki, SQLite | Niki/Mosq | Niki, MariaDB | Niki/Mosq "
             "| Mosquitto (SQLite run / MariaDB run) |",
             "|---|---|---|---|---|---|"]
    for scenario, key, label, fmt, _higher in ROWS:
        if scenario not in s and scenario not in m:
            continue
        mosq = [cell(x, scenario.replace(" batch", ""), key, "mqtt", fmt) for x in (s, m)]
        ratios = [ratio(x, scenario, key) for x in (s, m)]
        lines.append(
            f"| {label} | {cell(s, scenario, key, 'niki', fmt)} | "
            f"{'' if ratios[0] is None else f'{ratios[0]:.2f}'} | {cell(m, scenario, key, 'niki', fmt)} | "
            f"{'' if ratios[1] is None else f'{ratios[1]:.2f}'} | {mosq[0]} / {mosq[1]} |")
    trips = mysql.get("round_trips")
    if trips:
        lines.append(f"| MariaDB commands per message, single-message API (relay-counted): "
                     f"queueing / delivering | | | {trips['enqueue_per_message']:.1f} / "
                     f"{trips['server_per_message']:.1f} | | |")
    batch = m.get("B2 c=100 batch", {}).get("db_round_trips_per_message")
    if batch and batch.get("niki"):
        lines.append("| MariaDB round trips per message, `enqueue_many`, 100 clients (global counters) "
                     f"| | | {report.fmt_cell(batch['niki'], '.2f')} | | |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sqlite_json")
    parser.add_argument("mysql_json")
    args = parser.parse_args(argv)
    with open(args.sqlite_json) as f:
        sqlite = json.load(f)
    with open(args.mysql_json) as f:
        mysql = json.load(f)
    for name, run in (("SQLite", sqlite), ("MariaDB", mysql)):
        machine = run["machine"]
        print(f"<!-- {name} run: commit {machine['git_commit'][:10]}, {machine['date']}, "
              f"{run['elapsed_s']:.0f} s: {machine['command']} -->")
    print("\n".join(table(sqlite, mysql)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
