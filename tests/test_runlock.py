"""minirl.runlock with real processes: a second process is refused with one line naming the
holder, a holder killed with -9 does not block, SIGTERM lets the loop save and exit 143, a
second signal exits at once."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from minirl.common import MinirlError
from minirl.runlock import LOCK_NAME, RunLock, SignalGuard, lock_file_for, read_holder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default_signals():
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def start(code, *args):
    """A child Python process running `code`, with the default dispositions of SIGINT and
    SIGTERM (as a script started from a terminal has), its stdout piped."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals)


def wait_for_line(proc, expected, timeout=120):
    """Read the child's stdout until a line equal to `expected` (its imports can be slow)."""
    result = []

    def read():
        for line in proc.stdout:
            if line.strip() == expected:
                result.append(line)
                return
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        stderr = proc.stderr.read() if proc.poll() is not None else ""
        raise AssertionError(f"the child never printed {expected!r} (exit {proc.poll()}): {stderr}")


HOLDER = """
    import sys, time
    from minirl.runlock import RunLock
    folder = sys.argv[1] == "folder"
    lock = RunLock(sys.argv[2], folder=folder, what=sys.argv[3]).acquire()
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.fresh_process
@pytest.mark.parametrize("folder, name, what", [(True, "run", "run folder"), (False, "s.jsonl", "samples file"),
                                                (False, "s.judgments.jsonl", "judge cache")],
                         ids=["run-folder", "samples-file", "judge-cache"])
def test_second_process_refused_then_killed_holder_does_not_block(tmp_path, folder, name, what):
    target = tmp_path / name
    holder = start(HOLDER, "folder" if folder else "file", target, what)
    try:
        wait_for_line(holder, "locked")
        lock_file = lock_file_for(target, folder)
        assert lock_file == (str(target / LOCK_NAME) if folder else f"{target}.lock")
        assert read_holder(lock_file)["pid"] == holder.pid
        with pytest.raises(MinirlError) as e:      # this test's process is the second one
            RunLock(target, folder=folder, what=what).acquire()
        msg = str(e.value)
        assert msg.startswith(f"{target}: this {what} is in use by pid {holder.pid} on ")
        assert "-c " in msg and "\n" not in msg     # the holder's command, on one line
        if not folder:
            assert not target.exists()              # refused: nothing written
        holder.kill()                               # -9: no cleanup ran, the lock file stays
        holder.wait(30)
        assert os.path.exists(lock_file) and read_holder(lock_file)["pid"] == holder.pid
        with RunLock(target, folder=folder) as lock:    # the OS released the dead holder's lock
            assert lock.held and read_holder(lock_file)["pid"] == os.getpid()
        assert not lock.held and read_holder(lock_file) is None
    finally:
        holder.kill()
        holder.wait(30)


def test_lock_in_process(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    assert (tmp_path / "run").is_dir()                   # a new run folder is made
    with pytest.raises(MinirlError, match=rf"{tmp_path / 'run'}: this run folder is in use by pid {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()             # the same process, another RunLock
    lock.release()
    lock.release()                                      # twice is fine
    with RunLock(tmp_path / "run"):
        pass
    with RunLock(tmp_path / "run"):                     # the block released it
        pass
    (tmp_path / "f").write_text("")                     # a folder cannot be made inside a file
    with pytest.raises(MinirlError, match=r"f/run: cannot create the lock file .*\(Not a directory\)"):
        RunLock(tmp_path / "f" / "run").acquire()


# A training loop as the scripts will write it: steps of 0.3 s; on the first signal the
# step in progress is finished, a checkpoint written, and the process exits 128 + signum.
LOOP = """
    import os, sys, time, signal
    from minirl.runlock import SignalGuard
    out, cleanup_s = sys.argv[1], float(sys.argv[2])
    before = signal.getsignal(signal.SIGTERM)
    with SignalGuard() as guard:
        step = 0
        print("ready", flush=True)
        while step < 1000:
            time.sleep(0.3)
            step += 1
            if guard.stop_requested:
                print(f"stopping after step {step} ({guard.signal_name()})", flush=True)
                time.sleep(cleanup_s)        # writing a checkpoint
                open(out, "w").write(str(step))
                break
    assert signal.getsignal(signal.SIGTERM) is before
    print("handlers restored", flush=True)
    sys.exit(guard.exit_code())
"""


@pytest.mark.fresh_process
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_first_signal_lets_the_loop_save(tmp_path, sig, code):
    out = tmp_path / "ckpt"
    proc = start(LOOP, out, 0)
    wait_for_line(proc, "ready")
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    step = int(out.read_text())
    assert step >= 1 and f"stopping after step {step} ({signal.Signals(sig).name})" in stdout
    assert "handlers restored" in stdout


@pytest.mark.fresh_process
def test_second_signal_exits_at_once(tmp_path):
    out = tmp_path / "ckpt"
    proc = start(LOOP, out, 60)          # a checkpoint that would take a minute
    wait_for_line(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    wait_for_line(proc, "stopping after step 1 (SIGTERM)")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130 and stderr == ""       # 128 + SIGINT, no traceback
    assert not out.exists() and "handlers restored" not in stdout


def test_guard_in_process_records_and_restores():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with SignalGuard() as guard:
            assert not guard.stop_requested and guard.exit_code() == 0
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)                  # handlers run between bytecodes
            assert guard.signum == signal.SIGTERM and guard.exit_code() == 143
            assert guard.signal_name() == "SIGTERM"
        assert seen == []
        os.kill(os.getpid(), signal.SIGTERM)  # the previous handler is back
        time.sleep(0.05)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with SignalGuard():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_guard_refuses_other_threads():
    errors = []

    def body():
        try:
            with SignalGuard():
                pass
        except MinirlError as e:
            errors.append(str(e))
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert errors == ["SignalGuard works in the main thread only (Python delivers signals there)"]
