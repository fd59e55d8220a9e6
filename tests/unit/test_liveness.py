"""A claim's owner counts as dead once it can never act again: gone, a zombie, exiting, or with
SIGKILL pending (a worker killed whole, whose message RabbitMQ redelivers at once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from worker.engine.liveness import owner_is_dead, owner_of_this_process, sigkill_pending
from worker.store.events import worker_actor

STATUS = """Name:\tcelery
State:\tD (disk sleep)
SigQ:\t1/31362
SigPnd:\t{thread}
ShdPnd:\t{shared}
SigBlk:\t0000000000000000
"""


def status(thread: int = 0, shared: int = 0) -> str:
    return STATUS.format(thread=f"{thread:016x}", shared=f"{shared:016x}")


def test_a_pending_sigkill_is_seen_in_either_mask() -> None:
    kill = 1 << (signal.SIGKILL - 1)
    assert sigkill_pending(status(shared=kill))  # os.killpg: the whole group
    assert sigkill_pending(status(thread=kill | 1))
    assert not sigkill_pending(status(thread=1 << (signal.SIGTERM - 1)))  # may be handled
    assert not sigkill_pending(status())
    assert not sigkill_pending("SigPnd:\tnot hex\n")


def test_this_process_is_alive_and_a_killed_one_is_dead() -> None:
    assert not owner_is_dead(owner_of_this_process(worker_actor()))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = f"worker:{worker_actor().split(':')[1]}:{child.pid}"
        assert not owner_is_dead(owner)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        # Not reaped yet: a zombie, or on its way there; dead either way.
        while not owner_is_dead(owner):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()


def test_a_forked_child_names_itself_not_the_parent_it_was_copied_from() -> None:
    """The owner string is kept per process: a pool process forked after its parent claimed
    something names its own pid and start mark, never the parent's kept one."""
    from worker.engine.liveness import start_mark

    parent = owner_of_this_process(worker_actor())  # kept in the parent before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it would name itself, then leave at once
        os.close(read)
        owner = owner_of_this_process(worker_actor())
        fresh = f"{worker_actor()}@{start_mark(os.getpid())}"
        os.write(write, f"{owner}\n{fresh}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        owner, fresh = answer.read().split("\n")
    os.waitpid(pid, 0)
    assert owner == fresh
    assert owner != parent and f":{pid}@" in owner
    assert owner_of_this_process(worker_actor()) == parent
