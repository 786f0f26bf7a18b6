"""Turning per-run figures into the suite's tables, JSON and plot.

Results are kept as ``results[scenario][system] = [figures of run 1, run 2, ...]``;
everything here reads that shape and nothing else, so the measuring code never
has to care about presentation.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from common import check_ok, check_text

Results = Dict[str, Dict[str, List[Dict[str, Any]]]]
SYSTEMS = (("niki", "Niki"), ("mqtt", "Mosquitto"), ("mqttraw", "Mosq/raw"))

# (key in a run's figures, label, format); "cpu.server" reads run["cpu"]["server"]
METRICS: Dict[str, List[Tuple[str, str, str]]] = {
    "B1": [("p50", "p50 latency, ms", ".2f"), ("p90", "p90 latency, ms", ".2f"),
           ("p99", "p99 latency, ms", ".2f"), ("max", "max latency, ms", ".2f"),
           ("call_p50", "queueing call p50, ms", ".2f")],
    "B2": [("rate", "first queued to last arrival, msg/s", ",.0f"),
           ("enqueue_rate", "queueing alone, msg/s", ",.0f"),
           ("cpu.server", "server CPU, % of a core", ".0f"),
           ("cpu.db", "MariaDB CPU, % of a core", ".0f"),
           ("cpu.suite", "suite (load+readers) CPU, %", ".0f"),
           ("db_statements_per_message", "DB statements/msg (global)", ".2f"),
           ("db_round_trips_per_message", "DB round trips/msg (global)", ".2f"),
           ("settle_s", "server idle again after, s", ".1f")],
    "B3": [("rate", "connect to last message, msg/s", ",.0f"),
           ("connect_to_last_s", "connect to last message, s", ".3f"),
           ("enqueue_rate", "queueing the backlog, msg/s", ",.0f"),
           ("enqueue_rate_first_tenth", "  its first tenth, msg/s", ",.0f"),
           ("enqueue_rate_last_tenth", "  its last tenth, msg/s", ",.0f"),
           ("cpu.server", "server CPU, % of a core", ".0f"),
           ("cpu.suite", "suite (reader) CPU, %", ".0f")],
    "B4": [("connected", "clients connected", ",.0f"),
           ("handshakes_per_s", "handshakes/s", ",.0f"),
           ("rss_before_mb", "server RSS before, MB", ".1f"),
           ("rss_after_mb", "server RSS with clients, MB", ".1f"),
           ("kb_per_client", "RSS per client, KB", ".1f"),
           ("threads", "server threads", ",.0f"),
           ("last_message_ms", "message to last client, ms", ".2f"),
           ("cpu.server", "server CPU in handshakes, %", ".0f"),
           ("idle_cpu", "server CPU, clients idle, %", ".0f"),
           ("settle_s", "server idle again after, s", ".1f")],
}


def family(scenario: str) -> str:
    return scenario.split()[0]


def value(run: Dict[str, Any], key: str) -> Optional[float]:
    node: Any = run
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or math.isnan(node):
        return None
    return float(node)


def summarise(values: Sequence[float]) -> Optional[Dict[str, float]]:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def run_ok(run: Dict[str, Any]) -> bool:
    """Nothing lost, duplicated or misordered, and nothing failed, in one run."""
    if run.get("error"):
        return False
    if "check" in run and not check_ok(run["check"]):
        return False
    if run.get("timeouts"):
        return False
    if "last_message_ok" in run and run.get("connected") and not run["last_message_ok"]:
        return False
    if run.get("session_present") is False:  # the broker forgot the persistent session
        return False
    return not run.get("refused")


def summary(results: Results) -> Dict[str, Dict[str, Any]]:
    """Per scenario and metric: median/min/max per system and the ratios of medians.

    ``ratio`` is Niki/Mosquitto with paho clients (the comparison asked for);
    ``ratio_raw`` is Niki/Mosquitto with the raw-client cross-check.  A batch
    scenario is compared with Mosquitto's figures of the same non-batch scenario.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for scenario, by_system in results.items():
        rows: Dict[str, Any] = {}
        plain = results.get(scenario.replace(" batch", ""), {})
        runs_of = {system: by_system.get(system) or (plain.get(system, []) if system != "niki" else [])
                   for system, _ in SYSTEMS}
        for key, _label, _fmt in METRICS[family(scenario)]:
            row: Dict[str, Any] = {}
            for system, _ in SYSTEMS:
                vals = [v for v in (value(r, key) for r in runs_of[system] if not r.get("error"))
                        if v is not None]
                row[system] = summarise(vals)
            for other, name in (("mqtt", "ratio"), ("mqttraw", "ratio_raw")):
                if row["niki"] and row[other] and row[other]["median"]:
                    row[name] = row["niki"]["median"] / row[other]["median"]
            rows[key] = row
        checks = {}
        for system, _ in SYSTEMS:
            runs = by_system.get(system, [])
            checks[system] = {"runs": len(runs), "ok": sum(1 for r in runs if run_ok(r))}
        rows["_checks"] = checks
        out[scenario] = rows
    return out


def fmt_cell(s: Optional[Dict[str, float]], fmt: str) -> str:
    if not s:
        return "n/a"
    if s["n"] == 1 or s["min"] == s["max"]:
        return format(s["median"], fmt)
    return f"{format(s['median'], fmt)} ({format(s['min'], fmt)}-{format(s['max'], fmt)})"


def print_tables(results: Results, notes: Dict[str, str]) -> None:
    """One table per scenario: median (min-max) per system, and the ratios of medians."""
    summ = summary(results)
    with_raw = any("mqttraw" in by_system for by_system in results.values())
    for scenario, rows in summ.items():
        checks = rows["_checks"]
        title = scenario + (f"  [{notes[scenario]}]" if scenario in notes else "")
        print(f"\n{title}")
        head = f"  {'':36} {'Niki':>25} {'Mosquitto (paho)':>25} {'Niki/Mosq':>9}"
        if with_raw:
            head += f" {'Mosquitto (raw)':>25} {'Niki/raw':>9}"
        print(head)
        for key, label, fmt in METRICS[family(scenario)]:
            row = rows[key]
            if not any(row[system] for system, _ in SYSTEMS):
                continue
            line = f"  {label:36} {fmt_cell(row['niki'], fmt):>25}"
            for system, ratio in (("mqtt", "ratio"), ("mqttraw", "ratio_raw")):
                if system == "mqttraw" and not with_raw:
                    continue
                cell = fmt_cell(row[system], fmt)
                if " batch" in scenario and row[system]:
                    cell += "*"
                ratio_text = f"{row[ratio]:.2f}" if ratio in row else "n/a"
                line += f" {cell:>25} {ratio_text:>9}"
            print(line)
        print("  check (nothing lost/duplicated/misordered, nothing failed): " + ", ".join(
            f"{label} {checks[s]['ok']}/{checks[s]['runs']} runs OK"
            for s, label in SYSTEMS if checks[s]["runs"]))
        if " batch" in scenario:
            print("  * MQTT has no batch API: Mosquitto's figures for the same clients without batches")


def run_line(scenario: str, run: int, runs: int, label: str, fig: Dict[str, Any]) -> str:
    """One progress line per system and run, printed as the suite goes."""
    head = f"{scenario:14} run {run}/{runs} {label:9}"
    if fig.get("error"):
        return f"{head} FAILED: {fig['error']}"
    cpu = fig.get("cpu") or {}
    cpu_text = " ".join(f"{k}={v:.0f}%" for k, v in cpu.items())
    fam = family(scenario)
    if fam == "B1":
        text = (f"p50={fig['p50']:.2f}ms p90={fig['p90']:.2f}ms p99={fig['p99']:.2f}ms "
                f"max={fig['max']:.2f}ms n={fig['n']} timeouts={fig['timeouts']}")
    elif fam == "B2":
        text = (f"{fig['rate']:,.0f} msg/s (queueing {fig['enqueue_rate']:,.0f}/s, "
                f"{fig['delivered']}/{fig['messages']} in {fig['wall_s']:.2f}s)")
        if "db_statements_per_message" in fig:
            text += (f" db: {fig['db_statements_per_message']:.2f} statements/msg, "
                     f"{fig['db_round_trips_per_message']:.2f} round trips/msg")
            if fig.get("db_other_sessions"):
                text += f" (other DB sessions seen: {','.join(fig['db_other_sessions'])})"
    elif fam == "B3":
        text = (f"{fig['rate']:,.0f} msg/s ({fig['received']}/{fig['messages']} in "
                f"{fig['connect_to_last_s']:.3f}s; queueing {fig['enqueue_rate']:,.0f}/s")
        if fig.get("enqueue_rate_first_tenth"):
            text += (f": first tenth {fig['enqueue_rate_first_tenth']:,.0f}/s, last tenth "
                     f"{fig['enqueue_rate_last_tenth']:,.0f}/s")
        text += ")"
    else:
        text = (f"{fig['connected']}/{fig['requested']} connected, {fig['handshakes_per_s']:,.0f} "
                f"handshakes/s, RSS {fig.get('rss_before_mb', 0):.1f}->{fig.get('rss_after_mb', 0):.1f} MB "
                f"({fig.get('kb_per_client', 0):.1f} KB/client), threads {fig.get('threads', 0):.0f}, "
                f"last message {fig['last_message_ms'] or float('nan'):.2f} ms "
                f"({'ok' if fig['last_message_ok'] else 'NOT DELIVERED'})")
        if fig.get("settle_s") is not None:
            text += f", server idle again after {fig['settle_s']:.1f}s"
        if fig.get("idle_cpu") is not None:
            text += f", server CPU while they idle {fig['idle_cpu']:.0f}%"
        if fig.get("failures"):
            text += f" failures={fig['failures']}"
        if fig.get("gave_up"):
            text += f" ({fig['gave_up']})"
        if fig.get("handshakes_per_s_by_step"):
            text += " handshakes/s per step: " + ",".join(f"{r:.0f}" for r in fig["handshakes_per_s_by_step"])
    extra = ""
    if "check" in fig:
        extra += " | " + check_text(fig["check"])
    if fig.get("refused"):
        extra += f" | refused={fig['refused']}"
    if cpu_text:
        extra += f" | cpu {cpu_text}"
    if fig.get("other_cpu_before", 0) >= 30:
        extra += f" | other processes busy before: {fig['other_cpu_before']:.0f}%"
    return f"{head} {text}{extra}"


def print_round_trips(rt: Dict[str, Any]) -> None:
    """The MariaDB command counts of the counted (relayed) run."""
    print(f"\nMariaDB commands per message, counted by relays (run of {rt['messages']} messages to "
          f"{rt['clients']} connected clients; untimed)")
    print(f"  enqueue side, client online : {rt['enqueue_per_message']:.2f}  {rt['enqueue_commands']}")
    print(f"  enqueue side, client offline: {rt['offline_enqueue_per_message']:.2f}  "
          f"{rt['offline_enqueue_commands']}")
    print(f"  server side, per delivered  : {rt['server_per_message']:.2f}  {rt['server_commands']} "
          f"(minus idle {rt['server_idle_commands_per_s']:.1f}/s: {rt['server_idle_commands']})")
    print(f"  global Questions per offline enqueue: {rt['offline_global_questions_per_message']:.2f}, "
          f"round trips (Questions + pings): {rt['offline_global_round_trips_per_message']:.2f}")


def write_json(path: str, payload: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def plot(path: str, results: Results, title: str) -> None:
    """B1 latency CDF per system, and B2/B3 rates per system (median, min-max whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"niki": "tab:blue", "mqtt": "tab:orange", "mqttraw": "tab:green"}
    b1 = results.get("B1", {})
    for system, label in SYSTEMS:
        samples = sorted(x for r in b1.get(system, []) for x in r.get("samples_ms", []))
        if samples:
            ys = [(i + 1) / len(samples) for i in range(len(samples))]
            left.step(samples, ys, where="post", label=f"{label} (n={len(samples)})", color=colors[system])
    left.set_title("B1 latency CDF, one connected client")
    if left.lines:
        left.set_xscale("log")
        left.set_xlabel("queueing call to arrival, ms (log)")
        left.set_ylabel("fraction of messages")
        left.grid(True, which="both", alpha=0.3)
        left.legend()
    else:
        left.text(0.5, 0.5, "B1 not run", ha="center", va="center", transform=left.transAxes)

    groups = [s for s in results if family(s) in ("B2", "B3")]
    width = 0.27
    for j, (system, label) in enumerate(SYSTEMS):
        xs, heights, lows, highs = [], [], [], []
        for i, scenario in enumerate(groups):
            runs = results[scenario].get(system, [])
            vals = [v for v in (value(r, "rate") for r in runs if not r.get("error")) if v is not None]
            if not vals:
                continue
            med = statistics.median(vals)
            xs.append(i + (j - 1) * width)
            heights.append(med)
            lows.append(med - min(vals))
            highs.append(max(vals) - med)
        if xs:
            name = {"mqtt": "Mosquitto, paho clients", "mqttraw": "Mosquitto, raw clients"}.get(system, label)
            bars = right.bar(xs, heights, width, yerr=[lows, highs], capsize=3, label=name,
                             color=colors[system])
            right.bar_label(bars, labels=[f"{h:,.0f}" for h in heights], fontsize=7, padding=2)
    right.set_xticks(range(len(groups)))
    right.set_xticklabels([g.replace("B2 ", "B2\n").replace("B3", "B3\ncatch-up") for g in groups],
                          fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("messages/s (log), median with min-max")
    right.set_title("B2 throughput and B3 catch-up")
    right.grid(True, axis="y", which="both", alpha=0.3)
    right.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
