"""casa.workers: a pool's workers live while their parent does and end soon after it is killed."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# a parent that starts one worker, prints its pid, and keeps it busy for two minutes
PARENT = textwrap.dedent("""
    import os, time
    from casa.workers import process_pool
    pool = process_pool(1)
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 120)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_pool_workers_end_with_their_killed_parent(sig):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    worker = None
    try:
        worker = int(parent.stdout.readline())
        time.sleep(2.5)  # over two of the watcher's one-second checks
        assert _alive(worker), "the worker ended while its parent was alive"
        parent.send_signal(sig)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived its killed parent by 10 s"
    finally:
        parent.kill()
        parent.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


# a parent whose `with process_pool` block is left by Ctrl-C while its worker trains for two minutes
INTERRUPTED = textwrap.dedent("""
    import os, signal, time
    from casa.workers import process_pool
    with process_pool(1) as pool:
        print(pool.submit(os.getpid).result(), pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN,
              flush=True)
        pool.submit(time.sleep, 120)
        time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_ends_a_pool_and_its_workers_within_seconds():
    """Workers leave Ctrl-C to the parent; the parent's pool, left by the KeyboardInterrupt, ends the busy
    worker and returns at once instead of waiting for its task (once seen as Ctrl-C ignored for 50 s)."""
    parent = subprocess.Popen([sys.executable, "-c", INTERRUPTED], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    worker = None
    try:
        pid, ignores = parent.stdout.readline().split()
        worker = int(pid)
        assert ignores == "True"
        time.sleep(0.5)
        t0 = time.monotonic()
        parent.send_signal(signal.SIGINT)
        parent.wait(10)
        assert time.monotonic() - t0 < 5 and parent.returncode != 0
        assert "KeyboardInterrupt" in parent.stderr.read()
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        parent.kill()
        parent.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)
