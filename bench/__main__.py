"""``python -m bench``: the benchmarks (see bench/README.md).

python -m bench [pgbench options]      the pgbench comparison (also: python -m bench pgbench ...)
python -m bench memory [options]       proxy RSS with 10,000 idle clients
python -m bench classify [options]     statement classification cost
python -m bench hotpath [options]      the proxy's own Python per transaction (in-process, no sockets)
python -m bench all [pgbench options]  all three, one results file, docs/performance.md refreshed
python -m bench faults [--source DIR]   issue 13's fault and hostile-input measurements (before/after)
python -m bench ryw [--quick]          1 write : 9 reads, replica on, read-your-writes off/on; stale reads
python -m bench.ceiling --listen PORT --upstream HOST:PORT
                                       the bare forwarder the pgbench comparison measures as "ceiling"
"""

import sys

from bench import classify, faults, hotpath, memory, pgbench_compare, ryw, suite

COMMANDS = {
    "pgbench": pgbench_compare.main,
    "memory": memory.main,
    "classify": classify.main,
    "hotpath": hotpath.main,
    "all": suite.main,
    "faults": faults.main,
    "ryw": ryw.main,
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
    return pgbench_compare.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
