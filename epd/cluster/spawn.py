"""Instance processes of the local launcher (epd.cluster.launcher): started with multiprocessing's
spawn, and clear errors when that cannot work.

A spawned child first re-runs the caller's main module (as `__mp_main__`, so that what the
parent pickled can be found), and only then runs `instance_main`. A script that builds a
multi-instance LLM at import time, without `if __name__ == "__main__":`, thus builds one again in
every child, where multiprocessing refuses to start processes ("An attempt has been made to start
a new process before the current process has finished its bootstrapping phase") and the child
dies before it knows where the router is. What each side does about it:

| where                        | what                                                                |
|------------------------------|---------------------------------------------------------------------|
| parent, starting children    | `children_report_to`: the router address, in their environment     |
| child, re-running main       | `refuse_in_bootstrapping_child`: reports the unguarded entry point  |
|                              | to that address (with where it was called), exits                   |
| parent, child dead, no report| `exited_during_startup`: says the main module may be the cause      |
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Callable, Iterator

import zmq

from epd.cluster.messages import InstanceFailed, encode

REPORT_ADDRESS_ENV = "EPD_STARTUP_REPORT_ADDRESS"
PROCESS_PREFIX = "epd-"  # process names: "epd-P0"
REPORT_LINGER_MS = 5000
GUARD = 'if __name__ == "__main__":'


def start_process(name: str, target: Callable[..., None], *args: object) -> mp.process.BaseProcess:
    spawn = mp.get_context("spawn")
    proc = spawn.Process(target=target, args=args, name=f"{PROCESS_PREFIX}{name}", daemon=True)
    proc.start()
    return proc


@contextlib.contextmanager
def children_report_to(address: str) -> Iterator[None]:
    """Children started in this block find the router at `address` even before they know their
    InstanceConfig (it is unpickled after the main module ran): they inherit the environment at start."""
    previous = os.environ.get(REPORT_ADDRESS_ENV)
    os.environ[REPORT_ADDRESS_ENV] = address
    try:
        yield
    finally:
        if previous is None:
            del os.environ[REPORT_ADDRESS_ENV]
        else:
            os.environ[REPORT_ADDRESS_ENV] = previous


def refuse_in_bootstrapping_child() -> None:
    """In a child that is still re-running the main module, stop before starting instances of its own:
    tell the parent why (it would see only an exit code otherwise) and exit. Elsewhere, nothing."""
    # What multiprocessing's own check reads (spawn._check_not_importing_main): set only while a
    # spawned child prepares, i.e. imports the parent's main module.
    if not getattr(mp.current_process(), "_inheriting", False):
        return
    process_name = mp.current_process().name  # set from the parent's before the main module runs
    error = _unguarded_main_error(traceback.extract_stack()[:-1])
    address = os.environ.get(REPORT_ADDRESS_ENV)
    if address is None or not process_name.startswith(PROCESS_PREFIX):
        raise RuntimeError(error)  # not one of our instances: say it here
    report_to_router(address, InstanceFailed(process_name.removeprefix(PROCESS_PREFIX), error))
    raise SystemExit(1)  # quietly: the parent raises with this error


def _unguarded_main_error(stack: list[traceback.FrameSummary]) -> str:
    """What to tell a script that starts an engine at import time; `stack` is the child's."""
    frames = _from_main_module(stack)
    main = frames[0].filename if frames else "your script"
    return (
        f"a spawned process re-ran your main module ({main}), which starts a multi-instance "
        "engine when imported. A spawned process imports the main module before anything else, and "
        "multiprocessing refuses to start processes from there ('An attempt has been made to start a "
        "new process before the current process has finished its bootstrapping phase').\n"
        f"Fix: start the engine only under `{GUARD}` in your script, e.g.\n\n"
        f"    {GUARD}\n"
        '        with LLM(model, layout="1E+1P+1D") as llm:\n'
        "            ...\n\n"
        f"Where the instance process ran into it:\n{''.join(traceback.format_list(frames))}"
    )


def exited_during_startup(instance: str, exitcode: int | None) -> RuntimeError:
    """The error for an instance that died during start-up without saying why."""
    message = f"instance {instance} exited during start-up (code {exitcode}) without reporting an error"
    main = _main_module_children_import()
    if main is not None:
        message += (
            f". Spawned instance processes first import your main module ({main}); if importing it "
            f"fails or starts work, guard the entry point with `{GUARD}`. The instance's own "
            "traceback, if any, went to stderr"
        )
    return RuntimeError(message)


def report_to_router(address: str, message: InstanceFailed) -> None:
    """Send `message` to the router at `address` from a process that has no socket to it (yet)."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.connect(address)
        sock.send(encode(message))
        sock.close(linger=REPORT_LINGER_MS)
    finally:
        ctx.term()  # returns once the report is out (or the linger ran out)


def _from_main_module(stack: list[traceback.FrameSummary]) -> list[traceback.FrameSummary]:
    """The stack from the main module's line on: without multiprocessing's and runpy's frames."""
    machinery = (os.path.dirname(mp.__file__), "<")  # multiprocessing, <frozen runpy>, <string>
    start = next((i for i, f in enumerate(stack) if not f.filename.startswith(machinery)), 0)
    return list(stack[start:])


def _main_module_children_import() -> str | None:
    """What a spawned child imports first (as multiprocessing decides), or None (python -c, a REPL)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is None:  # a script: run again by path
        return getattr(main, "__file__", None)
    if spec.name == "__main__" or spec.name.endswith(".__main__"):
        return None  # `python -m package`: multiprocessing leaves it alone
    return spec.name
