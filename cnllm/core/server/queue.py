"""Worker slots for the server: ``--parallel`` generators, a bounded waiting line, 503 beyond it.

A request leases a slot (one generator: a llama.cpp context, or the shared transformers model)
and runs its blocking work in a thread; the slot comes back when that thread ends. Work is
cancellable: a stream whose client goes away, a non-streaming request whose client hangs up, and
everything in flight when the server stops end at their next token (or the next piece of a prompt being
processed: both backends evaluate long prompts in pieces, a cancellation check between). CPU work before generation
(templating, tokenising) runs in threads too, so the event loop keeps answering ``/health``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator, TypeVar

from cnllm.core.generation.base import LoadedModel

T = TypeVar("T")
PREPARE_THREADS = 2


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full."""


class ShuttingDown(Exception):
    """The server is stopping: no new work starts."""


class ClientGone(Exception):
    """The client closed its connection before its answer was ready; the work was cancelled."""


class SlotPool:
    def __init__(self, generators: list[LoadedModel], max_waiting: int):
        self.generators = generators
        self.max_waiting = max_waiting
        self.waiting = 0
        self.closing = False
        self._free: asyncio.Queue[LoadedModel] = asyncio.Queue()
        for generator in generators:
            self._free.put_nowait(generator)
        self._executor = ThreadPoolExecutor(max_workers=len(generators), thread_name_prefix="cnllm-slot")
        self._prepare = ThreadPoolExecutor(max_workers=PREPARE_THREADS, thread_name_prefix="cnllm-prepare")
        self._cancels: dict[int, Callable[[], None]] = {}
        self._cancels_lock = threading.Lock()
        self._keys = itertools.count()

    @property
    def busy(self) -> int:
        return len(self.generators) - self._free.qsize()

    def _refuse_when_closing(self) -> None:
        if self.closing:
            raise ShuttingDown("the server is shutting down")

    async def prepare(self, work: Callable[[], T]) -> T:
        """Run CPU-bound work that needs no slot (templating, tokenising, checks) off the event loop."""
        self._refuse_when_closing()
        return await asyncio.get_running_loop().run_in_executor(self._prepare, work)

    async def acquire(self) -> LoadedModel:
        """A free generator, waiting in line if needed; :class:`QueueFull` when the line is full too."""
        self._refuse_when_closing()
        if self._free.empty() and self.waiting >= self.max_waiting:
            raise QueueFull(f"all {len(self.generators)} slots are busy and {self.waiting} requests are waiting")
        self.waiting += 1
        try:
            generator = await self._free.get()
        finally:
            self.waiting -= 1
        if self.closing:
            self.release(generator)
            self._refuse_when_closing()
        return generator

    async def lease(self, gone: asyncio.Future | None = None) -> LoadedModel:
        """:meth:`acquire`, leaving the line with :class:`ClientGone` when ``gone`` (the client hung up) completes first."""
        if gone is None:
            return await self.acquire()
        acquiring = asyncio.ensure_future(self.acquire())
        await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not acquiring.done():
            acquiring.cancel()
            try:
                await acquiring
            except asyncio.CancelledError:
                raise ClientGone() from None
        generator = acquiring.result()
        if gone.done():
            self.release(generator)
            raise ClientGone()
        return generator

    def _release_from_thread(self, loop: asyncio.AbstractEventLoop, generator: LoadedModel) -> None:
        try:
            loop.call_soon_threadsafe(self._free.put_nowait, generator)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting for the slot
            pass

    def _track(self, cancel: Callable[[], None]) -> Callable[[], None]:
        """Register ``cancel`` for :meth:`shutdown`; returns the function that unregisters it."""
        key = next(self._keys)
        with self._cancels_lock:
            self._cancels[key] = cancel
        if self.closing:
            cancel()

        def untrack() -> None:
            with self._cancels_lock:
                self._cancels.pop(key, None)

        return untrack

    async def run(self, work: Callable[[LoadedModel], T], *, cancel: Callable[[], None] | None = None, gone: asyncio.Future | None = None) -> T:
        """Lease a slot, run ``work(generator)`` in its thread, return the result.

        ``cancel`` makes the work stop early (it is called at shutdown, and when ``gone`` completes
        first: the client hung up, so the slot is freed at the next token and :class:`ClientGone` raised).
        """
        generator = await self.lease(gone)
        loop = asyncio.get_running_loop()
        untrack = self._track(cancel) if cancel is not None else None

        def job() -> T:
            try:
                return work(generator)
            finally:
                if untrack is not None:
                    untrack()
                self._release_from_thread(loop, generator)

        future = loop.run_in_executor(self._executor, job)
        if gone is None or cancel is None:
            return await future
        await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        cancel()
        await asyncio.wait({future})  # the work stops at its next token; its outcome no longer matters
        if not future.cancelled():
            future.exception()
        raise ClientGone()

    def release(self, generator: LoadedModel) -> None:
        """Give back a slot leased by :meth:`acquire` that no thread was started for."""
        self._free.put_nowait(generator)

    def stream(self, generator: LoadedModel, items: Iterator[T], cancel: Callable[[], None]) -> AsyncIterator[T]:
        """Run ``items`` (a lazy iterator using ``generator``) in the slot's thread now; iterate the result asynchronously.

        The thread starts at once and releases the slot when it ends, even if the response is
        never sent. When the consumer stops early (client disconnected), ``cancel()`` tells the
        producer to stop at its next token.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        untrack = self._track(cancel)

        def deliver(item, error=None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (item, error))
            except RuntimeError:  # the event loop is gone (shutdown)
                cancel()

        def job() -> None:
            error = None
            try:
                for item in items:
                    deliver(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                error = exc
            finally:
                untrack()
                # The slot goes back before the end is delivered (the loop runs both in order): once the answer is
                # complete the slot is free, even if the loop closes straight after (a test client's does).
                self._release_from_thread(loop, generator)
                deliver(done, error)

        loop.run_in_executor(self._executor, job)

        async def consume() -> AsyncIterator[T]:
            try:
                while True:
                    item, error = await queue.get()
                    if error is not None:
                        raise error
                    if item is done:
                        return
                    yield item
            finally:
                cancel()

        return consume()

    def shutdown(self) -> None:
        """Stop: refuse new work and cancel what runs (each generation ends at its next token)."""
        self.closing = True
        with self._cancels_lock:
            cancels = list(self._cancels.values())
        for cancel in cancels:
            cancel()

    def close(self) -> None:
        """After :meth:`shutdown`: wait for the worker threads, then free the models (never while a thread still decodes)."""
        self.shutdown()
        self._prepare.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        for generator in {id(g): g for g in self.generators}.values():
            generator.close()
