"""Many requests over one batched denoising step: admit, prefill, step, retire.

Rows of different requests share each forward whatever step, block or prompt length each is at: the decoder
takes no timestep, and each row carries its own knobs, positions and random keys (nano-vllm's `LLMEngine.step`
is the shape followed). Prompts go through the encoder one chunk per engine step, so a long prompt never stalls
the rows already denoising. The only host reads are the done vector each step and a finished row's canvas.
"""

from __future__ import annotations

import time
from collections import deque

from dgrun.errors import DgrunError

PREFILL_CHUNK = 512  # prompt tokens encoded per engine step and request


class Engine:
    """Steps dgrun.generate.Request objects (the engine only calls their methods: it imports none of them)."""

    def __init__(self, backend, cache):
        self.backend, self.cache = backend, cache
        self.free = list(range(cache.slots))
        self.waiting: deque = deque()  # not yet holding a slot
        self.prefilling: list = []
        self.running: list = []  # in the order of the state's rows
        self.state = None

    def add(self, req) -> None:
        """Queue a request; it is admitted when a slot is free. req.slot, when set, names a slot whose cached
        context the request continues."""
        need = len(req.prompt) + (0 if req.slot is None else self.cache.lengths[req.slot])
        if need > self.cache.max_len:
            raise DgrunError(f"the prompt is {need} tokens, over the context limit of {self.cache.max_len} "
                             "(-c/--ctx-size)")
        self.waiting.append(req)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def cancel(self, req) -> None:
        """Drop a request at once, wherever it is, and free its slot."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.prefilling:
            self.prefilling.remove(req)
        if req in self.running:
            i = self.running.index(req)
            self._keep([j for j in range(len(self.running)) if j != i])
        self._release(req)
        req.finished = True

    def step(self) -> list:
        """Admit and prefill (one chunk each), then one denoising step of every running row; returns the
        (request, event) pairs it produced."""
        events = self._admit()
        if not self.running:
            return events
        b = self.backend
        self.state = b.step(self.state, self.cache)
        done = b.done(self.state)  # the one host read per step
        drafts = b.canvas(self.state)
        ended = []
        for r, req in enumerate(self.running):
            events.append((req, req.draft(drafts[r], b)))  # a lazy view: read only if a consumer asks
            if done[r] or req.out_of_steps:
                ended.append(r)
        if ended:
            self._end_blocks(ended, done, events)
        return events

    def _admit(self) -> list:
        events = []
        while self.waiting and (self.waiting[0].slot is not None or self.free):
            req = self.waiting.popleft()
            if req.slot is None:
                req.slot = self.free.pop(0)
                self.cache.reset(req.slot)
            elif req.slot in self.free:
                self.free.remove(req.slot)
            self.prefilling.append(req)
        started = []
        for req in list(self.prefilling):
            chunk = req.prompt[req.prefilled:req.prefilled + PREFILL_CHUNK]
            t0 = time.perf_counter()
            self.backend.encode(req.slot, chunk, self.cache)
            req.stats.prefill_seconds += time.perf_counter() - t0
            req.prefilled += len(chunk)
            if len(req.prompt) > PREFILL_CHUNK:
                events.append((req, req.prefill_event()))
            if req.prefilled == len(req.prompt):
                self.prefilling.remove(req)
                started.append(req)
        self._start(started)
        return events

    def _start(self, reqs: list) -> None:
        if not reqs:
            return
        new = self.backend.start([r.row() for r in reqs], self.cache)
        self.state = new if not self.running else self.backend.cat([self.state, new])
        self.running += reqs

    def _keep(self, index: list[int]) -> None:
        self.running = [self.running[i] for i in index]
        self.state = self.backend.take(self.state, index) if index else None

    def _release(self, req) -> None:
        if req.slot is not None and not req.keep_slot and req.slot not in self.free:
            self.free.append(req.slot)

    def _end_blocks(self, ended: list[int], done: list[bool], events: list) -> None:
        """Hand each finished row's canvas to its request; commit it through the encoder and start the next
        block, or retire the request."""
        b, c = self.backend, self.backend.args.canvas_length
        canvases = b.tolist(b.canvas(self.state))  # B x C ids: one small read when blocks end
        again = []
        for r in ended:
            canvas = canvases[r]
            req = self.running[r]
            room = self.cache.lengths[req.slot] + c <= self.cache.max_len
            events.append((req, req.end_block(canvas, bool(done[r]), room)))
            if req.finished:
                self._release(req)
            else:
                b.encode(req.slot, canvas, self.cache)  # commit the argmax canvas through the causal encoder
                again.append(req)
        self._keep([r for r in range(len(self.running)) if r not in set(ended)])
        self._start(again)
