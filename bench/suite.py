"""``python -m bench all`` (what ``make bench`` runs): classification cost, the pgbench comparison and the
idle-clients memory benchmark, one results file (bench/results/<UTC time>-bench.json), and the three
tables of docs/performance.md refreshed."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from bench import report
from bench.classify import classify_doc
from bench.memory import add_memory_arguments, memory_doc
from bench.pgbench_compare import (
    guarded,
    have_pgbench,
    options_from,
    parser,
    run_benchmark,
    write_json,
)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    p.prog = "python -m bench all"
    p.description = __doc__
    add_memory_arguments(p, prefix="memory-")
    p.add_argument("--no-memory", action="store_true", help="leave out the idle-clients benchmark")
    p.add_argument("--no-classify", action="store_true", help="leave out the classification benchmark")
    args = p.parse_args(argv)
    opts = options_from(p, args, kind="bench")
    if args.memory_clients < 1 or args.memory_concurrency < 1:
        p.error("--memory-clients and --memory-concurrency must be at least 1")
    if not have_pgbench():
        return 2

    def run() -> int:
        doc: dict[str, Any] = {"benchmark": "python -m bench all"}
        blocks: dict[str, str] = {}
        code = 0
        if not args.no_classify:
            print("== classification cost (python -m bench classify) ==", flush=True)
            doc["classify"] = classify_doc()
            blocks["classify"] = report.classify_markdown(doc["classify"])
            print()
        print("== pgbench comparison ==", flush=True)
        code, doc["pgbench"] = run_benchmark(opts)
        blocks["pgbench"] = report.pgbench_markdown(doc["pgbench"])
        write_json(opts.json_path, doc)  # the pgbench figures are safe even if the memory run fails
        if not args.no_memory:
            print("\n== idle clients (python -m bench memory) ==", flush=True)
            doc["memory"] = memory_doc(args)
            blocks["memory"] = report.memory_markdown(doc["memory"])
            if not doc["memory"]["result"]["within_target"]:
                code = code or 1
        write_json(opts.json_path, doc)
        print(f"\nbench: results written to {opts.json_path}\n")
        for name in report.SECTIONS:
            if name in blocks:
                print(f"## {name}\n\n{blocks[name]}\n")
        if opts.docs is not None:
            report.update_docs(opts.docs, blocks)
            print(f"bench: {opts.docs} refreshed")
        return code

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
