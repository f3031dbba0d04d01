"""One run per out_dir: `out_dir/run.lock`, created with O_EXCL by rank 0 before the run writes
anything, holding the holder's pid, host, process start time and wall-clock start; removed when
the run ends (any exit but SIGKILL / power loss).

A second run in the same out_dir is refused (UsageError: one line naming the holder, exit 2). A lock
whose holder is gone -- same host, and no process with that pid, or one that started at another time
(a reused pid) -- is stale: it is taken over with a line saying so. A lock from another host cannot be
checked from here: the message says to delete the file if that run is gone. Under torchrun only rank
0 takes the lock (train.py broadcasts the outcome, so every rank exits 2 together).

If the run ends having written nothing (bad input found after the lock was taken), release(wrote=
False) removes the out_dir it created, or puts back the folder's modification time: out_dir is left
exactly as it was.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

from smog_train.config import UsageError

NAME = "run.lock"


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if there is
    no such process or no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _age(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0


def _alive(pid: int, start: Optional[str]) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


class RunLock:
    def __init__(self):
        self.path: Optional[str] = None
        self.created: list = []  # folders made to hold the lock (removed if nothing is written)
        self.times = None  # (atime_ns, mtime_ns) of an existing out_dir
        self.wrote = False  # set once the run writes into out_dir
        self.dir = ""
        self.phase = "setup"  # where the run is, for the line of a signal before training

    def acquire(self, out_dir: str) -> Optional[str]:
        """Take the lock -> a line to print (a stale lock taken over) or None; UsageError if held."""
        d = self.dir = os.path.abspath(out_dir)
        missing, p = [], d
        while not os.path.exists(p):
            missing.append(p)
            p = os.path.dirname(p)
        if missing:
            os.makedirs(d)
            self.created = missing  # deepest first
        else:
            st = os.stat(d)
            self.times = (st.st_atime_ns, st.st_mtime_ns)
        path = os.path.join(d, NAME)
        me = dict(
            pid=os.getpid(),
            host=socket.gethostname(),
            proc_start=_proc_start(os.getpid()),
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        )
        note = None
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read(path)
                desc = (
                    f"pid {holder.get('pid')} on {holder.get('host')}, started "
                    f"{holder.get('started')}"
                )
                if not holder:  # its writer died between creating and writing it
                    desc = "an empty or unreadable lock"
                    holder = dict(host=me["host"], pid=-1) if _age(path) > 60 else dict(host="?")
                if holder.get("host") != me["host"]:
                    self.release(wrote=False)
                    raise UsageError(
                        f"--out-dir {out_dir!r} is in use by another run ({desc}; "
                        f"{path} exists); wait for it to end, or choose another --out-dir "
                        f"(if that run is gone, delete {path})"
                    ) from None
                if _alive(int(holder.get("pid", -1)), holder.get("proc_start")):
                    self.release(wrote=False)
                    raise UsageError(
                        f"--out-dir {out_dir!r} is in use by another run ({desc}); wait "
                        f"for it to end or stop it, or choose another --out-dir"
                    ) from None
                if self._read(path) in (holder, {}):  # still the same stale lock: take it over
                    try:
                        os.remove(path)
                    except FileNotFoundError:
                        pass
                note = (
                    f"warning: taking over the lock of --out-dir {out_dir!r}: its run ({desc}) "
                    f"is gone"
                )
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.path = path
            return note
        self.release(wrote=False)
        raise UsageError(
            f"--out-dir {out_dir!r}: cannot take {path} (other runs keep taking it); "
            f"choose another --out-dir"
        )

    @staticmethod
    def _read(path: str) -> dict:
        for _ in range(20):  # a holder writes its line just after creating the file
            try:
                with open(path) as f:
                    text = f.read()
                if text.endswith("\n"):
                    return json.loads(text)
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return {}

    def release(self, wrote: Optional[bool] = None) -> None:
        """Remove the lock (if it is ours); if the run wrote nothing, leave out_dir as it was."""
        wrote = self.wrote if wrote is None else wrote
        if self.path is not None:
            try:
                if self._read(self.path).get("pid") == os.getpid():
                    os.remove(self.path)
            except OSError:
                pass
            self.path = None
        if not wrote:
            try:
                if self.times is not None:
                    os.utime(self.dir, ns=self.times)
                for c in self.created:
                    os.rmdir(c)
            except OSError:
                pass
        self.created, self.times = [], None
