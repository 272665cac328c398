"""``python -m bench all`` (what ``make bench`` runs): classification cost, the pgbench comparison, the mixed
read/write workload with the replica (``bench ryw``: read-your-writes off and on, stale reads) and the
idle-clients memory benchmark, one results file (bench/results/<UTC time>-bench.json), and their tables of
docs/performance.md refreshed."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from bench import report, ryw
from bench.classify import classify_doc
from bench.memory import add_memory_arguments, memory_doc
from bench.pgbench_compare import (
    Options,
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
    p.add_argument(
        "--no-ryw", action="store_true", help="leave out the mixed read/write workload (bench ryw)"
    )
    ryw.add_ryw_arguments(p, prefix="ryw-")
    p.add_argument(
        "--no-cache-variant",
        action="store_true",
        help="leave out the second pgbench run: pgbouncer vs the proxy with statements.cache_unnamed=true",
    )
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
        variant = cache_variant(opts)
        if variant is not None and not args.no_cache_variant:
            print("\n== pgbench: the proxy with statements.cache_unnamed=true ==", flush=True)
            variant_code, doc["pgbench_cache_unnamed"] = run_benchmark(variant)
            blocks["pgbench-cache-unnamed"] = report.pgbench_markdown(doc["pgbench_cache_unnamed"])
            code = code or variant_code
            write_json(opts.json_path, doc)
        if not args.no_ryw:
            code = run_ryw(args, doc, blocks) or code
            write_json(opts.json_path, doc)
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


def run_ryw(args: argparse.Namespace, doc: dict[str, Any], blocks: dict[str, str]) -> int:
    """``python -m bench ryw`` as part of ``all`` (``--ryw-*`` options, ``--quick`` shortens it too)."""
    print("\n== 1 write : 9 reads with the replica (python -m bench ryw) ==", flush=True)
    doc["ryw"] = ryw.ryw_doc(ryw.options_from(args, quick=args.quick, prefix="ryw-"))
    blocks["ryw"] = ryw.markdown(doc["ryw"])
    return ryw.exit_code(doc["ryw"])


def cache_variant(opts: Options) -> Options | None:
    """The extended-protocol cells again, PgBouncer vs the proxy keeping unnamed statements prepared
    (statements.cache_unnamed, off by default): what that setting is worth, measured in the same sitting."""
    targets = tuple(t for t in opts.targets if t in ("pgbouncer", "proxy"))
    cells = tuple(c for c in opts.cells if c.mode == "extended")
    if "proxy" not in targets or not cells:
        return None
    return dataclasses.replace(
        opts,
        targets=targets,
        cells=cells,
        proxy_settings=(*opts.proxy_settings, "statements.cache_unnamed=true"),
    )


if __name__ == "__main__":
    sys.exit(main())
