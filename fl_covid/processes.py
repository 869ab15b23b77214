"""The processes of this machine as Linux's /proc shows them, for the tools and tests that start, watch and stop
Flower's processes: who runs what below whom, and which are still alive.

A process can end between listing and reading: every function skips what is gone instead of failing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    """One process: its parent's PID, its state (one letter of /proc/PID/stat: R, S, D, Z for a zombie, ...) and
    its command line, arguments joined by spaces."""

    parent: int
    state: str
    command: str


def _stat(pid: int) -> tuple[str, int]:
    """(state, parent PID) from /proc/PID/stat; the command name in brackets may hold spaces and ')'."""
    fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def command_line(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces; '' when the process is gone (or a zombie)."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_table() -> dict[int, Process]:
    """Every process of the machine by PID."""
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            try:
                state, parent = _stat(pid)
            except (OSError, ValueError, IndexError):
                continue
            table[pid] = Process(parent, state, command_line(pid))
    return table


def descendants(roots: Iterable[int], table: dict[int, Process] | None = None) -> set[int]:
    """``roots`` that are in the process table (``table``, read now when not given) and every process below them."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, process in table.items():
        children.setdefault(process.parent, []).append(pid)
    out: set[int] = set()
    todo = [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def alive(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that still run: neither gone nor a zombie."""
    live = []
    for pid in pids:
        try:
            state, _ = _stat(pid)
        except (OSError, ValueError, IndexError):
            continue
        if state != "Z":
            live.append(pid)
    return live


def memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc/PID/status; OSError when it is gone."""
    fields = {}
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def pids_mentioning(text: str) -> list[int]:
    """PIDs (other than this process's) whose command line contains ``text``."""
    return [pid for pid, process in process_table().items() if pid != os.getpid() and text in process.command]
