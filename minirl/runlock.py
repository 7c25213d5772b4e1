"""One process per run folder, and a clean stop on SIGTERM / Ctrl-C.

RunLock: an exclusive advisory lock, ``fcntl.flock`` on a lock file: inside a folder
(``<folder>/.minirl.lock``: a run folder) or beside a file (``<file>.lock``: a samples
file, a judge cache). It never waits: taken or refused at once. The operating system
releases a flock when its process ends, however it ends (a crash, ``kill -9``), so a lock
left by a dead process never blocks: the lock file may stay, but nobody holds it. The
holder writes its PID, host, start time and command into the lock file; a second process
that tries to take the lock gets a MinirlError of one line naming the folder or file and
that holder. The lock is per open file: a second RunLock on the same target in the same
process is refused too. A process forked from the holder (not exec'd: the file is close-
on-exec) shares the lock until it exits. Over NFS, Linux maps flock onto NFS byte-range
locks, which need a working lock manager.

SignalGuard: for training loops. Inside ``with SignalGuard() as guard:`` the first SIGTERM
or SIGINT is only recorded (``guard.signum``), so the loop can finish or abandon its step,
checkpoint, and end with ``sys.exit(guard.exit_code())`` (128 + the signal number, the
shell's convention: 143 for SIGTERM, 130 for SIGINT). A second signal ends the process at
once with 128 + its number, without a traceback (stdout and stderr are flushed, nothing
else runs; an atomic write in progress leaves only its temporary file). A signal that was
ignored when the guard was entered (SIG_IGN: e.g. SIGINT in a shell's background job)
stays ignored. The previous handlers come back when the block ends. Python runs signal
handlers in the main thread only, between bytecodes: a guard can be entered only there,
and a signal that arrives during a long C call (a GPU kernel launch, a big matmul) is
handled when that call returns.
"""
import json
import os
import signal
import socket
import sys
import threading
import time

from .common import MinirlError

LOCK_NAME = ".minirl.lock"


def lock_file_for(target, folder: bool) -> str:
    """The lock file of a target: inside a folder, beside a file. Which one is the
    caller's to say, not guessed from what exists: a run folder locked before it exists
    and after must use the same lock file."""
    target = os.fspath(target)
    return os.path.join(target, LOCK_NAME) if folder else target + ".lock"


def read_holder(lock_file) -> dict | None:
    """What the holder wrote (pid, host, since, command), or None when unreadable/empty."""
    try:
        with open(lock_file, encoding="utf-8") as f:
            text = f.read()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _describe(holder) -> str:
    if not isinstance(holder, dict):
        return "a process that has not written its details yet"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    command = " ".join(str(holder.get("command", "?")).split())[:200]
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {when}: {command}"


class RunLock:
    """``with RunLock(run_dir):`` holds the lock for the block; or ``acquire()`` /
    ``release()``. ``folder=True``: the target is a folder (made if missing) locked from
    inside; ``folder=False``: a file (a samples file, a judge cache) locked from beside it.
    ``what`` names the target in the message ("run folder", "samples file", "judge cache")."""

    def __init__(self, target, folder: bool = True, what: str | None = None):
        self.target = os.fspath(target)
        self.folder = folder
        self.what = what or ("run folder" if folder else "file")
        self.lock_file = lock_file_for(self.target, folder)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise MinirlError naming the target and its holder; never waits."""
        import fcntl
        if self._fd is not None:
            return self
        try:
            if self.folder:
                os.makedirs(self.target, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise MinirlError(f"{self.target}: cannot create the lock file {self.lock_file} "
                              f"({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = None
            for _ in range(20):          # the holder writes its details just after locking
                holder = read_holder(self.lock_file)
                if holder is not None:
                    break
                time.sleep(0.05)
            raise MinirlError(f"{self.target}: this {self.what} is in use by {_describe(holder)} "
                              "(one process at a time; wait for it to end or stop it)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join(sys.argv) or sys.executable}
        data = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        return self

    def release(self):
        """Give the lock back (the lock file stays, emptied: deleting it would let two
        processes lock two different files of the same name)."""
        import fcntl
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


class SignalGuard:
    """Records the first SIGTERM / SIGINT for the loop to act on; a second one exits at
    once with 128 + its number. Main thread only (see the module docstring)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.signum = None               # the first signal received, or None
        self._previous = {}

    @property
    def stop_requested(self) -> bool:
        return self.signum is not None

    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def exit_code(self) -> int:
        """128 + the signal number once a signal arrived (143: SIGTERM, 130: SIGINT), else 0."""
        return 128 + self.signum if self.signum is not None else 0

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        for stream in (sys.stdout, sys.stderr):   # the second signal: stop now
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(128 + signum)

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            raise MinirlError("SignalGuard works in the main thread only (Python delivers signals there)")
        for sig in self.signals:
            previous = signal.getsignal(sig)
            self._previous[sig] = previous
            if previous is not signal.SIG_IGN:
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        return False
