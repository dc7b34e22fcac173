"""ce_pretrain.stopping: the one stop request of pretraining, the transfer engine and the detectron2 / mmseg hooks."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ce_pretrain.stopping import DUPLICATE_WINDOW_S, StopRequest, agreed, describe, exit_status


def test_codes_and_their_meaning():
    with StopRequest() as stop:
        assert stop.code() == 0 and agreed(stop) == 0 and agreed(None) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM and agreed(stop, sync=False) == 143  # one process: every step
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert describe(0) is None and describe(1) == "--max-time" and describe(130) == "SIGINT"
    assert exit_status(0) == 0 and exit_status(1) == 0 and exit_status(143) == 143
    assert StopRequest(max_time=0.01, start=time.monotonic() - 1).code() == 1


def _child(body: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from ce_pretrain.stopping import StopRequest, forward_signals_to_children
        {textwrap.indent(textwrap.dedent(body), "        ").strip()}
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_copy_of_the_signal_is_one_request_and_a_later_one_exits_at_once():
    proc = _child(f"""
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # a launcher's forwarded copy, within the window
            print("still here", stop.code(), flush=True)
            time.sleep({DUPLICATE_WINDOW_S} + 0.5)
            os.kill(os.getpid(), signal.SIGINT)  # a second request: out at once
            time.sleep(5)
            print("not reached", flush=True)
    """)
    out, err = proc.communicate(timeout=60)
    assert out.splitlines() == ["still here 130"]
    assert proc.returncode == 130 and "SIGINT again: exiting now" in err


def test_a_launch_parent_passes_signals_on_to_its_workers(tmp_path):
    script = tmp_path / "launch.py"  # spawned workers import the parent's main module: it must be a file
    script.write_text(textwrap.dedent("""
        import multiprocessing as mp
        import os, signal, time
        from ce_pretrain.stopping import StopRequest, forward_signals_to_children

        def worker(ready):
            with StopRequest() as stop:
                ready.set()
                while not stop.code():
                    time.sleep(0.05)
                print("worker stopping cleanly", stop.code(), flush=True)

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            ready = ctx.Event()
            child = ctx.Process(target=worker, args=(ready,))
            with forward_signals_to_children():
                child.start()
                assert ready.wait(60)
                os.kill(os.getpid(), signal.SIGTERM)  # to the parent only, as `kill PID` or `timeout` sends it
                child.join(60)
            print("parent done", child.exitcode, flush=True)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "worker stopping cleanly 143" in done.stdout and "parent done 0" in done.stdout


CHILD = """
import os, sys, time
from ce_pretrain.stopping import PARENT_ENV, StopRequest
with StopRequest() as stop:
    assert PARENT_ENV not in os.environ  # consumed: its own children do not inherit it
    open(sys.argv[1] + ".ready", "w").close()
    while not stop.signal:
        time.sleep(0.02)
open(sys.argv[1], "w").write(str(stop.signal))
"""

PARENT = """
import os, subprocess, sys
from ce_pretrain.stopping import PARENT_ENV
child = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], env={**os.environ, PARENT_ENV: str(os.getpid())})
print(child.pid, flush=True)
child.wait()
"""


def _wait_for(predicate, seconds):
    deadline = time.time() + seconds
    while not predicate() and time.time() < deadline:
        time.sleep(0.05)
    return predicate()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_child_of_a_parent_killed_by_sigkill_is_stopped_not_orphaned(tmp_path):
    """The feature study starts its runs with PARENT_ENV; a study killed with kill -9 (an OOM killer, a scheduler
    after its grace period) used to leave them training on, holding their folders' locks against the rerun."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's; elsewhere the child goes on as before")
    (tmp_path / "child.py").write_text(CHILD)
    done = tmp_path / "stopped"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "child.py"), str(done)],
                              stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert _wait_for(Path(f"{done}.ready").exists, 60), "the child never started"
    parent.kill()  # SIGKILL: no handler of the parent runs
    parent.wait()
    assert _wait_for(done.exists, 30), "the orphan was not stopped"
    assert done.read_text() == str(int(signal.SIGTERM))  # as a SIGTERM: a run saves its checkpoint and stops
    assert _wait_for(lambda: _gone(child_pid), 10), "the child still runs"
