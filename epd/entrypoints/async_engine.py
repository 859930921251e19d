"""An engine (in-process or a cluster of instance processes) driven from asyncio.

One background thread owns the engine and runs its loop; coroutines submit requests and
read their outputs through thread-safe hand-offs. Every other part of the server stays
async and never blocks on the model.

    engine = AsyncEngine(EngineArgs(model=...))
    async for out in engine.generate(prompt, params, request_id):   # cumulative outputs
        ...
    record = await engine.set_roles("P1", "D")   # once it rejoined (epd.cluster.router.role_switch)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from epd.entrypoints.backend import role_control
from epd.entrypoints.options import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.inputs.types import ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


class AsyncEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args = args.resolved()  # a Hub id: its local snapshot, for every consumer
        self.processor = InputProcessor.from_pretrained(args.model, limits=args.limits)
        self.engine = args.build(self.processor)
        self.roles = role_control(self.engine)
        self.max_model_len = self.engine.max_model_len
        self._switch_waiters: set[Callable[[object], None]] = set()  # engine thread only
        self._submit: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, SamplingParams]] = {}
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="epd-engine", daemon=True)
        self._thread.start()

    # ---- the async API ------------------------------------------------------------------------

    async def generate(
        self, prompt: ProcessedPrompt, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs as the request advances; the last one has `finished`.

        Cancelling the iteration (e.g. the client went away) aborts the request and frees
        its blocks.
        """
        self._check_running()
        stream: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = (asyncio.get_running_loop(), stream, params)
        self._post(("add", request_id, prompt, params, time.time()))
        # The engine holds the prompt now. This frame may outlive the request in a garbage cycle
        # (a cancelled stream's traceback) until a full collection: it must not keep the prompt's
        # images (shared memory: epd.cluster.shared_files) that long.
        del prompt
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def prepare_images(self, prompt: ProcessedPrompt) -> ProcessedPrompt:
        """From a worker thread, before `generate`: see EngineBackend.prepare_images (blocks)."""
        return self.engine.prepare_images(prompt)

    @property
    def num_requests(self) -> int:
        """Requests admitted and not finished (for admission control)."""
        return len(self._streams)

    def is_healthy(self) -> bool:
        """Whether every request can be served now: the loop runs and every role has a live
        instance (some instances may be down: degraded, see `missing_roles`)."""
        return self.is_running() and not self.engine.missing_roles()

    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def missing_roles(self) -> list[str]:
        return self.engine.missing_roles()

    def instance_stats(self) -> dict[str, dict[str, float]]:
        """Latest figures per instance (see epd.cluster.stats.STAT_HELP)."""
        return self.engine.instance_stats()

    def instances_up(self) -> dict[str, bool]:
        """Each instance's liveness; none is up for the API once the engine thread is gone."""
        running = self.is_running()
        return {name: up and running for name, up in self.engine.instances_up().items()}

    def instances(self) -> list[dict]:
        """Every instance: {"id", "roles", "device", "state"} (epd.entrypoints.backend.RoleControl)."""
        running = self.is_running()
        return [i if running else {**i, "state": "down"} for i in self.roles.instances()]

    def role_switches(self) -> list[dict]:
        return self.roles.role_switches()

    async def set_roles(self, instance: str, roles: str) -> dict:
        """Switch `instance` to `roles`; the switch's record once it rejoined (or failed: its
        "error"). A SwitchError (epd.cluster.router.role_switch) if it cannot start."""
        self._check_running()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(result: object) -> None:
            if not done.done():
                if isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(result)

        def reply(result: object) -> None:  # from the engine thread
            try:
                loop.call_soon_threadsafe(settle, result)
            except RuntimeError:
                pass  # the event loop is closed: nobody waits any more

        self._post(("roles", instance, roles, reply))
        return await done

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop, abort what is left, stop every instance process. Idempotent."""
        self._stop.set()
        self._thread.join(timeout)
        self.engine.shutdown()

    def _post(self, item: tuple) -> None:
        """Hand work to the engine thread, and wake it if it is waiting inside a step."""
        self._submit.put(item)
        self.engine.wake()

    # ---- the engine thread --------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._stop.is_set() or self._error is not None:
            raise RuntimeError("the engine is not running")

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                idle = self._take_submissions()
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                elif idle:
                    self._wait_for_work()
        except BaseException as err:  # the engine died: fail every waiter, never hang them
            logger.exception("engine loop failed")
            self._error = err
            for request_id in list(self._streams):
                self._push(request_id, RuntimeError(f"engine failed: {err}"))
        finally:
            for waiter in list(self._switch_waiters):
                waiter(RuntimeError("the engine stopped before the role switch finished"))

    def _wait_for_work(self) -> None:
        self._deliver(self.engine.poll_idle())
        try:
            item = self._submit.get(timeout=IDLE_WAIT_S)
        except queue.Empty:
            return
        self._handle(item)

    def _take_submissions(self) -> bool:
        idle = True
        while True:
            try:
                item = self._submit.get_nowait()
            except queue.Empty:
                return idle
            idle = False
            self._handle(item)

    def _handle(self, item: tuple) -> None:
        if item[0] == "add":
            _, request_id, prompt, params, arrival = item
            try:
                self.engine.add_request(request_id, prompt, params, arrival)
            except (ValueError, RuntimeError) as err:  # this request cannot run (e.g. no live P)
                self._push(request_id, err)
        elif item[0] == "abort":
            self.engine.abort_request(item[1])
        elif item[0] == "roles":
            self._start_switch(*item[1:])

    def _start_switch(self, instance: str, roles: str, reply: Callable[[object], None]) -> None:
        from epd.cluster.router.role_switch import SwitchError

        def done(record: object) -> None:
            self._switch_waiters.discard(done)
            reply(record)

        self._switch_waiters.add(done)
        try:
            self.roles.set_roles(instance, roles, done)
        except SwitchError as err:
            done(err)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            if not out.finished:
                text = self._stream_text(out, target[2])
                out = replace(out, outputs=[replace(out.outputs[0], text=text)])
            self._push(out.request_id, out)

    def _stream_text(self, out: RequestOutput, params: SamplingParams) -> str:
        """Text safe to show before the end: instances send text only when they finish, and a
        stop string may still cut the tail, so the last len(longest stop) - 1 chars wait."""
        completion = out.outputs[0]
        text = self.processor.tokenizer.decode(completion.token_ids, params.skip_special_tokens)
        if params.stop:
            text = text[: max(0, len(text) - max(len(s) for s in params.stop) + 1)]
        return text.rstrip("\ufffd")  # an incomplete UTF-8 sequence is not text yet

    def _push(self, request_id: str, item: object) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream, _ = target
            loop.call_soon_threadsafe(stream.put_nowait, item)
