"""Long jobs of the page (learning) in a worker thread, each one cancellable.

gradio's queue runs one learning job at a time (concurrency_limit=1 on the
event) and shows every later request its place in the line. The job itself
runs in a thread so the page can stream its progress; Cancel sets the job's
threading.Event, which the training loop checks between steps (its `cancel`).
A visitor's event (keyed by gradio's session_hash) exists from the click until the job has ended, so a Cancel
pressed while the job still waits in the line cancels that job, and one pressed
when nothing is pending cancels nothing later.
No gradio here.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

from ..errors import UserError


class Cancels:
    """One cancel event per visitor (browser page), from its click to its job's end."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def open(self, visitor: str) -> None:
        with self._lock:
            self._events[visitor] = threading.Event()

    def get(self, visitor: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(visitor, threading.Event())

    def cancel(self, visitor: str) -> bool:
        """Cancel the visitor's pending or running job; False when it has none."""
        with self._lock:
            event = self._events.get(visitor)
        if event is None:
            return False
        event.set()
        return True

    def close(self, visitor: str) -> None:
        with self._lock:
            self._events.pop(visitor, None)


def run_streaming(work: Callable[[Callable[[object], None]], object], cancel: threading.Event,
                  poll: float = 0.25) -> Iterator[tuple[str, object]]:
    """Run `work(report)` in a thread and yield what it reports as ("report", x), newest only
    (a slow page skips stale ones), then ("done", its result) or ("error", a UserError's
    message). A closed iterator (the browser went away) cancels the work and waits for it."""
    inbox: queue.Queue = queue.Queue()

    def target():
        try:
            inbox.put(("done", work(lambda x: inbox.put(("report", x)))))
        except UserError as e:
            inbox.put(("error", " ".join(str(e).split())))
        except BaseException as e:  # noqa: BLE001 - handed to the page's thread, which re-raises it
            inbox.put(("crash", e))

    thread = threading.Thread(target=target, name="multiconcept-job", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, value = inbox.get(timeout=poll)
            except queue.Empty:
                continue
            while kind == "report" and not inbox.empty():  # skip to the newest report
                kind, value = inbox.get()
            if kind == "crash":
                raise value
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        if thread.is_alive():
            cancel.set()
            thread.join()


class Every:
    """True at most once per `seconds` (and on the first call): how often to redraw heatmaps."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, -float("inf")

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            return True
        return False
