"""Niki against Mosquitto (MQTT QoS 1, persistent sessions) on the B1-B4 scenarios.

    python benchmarks/suite.py --db sqlite|mysql [--runs 3] [--json out.json]
        [--plot out.png] [--scenarios B1,B2,B3,B4] [--quick]

Starts a fresh Niki server (fresh SQLite file, or a fresh MariaDB database that
is dropped afterwards) and a private Mosquitto on free ports, runs each scenario
``--runs`` times on both, and prints median (min-max) per system with the ratio
Niki/Mosquitto.  Prints figures only: the exit status is 1 when a message was
lost, duplicated or misordered or a process failed, never because of a time.
See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
for path in (BENCH_DIR, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

import report  # noqa: E402
from common import (  # noqa: E402
    BenchError,
    find_pid,
    free_port,
    raise_nofile,
    source_addresses,
    wait_quiet,
)

FULL = {"runs": 3, "b1": 200, "b2_clients": "100,1000", "b2_messages": 20000, "b3": 10000,
        "b4": 10000, "rt_messages": 2000}
QUICK = {"runs": 1, "b1": 50, "b2_clients": "20", "b2_messages": 1000, "b3": 1000, "b4": 1000,
         "rt_messages": 300}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=("sqlite", "mysql"), required=True)
    p.add_argument("--mysql-url", default="mysql://root@127.0.0.1:3306/",
                   help="MariaDB server for --db mysql (a database niki_bench_<random> is "
                        "created there and dropped)")
    p.add_argument("--runs", type=int, help="runs per scenario (default 3; 1 with --quick)")
    p.add_argument("--scenarios", default="B1,B2,B3,B4")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of everything")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--plot", help="write a PNG here (needs matplotlib)")
    p.add_argument("--b1-messages", type=int, help="B1 messages (default 200)")
    p.add_argument("--b2-clients", help="B2 client counts, comma-separated (default 100,1000)")
    p.add_argument("--b2-messages", type=int, help="B2 messages (default 20000)")
    p.add_argument("--batch-size", type=int, default=500,
                   help="B2 batch size for Enqueuer.enqueue_many, when the package has it")
    p.add_argument("--b3-messages", type=int, help="B3 backlog (default 10000)")
    p.add_argument("--b4-clients", help="B4 idle clients, comma-separated (default 10000; 1000 with "
                                        "--quick)")
    p.add_argument("--b4-runs", help="runs of B4 (default: --runs); comma-separated: one per "
                                     "--b4-clients value")
    p.add_argument("--b4-budget", type=float, default=120.0,
                   help="B4: start no handshake after this many seconds (default 120); B4 also "
                        "stops after 4 x --window handshakes failed in a row")
    p.add_argument("--rt-messages", type=int,
                   help="MariaDB commands-per-message run: messages (default 2000)")
    p.add_argument("--window", type=int, default=50, help="handshakes in flight at once (default 50)")
    p.add_argument("--timeout", type=float, default=10.0, help="per handshake and per B1 message")
    p.add_argument("--idle-timeout", type=float, default=15.0,
                   help="B2/B3: give up waiting after this long without a new message")
    p.add_argument("--mqtt-inflight", type=int, default=20,
                   help="Mosquitto max_inflight_messages (its default: 20)")
    p.add_argument("--publisher-inflight", type=int, default=1000,
                   help="paho publisher's unacknowledged QoS 1 messages (paho's default: 20)")
    p.add_argument("--quiet-threshold", type=float, default=30.0,
                   help="before each run, wait until other processes use less CPU than this "
                        "(%% of one core; default 30)")
    p.add_argument("--quiet-wait", type=float,
                   help="wait at most this long for that (seconds; default 30, 3 with --quick)")
    p.add_argument("--no-raw-mqtt", dest="raw_mqtt", action="store_false",
                   help="skip the cross-check of B2/B3 with raw MQTT clients instead of paho")
    p.add_argument("--niki-args", default="",
                   help="more options for the Niki server, e.g. '--workers 1' (default: none; its "
                   "memory, threads and CPU are summed over its worker processes)")
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, databases)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.runs = args.runs or sizes["runs"]
    if args.quiet_wait is None:
        args.quiet_wait = 3.0 if args.quick else 30.0
    args.b1_messages = args.b1_messages or sizes["b1"]
    args.b2_clients = [int(x) for x in (args.b2_clients or sizes["b2_clients"]).split(",") if x.strip()]
    args.b2_messages = args.b2_messages or sizes["b2_messages"]
    args.b3_messages = args.b3_messages or sizes["b3"]
    args.b4_clients = [int(x) for x in str(args.b4_clients or sizes["b4"]).split(",") if x.strip()]
    b4_runs = [int(x) for x in str(args.b4_runs or args.runs).split(",") if x.strip()]
    if len(b4_runs) not in (1, len(args.b4_clients)):
        p.error("--b4-runs: one value, or one per --b4-clients value")
    args.b4_runs = b4_runs * len(args.b4_clients) if len(b4_runs) == 1 else b4_runs
    args.rt_messages = args.rt_messages or sizes["rt_messages"]
    args.scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - {"B1", "B2", "B3", "B4"}
    if unknown:
        p.error(f"unknown scenarios: {sorted(unknown)}")
    return args


def missing_dependencies(args: argparse.Namespace) -> List[str]:
    """Say what to install instead of failing with a traceback halfway through."""
    missing = []
    try:
        import paho.mqtt  # noqa: F401
    except ImportError:
        missing.append("paho-mqtt")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            missing.append("matplotlib")
    return missing


def machine_info(args: argparse.Namespace, mysql_version: Optional[str]) -> Dict[str, Any]:
    def run(cmd: List[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import paho.mqtt

    mosquitto = run(["/usr/sbin/mosquitto", "-h"]).splitlines()
    return {
        "cores": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "database": args.db,
        "mariadb_version": mysql_version, "sqlite_version": sqlite3.sqlite_version,
        "git_commit": run(["git", "rev-parse", "HEAD"]),
        "git_dirty_messaging_server": bool(run(["git", "status", "--porcelain", "messaging_server"])),
        # identifies uncommitted server changes (another engineer's work in progress)
        "git_diff_messaging_server_sha1": hashlib.sha1(
            run(["git", "diff", "HEAD", "--", "messaging_server"]).encode()).hexdigest(),
        "mosquitto": mosquitto[0] if mosquitto else "", "paho_mqtt": paho.mqtt.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    missing = missing_dependencies(args)
    if missing:
        print(f"missing: {', '.join(missing)}. Install with: pip install paho-mqtt matplotlib",
              file=sys.stderr)
        return 2
    from mqtt_side import MqttRawSide, MqttSide, check_mqtt_installed, mqtt_reader_capacity
    from mysql_counts import MysqlServer
    from niki_side import NikiSide, niki_reader_capacity

    ok, why = check_mqtt_installed()
    if not ok:
        print(why, file=sys.stderr)
        return 2
    limits = raise_nofile()
    needed = max(args.b4_clients) + 200
    if "B4" in args.scenarios and limits[0] < needed:
        print(f"note: open-file limit {limits[0]} < {needed}: B4 will hit it", file=sys.stderr)

    def on_term(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmpdir = tempfile.mkdtemp(prefix="niki-bench-")
    nonce = secrets.token_hex(4)
    sources = source_addresses(50)
    mysql = MysqlServer.from_url(args.mysql_url) if args.db == "mysql" else None
    mysql_version = None
    if mysql is not None:
        with mysql.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            mysql_version = cur.fetchone()[0]
    db_pid = (find_pid("mariadbd") or find_pid("mysqld")) if mysql is not None else None
    niki = NikiSide(args.db, mysql, tmpdir, nonce, args.window, args.timeout, sources, args.idle_timeout,
                    args.b4_budget, args.niki_args.split())
    mqtt = MqttSide(tmpdir, nonce, args.window, args.timeout, sources, args.idle_timeout,
                    args.mqtt_inflight, args.publisher_inflight, args.b4_budget)
    raw = MqttRawSide(mqtt)
    sides = (niki, mqtt, raw) if args.raw_mqtt else (niki, mqtt)
    results: report.Results = {}
    notes: Dict[str, str] = {}
    problems: List[str] = []
    extra: Dict[str, Any] = {}
    info = machine_info(args, mysql_version)
    started = time.monotonic()
    interrupted = False
    print(f"suite: db={args.db} runs={args.runs} scenarios={','.join(args.scenarios)} "
          f"sizes: B1 {args.b1_messages} msgs, B2 {args.b2_clients} clients x {args.b2_messages} msgs, "
          f"B3 {args.b3_messages} msgs, B4 {args.b4_clients} clients; open-file limit {limits[0]}; "
          f"temp {tmpdir}", flush=True)
    try:
        niki.start(max(*args.b4_clients, *args.b2_clients) + 500, db_pid)
        mqtt.start(free_port())
        print(f"Niki server pid {niki.pid} port {niki.port} ({niki.db_url}); "
              f"Mosquitto pid {mqtt.pid} port {mqtt.port}", flush=True)
        capacity = {"niki": niki_reader_capacity(), "mqtt": mqtt_reader_capacity("paho"),
                    "mqttraw": mqtt_reader_capacity("raw")}
        extra["reader_capacity"] = capacity
        print(f"readers alone (fake servers that only send; 10 connections): Niki line reader "
              f"{capacity['niki']['rate']:,.0f} msg/s, paho reader {capacity['mqtt']['rate']:,.0f} "
              f"msg/s, raw MQTT reader {capacity['mqttraw']['rate']:,.0f} msg/s", flush=True)
        has_batch = hasattr(niki.enqueuer, "enqueue_many")
        plan = build_plan(args, has_batch)
        counted = mysql is None or "B2" not in args.scenarios
        for scenario, note, call in plan:
            if report.family(scenario) == "B4" and not counted:
                count_round_trips(niki, mysql, args, extra)  # before B4's thousands of disconnects
                counted = True
            notes[scenario] = note
            runs = args.runs
            if report.family(scenario) == "B4":
                runs = args.b4_runs[len([s for s in notes if report.family(s) == "B4"]) - 1]
            for run in range(1, runs + 1):
                for side in sides:
                    if scenario.endswith(" batch") and side is not niki:
                        continue
                    if report.family(scenario) not in getattr(side, "families", report.METRICS):
                        continue
                    fig = measure(scenario, side, run, runs, call, args, niki, mqtt, mysql)
                    results.setdefault(scenario, {}).setdefault(side.name, []).append(fig)
                    print(report.run_line(scenario, run, runs, side.label, fig), flush=True)
                    if not report.run_ok(fig):
                        problems.append(f"{scenario} run {run} {side.label}: "
                                        f"{fig.get('error') or 'check failed'}")
                    for s in sides:
                        if not s.alive():
                            raise BenchError(f"{s.label} exited with status {s.proc.returncode}")
        if not has_batch and "B2" in args.scenarios:
            print("B2 batch API: n/a (messaging_server.Enqueuer has no enqueue_many)", flush=True)
        if not counted:
            count_round_trips(niki, mysql, args, extra)
        if mysql is None and "B2" in args.scenarios:
            print("\nDB round trips per message: n/a (SQLite: no statement counters)", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        problems.append("interrupted")
        print("\ninterrupted: stopping the servers", flush=True)
    except Exception as exc:  # a bug or a failed process: still stop both servers and report
        problems.append(f"suite: {type(exc).__name__}: {exc}")
        print(f"suite aborted: {type(exc).__name__}: {exc}", flush=True)
        if not isinstance(exc, (BenchError, OSError)):
            traceback.print_exc()
    finally:
        logs = {}
        for side in sides:
            try:
                status = side.stop()
            except Exception as exc:  # report it, and go on stopping the other
                status = None
                problems.append(f"stopping {side.label}: {exc}")
            logs[side.name] = side.log_problems()
            if status not in (0, None) and not interrupted:
                problems.append(f"{side.label} exited with status {status} when stopped")
        if args.keep_temp or problems:
            print(f"temp dir kept: {tmpdir}")
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    report.print_tables(results, notes)
    for name, lines in logs.items():
        if name == "mqttraw":
            continue
        label = dict(report.SYSTEMS)[name]
        print(f"\n{label} log: {len(lines)} warning/error lines" + (":" if lines else ""))
        for line in lines:
            print("  " + line)
    if "round_trips" in extra and extra["round_trips"].get("log_problems"):
        print("\ncounted Niki server's log:")
        for line in extra["round_trips"]["log_problems"]:
            print("  " + line)
    print(f"\nsuite took {elapsed:.0f} s; " + ("problems: " + "; ".join(problems) if problems
                                             else "nothing lost, duplicated or misordered"))
    payload = {"machine": info, "settings": settings_dict(args, mqtt.config), "results": results,
               "summary": report.summary(results), "notes": notes, "problems": problems,
               "server_logs": logs, "elapsed_s": elapsed, **extra}
    if args.json:
        report.write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.plot and results:
        dirty = " + uncommitted server changes" if info["git_dirty_messaging_server"] else ""
        report.plot(args.plot, results, f"Niki ({args.db}) vs Mosquitto - {info['cores']} cores, "
                                        f"Python {info['python']}, commit {info['git_commit'][:10]}{dirty}")
        print(f"wrote {args.plot}")
    return 1 if problems else 0


def count_round_trips(niki: Any, mysql: Any, args: argparse.Namespace, extra: Dict[str, Any]) -> None:
    """The relay-counted MariaDB commands per message (untimed), printed and kept for the JSON."""
    up_before = mysql.uptime()
    extra["round_trips"] = niki.round_trips(min(100, max(args.b2_clients)), args.rt_messages)
    up_after = mysql.uptime()
    if up_before is None or up_after is None or up_after < up_before:
        extra["round_trips"]["db_restarted"] = True
        print("note: MariaDB restarted during the round-trip count (not by this suite)")
    report.print_round_trips(extra["round_trips"])


def measure(scenario: str, side: Any, run: int, runs: int, call: Any, args: argparse.Namespace,
            niki: Any, mqtt: Any, mysql: Any) -> Dict[str, Any]:
    """One run of one scenario on one system, after waiting for a quiet machine.

    A Niki run during which MariaDB restarted (someone else restarted it on
    this shared machine) is measured again, up to twice; the discarded
    runs are kept under ``discarded``.
    """
    discarded: List[Dict[str, Any]] = []
    while True:
        quiet = wait_quiet([niki.pid, mqtt.pid], args.quiet_threshold, args.quiet_wait)
        if quiet >= args.quiet_threshold:
            print(f"note: other processes use {quiet:.0f}% of a core; measuring anyway", flush=True)
        watch_db = mysql is not None and side is niki
        if watch_db:
            niki.db_pid = find_pid("mariadbd") or find_pid("mysqld")
        up_before = mysql.uptime() if watch_db else None
        try:
            fig = call(side, run)
        except (BenchError, OSError) as exc:
            fig = {"error": f"{type(exc).__name__}: {exc}"}
        fig["other_cpu_before"] = quiet
        if watch_db:
            up_after = mysql.uptime()
            if up_before is None or up_after is None or up_after < up_before:
                fig["db_restarted"] = True
                print(f"note: MariaDB restarted during this run (uptime {up_before} -> {up_after}); "
                      f"not by this suite", flush=True)
                if len(discarded) < 2:
                    discarded.append(fig)
                    print("measuring this run again; discarded: "
                          + report.run_line(scenario, run, runs, side.label, fig), flush=True)
                    time.sleep(5)
                    continue
        if discarded:
            fig["discarded"] = discarded
        return fig


def build_plan(args: argparse.Namespace, has_batch: bool) -> List[Any]:
    """(scenario name, note, call(side, run)) in the order they run."""
    plan: List[Any] = []
    if "B1" in args.scenarios:
        plan.append(("B1", f"{args.b1_messages} messages one at a time, each awaited",
                     lambda side, run: side.b1(args.b1_messages, 5, run)))
    if "B2" in args.scenarios:
        for clients in args.b2_clients:
            note = f"{clients} clients, {args.b2_messages} messages round-robin, one queueing thread"
            plan.append((f"B2 c={clients}", note,
                         lambda side, run, c=clients: side.b2(c, args.b2_messages, run)))
            if has_batch:
                plan.append((f"B2 c={clients} batch", note + f", enqueue_many x{args.batch_size}",
                             lambda side, run, c=clients: side.b2(c, args.b2_messages, run,
                                                                  batch=args.batch_size)))
    if "B3" in args.scenarios:
        plan.append(("B3", f"{args.b3_messages} messages queued while away",
                     lambda side, run: side.b3(args.b3_messages, run)))
    if "B4" in args.scenarios:
        for clients, runs in zip(args.b4_clients, args.b4_runs):
            name = "B4" if len(args.b4_clients) == 1 else f"B4 c={clients}"
            plan.append((name, f"{clients} idle clients, {args.window} handshakes in flight, "
                               f"{runs} run(s)",
                         lambda side, run, c=clients: side.b4(c, run)))
    return plan


def settings_dict(args: argparse.Namespace, mosquitto_config: str) -> Dict[str, Any]:
    return {"runs": args.runs, "quick": args.quick, "niki_args": args.niki_args,
            "b1_messages": args.b1_messages,
            "b2_clients": args.b2_clients, "b2_messages": args.b2_messages,
            "batch_size": args.batch_size, "b3_messages": args.b3_messages,
            "b4_clients": args.b4_clients, "b4_runs": args.b4_runs, "b4_budget": args.b4_budget,
            "window": args.window,
            "timeout": args.timeout,
            "idle_timeout": args.idle_timeout, "mqtt_inflight": args.mqtt_inflight,
            "publisher_inflight": args.publisher_inflight, "mosquitto_config": mosquitto_config,
            "quiet_threshold": args.quiet_threshold, "quiet_wait": args.quiet_wait,
            "niki_server_args": "-p 0 --db URL --advertise-host 127.0.0.1 --max-connections N "
                                "(defaults otherwise: routed wake-ups, sweep 2 s)"}


if __name__ == "__main__":
    sys.exit(main())
