"""Work run on a thread pool while a generator reports progress (pull, delta apply and
delta create all import or build several layers at once this way)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

Event = dict[str, Any]
J = TypeVar("J")
R = TypeVar("R")

PROGRESS_STEP = 4 << 20         # bytes between two progress events of one component


class EventChannel:
    """Thread-safe event channel from worker threads to a generator; byte progress is
    coalesced per component."""

    def __init__(self) -> None:
        self.q: queue.Queue[Event] = queue.Queue()

    def put(self, ev: Event) -> None:
        """Queue one event."""
        self.q.put(ev)

    def progress(self, ident: str, total: int) -> Callable[[int], None]:
        """A callback reporting cumulative bytes of *ident* (every PROGRESS_STEP bytes)."""
        last = [0]

        def cb(count: int) -> None:
            if count - last[0] >= PROGRESS_STEP or count == total:
                last[0] = count
                self.q.put({"progress": {"id": ident, "fetched": count, "total": total}})
        return cb

    def drain(self) -> list[Event]:
        """Every event queued so far."""
        out = []
        while True:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                return out


def run_pooled(jobs: Iterable[J], run: Callable[[J], R], workers: int, events: EventChannel,
               cancel: threading.Event, name: str,
               on_done: Callable[[J, R], Iterable[Event]],
               keep: Callable[[J, R], None] | None = None) -> Generator[Event, None, None]:
    """``run(job)`` for every job on *workers* threads, in the order given.

    Yields the workers' events and whatever ``on_done(job, result)`` returns as each job
    finishes.  On any failure (or when the consumer stops) *cancel* is set, the pool is
    drained, and results that finished but were never handed to ``on_done`` go to
    ``keep(job, result)`` so that the caller can clean them up.
    """
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    futures = {ex.submit(run, j): j for j in jobs}
    consumed: set[concurrent.futures.Future[R]] = set()
    try:
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(
                pending, timeout=0.1, return_when=concurrent.futures.FIRST_COMPLETED)
            yield from events.drain()
            for f in done:
                consumed.add(f)
                yield from on_done(futures[f], f.result())
        yield from events.drain()
    except BaseException:
        cancel.set()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        if keep is not None:
            for f, job in futures.items():
                if f not in consumed and f.done() and not f.cancelled() \
                        and f.exception() is None:
                    keep(job, f.result())
