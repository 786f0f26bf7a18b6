"""Run a Niki server under yappi's CPU-time profiler, all threads; dump on SIGUSR1.

    pip install yappi
    python benchmarks/cpu_profile.py -p 9123 --db sqlite:////tmp/prof.sqlite3 &
    ...load it (e.g. the suite's B4, or many handshakes)...
    kill -USR1 %1      # writes /tmp/niki-cpu-by-self.txt and /tmp/niki-cpu-by-total.txt

The arguments are the server's own.  CPU time, not wall time: a thread waiting on a
socket or a lock costs nothing here, which is what a CPU-bound server needs to see.
py-spy, by contrast, slows a server with thousands of threads too much to be useful.
"""

from __future__ import annotations

import runpy
import signal
import sys
import threading

import yappi

OUTPUTS = {"tsub": "/tmp/niki-cpu-by-self.txt", "ttot": "/tmp/niki-cpu-by-total.txt"}
COLUMNS = {0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8), 3: ("ttot", 8)}


def dump() -> None:
    yappi.stop()
    stats = yappi.get_func_stats()
    for key, path in OUTPUTS.items():
        stats.sort(key)
        with open(path, "w") as out:
            stats.print_all(out=out, columns=COLUMNS)
    print(f"profile written to {', '.join(OUTPUTS.values())}", file=sys.stderr, flush=True)


def main() -> None:
    yappi.set_clock_type("cpu")
    yappi.start(builtins=True)
    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=dump).start())
    sys.argv = ["messaging_server", *sys.argv[1:]]
    runpy.run_module("messaging_server", run_name="__main__")


if __name__ == "__main__":
    main()
