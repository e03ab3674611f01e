"""Blocking engine calls under an asyncio server, without a thread pool to exhaust.

Engine calls block (Docker, agent round trips, a command that runs for an hour), so each
runs on its own daemon thread: a long ``wait`` can never starve other requests, and a
call stuck forever cannot keep the daemon from exiting.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

Kind = Literal["item", "done", "error", "tick"]

#: Streams being read now, so a stopping daemon can end each one with a clear error.
_LIVE: weakref.WeakSet[ThreadStream] = weakref.WeakSet()


def end_streams(reason: BaseException) -> None:
    """End every open stream with ``reason`` (call on the loop's thread)."""
    for stream in list(_LIVE):
        stream.stopped.set()
        stream._q.put_nowait(("error", reason))


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


async def run_sync(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on a fresh daemon thread, awaited."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(_settle, fut, value, error)
        except RuntimeError:  # the loop is gone: the daemon is shutting down
            pass

    threading.Thread(target=work, daemon=True, name=f"aiva-{fn.__name__}").start()
    return await fut


class ThreadStream:
    """Items a worker thread emits, read by a coroutine, with backpressure.

    ``emit`` blocks while ``maxsize`` items are unread, and returns False once the reader
    has gone (client disconnected), so a worker can stop early.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self._loop = asyncio.get_running_loop()
        self._q: asyncio.Queue[tuple[Kind, Any]] = asyncio.Queue()
        self._room = threading.Semaphore(maxsize)
        self.stopped = threading.Event()
        _LIVE.add(self)

    def _put(self, kind: Kind, value: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, (kind, value))
        except RuntimeError:
            self.stopped.set()
            return False
        return True

    def emit(self, item: Any) -> bool:
        while not self._room.acquire(timeout=0.5):
            if self.stopped.is_set():
                return False
        if self.stopped.is_set():
            return False
        return self._put("item", item)

    def start(self, work: Callable[[], Any]) -> None:
        """Run ``work`` on a daemon thread; its result or error ends the stream."""

        def run() -> None:
            try:
                value = work()
            except BaseException as exc:
                self._put("error", exc)
            else:
                self._put("done", value)

        threading.Thread(target=run, daemon=True, name="aiva-stream").start()

    def spawn(self, work: Callable[[], Any]) -> None:
        """Run another producer on a daemon thread; only its error ends the stream."""

        def run() -> None:
            try:
                work()
            except BaseException as exc:
                self._put("error", exc)

        threading.Thread(target=run, daemon=True, name="aiva-stream").start()

    async def events(self, heartbeat: float | None = None) -> AsyncIterator[tuple[Kind, Any]]:
        """``("item", x)`` ... then ``("done", result)`` or ``("error", exc)``; with
        ``heartbeat``, ``("tick", None)`` after that many idle seconds, so a silent
        stream still notices a client that went away."""
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(self._q.get(), heartbeat)
                except TimeoutError:
                    yield "tick", None
                    continue
                if kind == "item":
                    self._room.release()
                yield kind, value
                if kind != "item":
                    return
        finally:
            self.stopped.set()


async def feed_thread(chunks: AsyncIterator[bytes], consume: Callable[[Iterator[bytes]], T],
                      *, maxsize: int = 16) -> T:
    """Stream a request body into ``consume`` (running on a thread) with backpressure.

    If ``consume`` fails early the rest of the body is not read; if the body breaks off
    (client gone), ``consume`` sees the error from its iterator.
    """
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize)

    def items() -> Iterator[bytes]:
        while True:
            item = asyncio.run_coroutine_threadsafe(q.get(), loop).result()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def feed() -> None:
        try:
            async for chunk in chunks:
                if chunk:
                    await q.put(chunk)
        except BaseException as exc:
            await q.put(exc)
            raise
        await q.put(None)

    work = asyncio.ensure_future(run_sync(consume, items()))
    feeder = asyncio.ensure_future(feed())
    await asyncio.wait({work, feeder}, return_when=asyncio.FIRST_COMPLETED)
    if work.done() and not feeder.done():
        feeder.cancel()
    try:
        return await work
    finally:
        await asyncio.gather(feeder, return_exceptions=True)
