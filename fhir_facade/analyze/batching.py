"""Cross-study batching (ADR 0036): concurrent analyses share one model session, and each model call
takes slices from several studies.

Why: the model is cheapest per slice in big batches (on a GPU a 1,000-slice batch takes 0.14 s),
but one study's pipeline hands over a few slices at a time (the manifest's `batch_size`, as they
stream in from the PACS). `InferenceBatcher` collects what all running analyses hand over and
forms each batch from several studies:

- a batch runs when it has `max_batch` slices, or when its oldest slice has waited `max_wait`
  seconds (and a batch slot is free: `in_flight` batches run at once, 1 on a CPU whose cores the
  session already uses);
- slices are taken round-robin across studies, one slice per study in turn, least recently served
  study first, so a 2-slice study queued behind a 200-slice one rides in the next batch instead of
  waiting for the big one to finish (fair scheduling);
- the model runs in the batcher's own worker thread, never on the event loop;
- results go back to each caller's future, in its own row order;
- a batch that fails with a study-specific error (`InferenceError`, a bad array) is re-run one
  study at a time, so only the study that fails gets the error; `InferenceUnavailable` (the
  inference server is down) fails every caller of that batch, since re-running would not help.
  A caller that is cancelled (time limit, DELETE of its job) leaves the queue; rows already in a
  running batch are computed and dropped.

Works with any backend that takes an (N, ...) float32 array and returns (N, classes) rows: ONNX
Runtime, KServe v2, or another session behind `InferenceBackend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fhir_facade.analyze.inference import (
    InferenceBackend,
    InferenceError,
    InferenceUnavailable,
    _input_shape,
)

__all__ = ["BatchRecord", "InferenceBatcher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRecord:
    """One model call: which studies' slices it held (in batch order) and how long it took."""

    parts: tuple[tuple[Hashable, int], ...]
    seconds: float

    @property
    def size(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def studies(self) -> frozenset[Hashable]:
        return frozenset(key for key, _ in self.parts)


@dataclass(eq=False)
class _Request:
    """One caller's rows; `taken` of them are in batches so far, `done` have results."""

    key: Hashable
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    arrived: float
    taken: int = 0
    done: int = 0
    out: np.ndarray | None = None
    seconds: float = 0.0  # share of the model time of the batches it was in
    closed: bool = False  # failed or cancelled: its remaining rows are not batched

    @property
    def left(self) -> int:
        return len(self.rows) - self.taken


@dataclass
class _Part:
    request: _Request
    start: int
    stop: int


@dataclass
class BatcherStats:
    """Counters since start: model calls, slices through them, and (study, batch) pairs."""

    batches: int = 0
    slices: int = 0
    study_slots: int = 0
    inference_seconds: float = 0.0
    recent: deque[BatchRecord] = field(default_factory=lambda: deque(maxlen=512))


class InferenceBatcher:
    """Batches the slices of concurrent analyses through one backend (see the module docstring).

    Created on the event loop it serves; `infer` is the one entry point, `aclose` ends it. The
    dispatcher task starts with the first request.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        *,
        max_batch: int = 8,
        max_wait: float = 0.005,
        in_flight: int = 1,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.in_flight = in_flight
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._shape = _input_shape(backend.manifest)
        # Studies with rows waiting, least recently served first; each a FIFO of its requests.
        self._queues: OrderedDict[Hashable, deque[_Request]] = OrderedDict()
        self._queued = 0
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(in_flight)
        self._executor = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="inference")
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- callers ----------------------------------------------------------------------------------

    async def infer(self, key: Hashable, batch: np.ndarray) -> np.ndarray:
        """Probabilities, one row per row of `batch`, computed in shared batches. `key` names the
        study (or analysis) the rows belong to: the unit of fairness."""
        outputs, _ = await self.infer_with_share(key, batch)
        return outputs

    async def infer_with_share(self, key: Hashable, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """`infer`, and this request's share of the model's time: each batch's seconds split by
        the rows it held (what the study cost the model, not the time it waited in the queue)."""
        if self._closed:
            raise InferenceError(f"the batcher of model {self.backend.manifest.id} is closed")
        if not isinstance(batch, np.ndarray) or batch.ndim != 4 or tuple(batch.shape[1:]) != self._shape:
            shape = getattr(batch, "shape", type(batch).__name__)
            raise ValueError(f"batch has shape {shape}, model expects (N, *{self._shape})")
        if batch.shape[0] == 0:
            return np.empty((0, len(self.backend.manifest.output.labels)), dtype=np.float32), 0.0
        loop = asyncio.get_running_loop()
        request = _Request(
            key, np.ascontiguousarray(batch, dtype=np.float32), loop.create_future(), time.monotonic()
        )
        self._queues.setdefault(key, deque()).append(request)
        self._queued += len(batch)
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name="inference-batcher")
        self._wake.set()
        try:
            return await request.future, request.seconds
        except asyncio.CancelledError:
            self._close_request(request)
            raise

    async def aclose(self) -> None:
        """Stop dispatching; callers still waiting get `InferenceError`. Running batches finish."""
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for queue in list(self._queues.values()):
            for request in list(queue):
                self._fail(request, InferenceError("the inference batcher was closed"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=False)

    # -- dispatching ------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            while self._queued == 0:
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()
            try:
                await self._fill()
                parts = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not parts:
                self._slots.release()
                continue
            task = asyncio.create_task(self._execute(parts))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _fill(self) -> None:
        """Wait until `max_batch` rows are queued or the oldest one has waited `max_wait`."""
        while 0 < self._queued < self.max_batch:
            oldest = min(
                (r.arrived for queue in self._queues.values() for r in queue if not r.closed),
                default=None,
            )
            if oldest is None:
                return
            remaining = oldest + self.max_wait - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Part]:
        """Up to `max_batch` rows, one per study in turn, least recently served study first."""
        parts: list[_Part] = []
        size = 0
        while size < self.max_batch and self._queues:
            key, queue = next(iter(self._queues.items()))
            while queue and (queue[0].closed or queue[0].left == 0):
                queue.popleft()
            if not queue:
                del self._queues[key]
                continue
            request = queue[0]
            row = request.taken
            request.taken += 1
            self._queued -= 1
            size += 1
            last = parts[-1] if parts else None
            if last is not None and last.request is request and last.stop == row:
                last.stop += 1
            else:
                parts.append(_Part(request, row, row + 1))
            self._queues.move_to_end(key)
            if request.left == 0:
                queue.popleft()
                if not queue:
                    del self._queues[key]
        return _merged(parts)

    async def _execute(self, parts: list[_Part]) -> None:
        try:
            rows = np.concatenate([p.request.rows[p.start : p.stop] for p in parts])
            try:
                outputs, seconds = await self._run(rows)
            except InferenceUnavailable as exc:
                for part in parts:
                    self._fail(part.request, exc)
                return
            except Exception as exc:
                await self._isolate(parts, exc)
                return
            self._record(parts, seconds)
            offset = 0
            for part in parts:
                n = part.stop - part.start
                self._deliver(part, outputs[offset : offset + n], seconds * n / len(rows))
                offset += n
        finally:
            self._slots.release()

    async def _isolate(self, parts: list[_Part], error: Exception) -> None:
        """A failed batch again, one study's rows at a time: only the failing study gets an error."""
        requests = list(dict.fromkeys(p.request for p in parts))
        if len(requests) == 1:
            self._fail(requests[0], error)
            return
        log.warning("A batch of %d studies failed (%s); re-running each study alone", len(requests), error)
        for request in requests:
            own = [p for p in parts if p.request is request]
            if request.closed:
                continue
            rows = np.concatenate([request.rows[p.start : p.stop] for p in own])
            try:
                outputs, seconds = await self._run(rows)
            except Exception as exc:
                self._fail(request, exc)
                continue
            self._record(own, seconds)
            offset = 0
            for part in own:
                n = part.stop - part.start
                self._deliver(part, outputs[offset : offset + n], seconds * n / len(outputs))
                offset += n

    async def _run(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        outputs = await loop.run_in_executor(self._executor, self.backend.infer, rows)
        seconds = time.perf_counter() - t0
        if len(outputs) != len(rows):
            raise InferenceError(f"the model returned {len(outputs)} rows for {len(rows)} slices")
        return outputs, seconds

    # -- bookkeeping ------------------------------------------------------------------------------

    def _record(self, parts: list[_Part], seconds: float) -> None:
        record = BatchRecord(tuple((p.request.key, p.stop - p.start) for p in parts), seconds)
        stats = self.stats
        stats.batches += 1
        stats.slices += record.size
        stats.study_slots += len(record.studies)
        stats.inference_seconds += seconds
        stats.recent.append(record)
        if self.on_batch is not None:
            try:
                self.on_batch(record)
            except Exception:  # an observer must not break inference
                log.exception("on_batch hook failed")

    def _deliver(self, part: _Part, outputs: np.ndarray, seconds: float) -> None:
        request = part.request
        if request.closed:
            return
        request.seconds += seconds
        if request.out is None:
            request.out = np.empty((len(request.rows), outputs.shape[1]), dtype=outputs.dtype)
        request.out[part.start : part.stop] = outputs
        request.done += part.stop - part.start
        if request.done == len(request.rows) and not request.future.done():
            request.future.set_result(request.out)

    def _fail(self, request: _Request, error: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._close_request(request)

    def _close_request(self, request: _Request) -> None:
        """Take the request's rows that are not in a batch yet out of the queue."""
        if request.closed:
            return
        request.closed = True
        self._queued -= request.left
        request.taken = len(request.rows)
        queue = self._queues.get(request.key)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(request)
            if not queue:
                del self._queues[request.key]


def _merged(parts: list[_Part]) -> list[_Part]:
    """Adjacent rows of one request in one part, keeping the batch order of first appearance per
    request (the order rows are sent in does not change any row's result)."""
    by_request: dict[int, list[_Part]] = {}
    order: list[_Part] = []
    for part in parts:
        same = by_request.setdefault(id(part.request), [])
        if same and same[-1].stop == part.start:
            same[-1].stop = part.stop
            continue
        same.append(part)
        order.append(part)
    return order
