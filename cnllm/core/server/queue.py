"""Worker slots for the server: ``--parallel`` generators, a bounded waiting line, 503 beyond it.

A request leases a slot (one generator: a llama.cpp context, or the shared transformers model)
and runs its blocking work in a thread; the slot comes back when that thread ends, which for a
stream is as soon as its client goes away (the stream is cancelled and stops at its next token).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator, TypeVar

from cnllm.core.generation.base import Generator

T = TypeVar("T")


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full."""


class SlotPool:
    def __init__(self, generators: list[Generator], max_waiting: int):
        self.generators = generators
        self.max_waiting = max_waiting
        self.waiting = 0
        self._free: asyncio.Queue[Generator] = asyncio.Queue()
        for generator in generators:
            self._free.put_nowait(generator)
        self._executor = ThreadPoolExecutor(max_workers=len(generators), thread_name_prefix="cnllm-slot")

    @property
    def busy(self) -> int:
        return len(self.generators) - self._free.qsize()

    async def acquire(self) -> Generator:
        """A free generator, waiting in line if needed; :class:`QueueFull` when the line is full too."""
        if self._free.empty() and self.waiting >= self.max_waiting:
            raise QueueFull(f"all {len(self.generators)} slots are busy and {self.waiting} requests are waiting")
        self.waiting += 1
        try:
            return await self._free.get()
        finally:
            self.waiting -= 1

    def _release_from_thread(self, loop: asyncio.AbstractEventLoop, generator: Generator) -> None:
        try:
            loop.call_soon_threadsafe(self._free.put_nowait, generator)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting for the slot
            pass

    async def run(self, work: Callable[[Generator], T]) -> T:
        """Lease a slot, run ``work(generator)`` in its thread, return the result."""
        generator = await self.acquire()
        loop = asyncio.get_running_loop()

        def job() -> T:
            try:
                return work(generator)
            finally:
                self._release_from_thread(loop, generator)

        return await loop.run_in_executor(self._executor, job)

    def release(self, generator: Generator) -> None:
        """Give back a slot leased by :meth:`acquire` that no thread was started for."""
        self._free.put_nowait(generator)

    def stream(self, generator: Generator, items: Iterator[T], cancel: Callable[[], None]) -> AsyncIterator[T]:
        """Run ``items`` (a lazy iterator using ``generator``) in the slot's thread now; iterate the result asynchronously.

        The thread starts at once and releases the slot when it ends, even if the response is
        never sent. When the consumer stops early (client disconnected), ``cancel()`` tells the
        producer to stop at its next token.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def deliver(item, error=None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (item, error))
            except RuntimeError:  # the event loop is gone (shutdown)
                cancel()

        def job() -> None:
            try:
                for item in items:
                    deliver(item)
                deliver(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                deliver(done, exc)
            finally:
                self._release_from_thread(loop, generator)

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

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for generator in {id(g): g for g in self.generators}.values():
            generator.close()
