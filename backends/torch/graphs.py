"""One CUDA graph per denoising step: the decoder, the head and the sampler of B rows replayed as one launch.

Eager PyTorch launches several hundred kernels per step (SPEC §5); a graph replays them with one. A graph holds
fixed shapes and addresses, so it is captured per key:
- the rows' cache slots (their number is the batch size; consecutive slots read the cache without a copy),
- the cache view length (cache.view_size: a multiple of 1024, so one graph serves a whole range of lengths; the
  rows' true lengths are a device input, masked in the graph),
- whether any row pins tokens, and the stability history depth.
The step's inputs are copied into the graph's own buffers before each replay and its outputs copied out after,
so states stay ordinary tensors the engine may take, cat and keep. The step never writes the cache (commits and
prefill stay eager), and nothing in it reads the device back: the loop's one host read is the done vector.

Graphs share one memory pool and are replayed one at a time; at most LIMIT are kept (least recently used
first out). They read the cache they were captured with, so a step on another cache object drops them all.
DGRUN_CUDA_GRAPHS=0 turns them off.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import fields

import torch

from dgrun.backends.torch.cache import view_size
from dgrun.backends.torch.sampler import State

LIMIT = 16
WARMUP = 2  # eager runs on a side stream before capture: Triton compiles, cuBLAS picks its kernels


class Graph:
    def __init__(self, backend, state: State, cache, pool):
        self.inputs = State(**{f.name: _clone(getattr(state, f.name)) for f in fields(State)})
        slots = state.slot.tolist()
        self.lengths = torch.zeros(len(slots), dtype=torch.int64, device=backend.device)
        self.static = backend.static_view(slots, cache, self.lengths)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                backend.step_with(self.inputs, cache, self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = backend.step_with(self.inputs, cache, self.static)

    def replay(self, state: State, backend, cache) -> State:
        backend.static_view(state.slot.tolist(), cache, self.lengths)
        for f in fields(State):
            v = getattr(state, f.name)
            if v is not None and f.name != "slot":
                getattr(self.inputs, f.name).copy_(v)
        self.graph.replay()
        out = {f.name: _clone(getattr(self.outputs, f.name)) for f in fields(State)}
        out["slot"] = state.slot
        return State(**out)


class StepGraphs:
    def __init__(self, backend):
        self.backend = backend
        self.graphs: OrderedDict = OrderedDict()
        self.pool = None
        self.cache = lambda: None  # a weak reference: the graphs never keep a cache alive

    def step(self, state: State, cache) -> State:
        if self.cache() is not cache:  # captured addresses belong to another cache, maybe freed
            self.graphs.clear()
            self.pool = None
            self.cache = weakref.ref(cache)
        slots = state.slot.tolist()
        size = view_size(max(cache.lengths[s] for s in slots), cache.max_len)
        key = (tuple(slots), size, state.fixed is None, state.history.shape[0])
        graph = self.graphs.pop(key, None)
        if graph is None:
            graph = Graph(self.backend, state, cache, self.pool)
            self.pool = graph.graph.pool()
            while len(self.graphs) >= LIMIT:
                self.graphs.popitem(last=False)
        self.graphs[key] = graph
        return graph.replay(state, self.backend, cache)


def _clone(v):
    return None if v is None else v.clone()
