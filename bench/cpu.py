"""CPU time per transaction of each process group during a pgbench run: the profile behind the ratios.

On a machine where pgbench, PostgreSQL and the pooler share the cores, throughput follows the CPU each
transaction costs in total; this says who spends it. Times come from ``/proc``: a group is the process
trees under some root pids, counted as user and system time of every live process in them plus the
``cutime``/``cstime`` of those processes (the time of children they have reaped: a PostgreSQL backend that
exits during the run is counted through its postmaster). pgbench is the harness's own child, counted with
``os.times()``. ``machine`` is ``/proc/stat``: what the kernel spent outside any process's system time
(``softirq``: loopback TCP delivery, mostly) and what stayed ``idle``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
# /proc/stat's cpu line, in order (steal and the guest fields are left out).
_MACHINE_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq")


@dataclass(frozen=True, slots=True)
class ProcTimes:
    """One process from /proc/<pid>/stat: parent, own plus reaped children's user and system ticks."""

    ppid: int
    user: int
    system: int


def read_proc(pid: int, proc: Path = Path("/proc")) -> ProcTimes | None:
    """None when the process is gone (or not readable)."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    return ProcTimes(int(fields[1]), int(fields[11]) + int(fields[13]), int(fields[12]) + int(fields[14]))


def process_table(proc: Path = Path("/proc")) -> dict[int, ProcTimes]:
    table: dict[int, ProcTimes] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            found = read_proc(int(entry.name), proc)
            if found is not None:
                table[int(entry.name)] = found
    return table


def tree_pids(table: Mapping[int, ProcTimes], roots: Sequence[int]) -> set[int]:
    """The roots that are alive and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, t in table.items():
        children.setdefault(t.ppid, []).append(pid)
    found: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def tree_ticks(table: Mapping[int, ProcTimes], roots: Sequence[int]) -> tuple[int, int]:
    """(user, system) ticks of the process trees under ``roots``, reaped children included."""
    user = system = 0
    for pid in tree_pids(table, roots):
        user += table[pid].user
        system += table[pid].system
    return user, system


def machine_ticks(stat: Path = Path("/proc/stat")) -> dict[str, int]:
    first = stat.read_text().split("\n", 1)[0].split()
    values = dict(zip(_MACHINE_FIELDS, (int(v) for v in first[1:]), strict=False))
    return {
        "user": values["user"] + values["nice"],
        "system": values["system"],
        "softirq": values["softirq"] + values["irq"],
        "idle": values["idle"] + values["iowait"],
    }


@dataclass
class _Snapshot:
    groups: dict[str, tuple[int, int]]
    machine: dict[str, int]
    children: tuple[float, float]  # this process's reaped children (pgbench), seconds
    counts: dict[int, int]  # live children per root: to wait for exiting backends at the end


class CpuSampler:
    """``start()`` before a run, ``stop(transactions)`` after it: microseconds per transaction per group.

    ``groups`` maps a name ("pooler", "postgres") to the root pids of its process trees.
    """

    def __init__(self, groups: Mapping[str, Sequence[int]], settle_timeout: float = 3.0) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.settle_timeout = settle_timeout
        self._start: _Snapshot | None = None

    def _roots(self) -> list[int]:
        return [pid for pids in self.groups.values() for pid in pids]

    def _snapshot(self) -> _Snapshot:
        table = process_table()
        times = os.times()
        counts = {r: sum(1 for t in table.values() if t.ppid == r) for r in self._roots()}
        return _Snapshot(
            {name: tree_ticks(table, pids) for name, pids in self.groups.items()},
            machine_ticks(),
            (times.children_user, times.children_system),
            counts,
        )

    def start(self) -> None:
        self._start = self._snapshot()

    def _settle(self) -> None:
        """Wait (bounded) until no root has more children than at the start: backends of the run's own
        connections (direct) have exited and been reaped, so their time is in their parent's cutime."""
        assert self._start is not None
        deadline = time.monotonic() + self.settle_timeout
        while time.monotonic() < deadline:
            table = process_table()
            if all(
                sum(1 for t in table.values() if t.ppid == root) <= before
                for root, before in self._start.counts.items()
            ):
                return
            time.sleep(0.05)

    def stop(self, transactions: int) -> dict[str, dict[str, float]]:
        """Microseconds of CPU per transaction: {group: {"user": .., "system": ..}, "pgbench": ..,
        "machine": {"softirq": .., "idle": ..}}."""
        assert self._start is not None, "start() first"
        machine, times = machine_ticks(), os.times()  # now: the settling below is idle time
        self._settle()
        end = self._snapshot()
        end.machine, end.children = machine, (times.children_user, times.children_system)
        start, self._start = self._start, None
        per_tx = 1e6 / max(transactions, 1)
        tick = per_tx / TICKS_PER_SECOND
        out: dict[str, dict[str, float]] = {}
        for name in self.groups:
            (u0, s0), (u1, s1) = start.groups[name], end.groups[name]
            out[name] = {"user": round((u1 - u0) * tick, 1), "system": round((s1 - s0) * tick, 1)}
        out["pgbench"] = {
            "user": round((end.children[0] - start.children[0]) * per_tx, 1),
            "system": round((end.children[1] - start.children[1]) * per_tx, 1),
        }
        out["machine"] = {
            key: round((end.machine[key] - start.machine[key]) * tick, 1) for key in ("softirq", "idle")
        }
        return out
