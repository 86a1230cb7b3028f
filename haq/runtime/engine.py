"""The CPU-GPU MoE engine: runs an HF MoE model (float or haq int8) whose experts live in host
memory, with a device cache of experts under a byte budget. For every expert call the same policy
objects as the simulator (`haq.runtime.policies`) decide: compute on the CPU, use the resident copy,
or copy the weights over (and whether to keep them). On CUDA, CPU calls run on a worker thread
while the main thread drives device calls, and host -> device copies run on their own stream.
When the "device" is the CPU itself there is nothing to overlap: every call runs in turn on the
calling thread (a worker would only add a thread hand-off per call on the same cores).

Each MoE layer also pre-gates a later one (`haq.runtime.pregate`): the policy's `prefetch` sees that
prediction, and the copies it asks for start at once (on CUDA, on the copy stream). In a prefill forward
(the generator says which forwards are), once a layer's calls are decided, the policy's
`prefill_ahead` may start copies of the next layer's experts into staging buffers (the simulator's
pipelining, same policy code); the next layer serves its calls from them or keeps them, and the
rest are dropped once its calls are issued (on CUDA, weights read on the compute stream are
recorded on it, so no block is handed out again before those reads are done).

The engine knows nothing about tokenization: it takes and returns token ids.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from haq.errors import HaqError
from haq.kernels.moe import ExpertCall, combine, route
from haq.models.adapters import adapter_for
from haq.runtime.engine_view import EngineView
from haq.runtime.hardware import HardwareProfile
from haq.runtime.generation import BatchGenerator, TokenEvent
from haq.runtime.policies import PolicyContext, make_policy
from haq.runtime.predictor import CostPredictor
from haq.runtime.metrics import EngineMetrics, engine_metrics, kv_cache_bytes
from haq.runtime.pregate import PreGate
from haq.runtime.sampling import SamplingParams
from haq.runtime.store import ExpertStore, ExpertWeights, Key, common_math, extract_experts
from haq.runtime.trace import Trace


def _on_host(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
             calls: list[ExpertCall]) -> tuple[torch.Tensor, torch.Tensor, list[ExpertCall]]:
    """A layer's input, top-k weights and calls in host memory, where the CPU calls read them."""
    if hidden.device.type == "cpu":
        return hidden, top_k_weights, calls
    return hidden.cpu(), top_k_weights.cpu(), route(top_k_index.cpu())


class OffloadedExperts(nn.Module):
    """Stands in for a layer's fused experts module; same forward signature."""

    def __init__(self, engine: Engine, layer: int) -> None:
        super().__init__()
        self.engine, self.layer = engine, layer

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.engine.run_experts(self.layer, hidden_states, top_k_index, top_k_weights)


class Engine:
    """Built in two steps: the constructor moves the experts into the store and builds the cost
    predictor; `use_policy` then installs a policy whose context (tuned on a profile by the
    simulator, see `haq.api.build_engine`) needs that predictor."""

    def __init__(self, model: nn.Module, *, budget_bytes: int, hardware: HardwareProfile, device: str = "cpu",
                 cpu_workers: int = 1) -> None:
        adapter = adapter_for(model.config)
        if adapter.moe is None:
            raise HaqError(f"{model.config.model_type} is a dense model: the MoE runtime needs a model with experts")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise HaqError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        self.model = model.eval()
        # the routed experts of the MoE layers (dense layers and shared experts stay on the device);
        # store and trace index them by MoE layer, 0..L-1
        self.moe_layer_index = adapter.moe_layers(model.config)  # decoder layer of each MoE layer
        layers = [adapter.decoder_layers(model)[i] for i in self.moe_layer_index]
        per_layer, maths = [], []
        for layer in layers:
            weights, math = extract_experts(layer.get_submodule(adapter.moe.experts))
            per_layer.append(weights)
            maths.append(math)
        self.store = ExpertStore(per_layer, common_math(maths), pin=self.device.type == "cuda")
        self.expert_bytes = self.store.expert_bytes
        self._check_budget(budget_bytes)
        self.budget_bytes = int(budget_bytes)
        for index, layer in enumerate(layers):
            layer.set_submodule(adapter.moe.experts, OffloadedExperts(self, index))
        self.model.to(self.device)  # everything but the experts, which now live in the store
        self.predictor = CostPredictor(hardware, self.expert_bytes, self._flops_per_token())
        self.cache: dict[Key, ExpertWeights] = {}
        self.record_routing = True  # every forward's routing, for `last_trace`
        self.pending: dict[Key, torch.cuda.Event | None] = {}
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pool = (ThreadPoolExecutor(max_workers=cpu_workers, thread_name_prefix="haq-cpu-expert")
                     if self.device.type != "cpu" else None)
        self.cpu_assigned_s = 0.0
        self.ahead: dict[Key, ExpertWeights] = {}  # this layer's prefill copies started a layer ahead
        self.ahead_next: dict[Key, ExpertWeights] = {}  # the next layer's
        self.prefill_forward = False  # the current forward is a prefill chunk (told by the generator)
        self.pregate = PreGate([layer.get_submodule(adapter.moe.router) for layer in layers], adapter.moe.choices,
                               getattr(model.config, adapter.moe.top_k_attr), self.store.num_experts)
        self.view = EngineView(self)
        self.reset_counters()

    def use_policy(self, name: str, ctx: PolicyContext) -> None:
        """Install policy `name` with its context and copy the experts it preloads (a previous
        policy's device cache is dropped: its bookkeeping leaves with it)."""
        for key in list(self.cache):
            self._evict(key)
        self.policy_ctx = ctx
        self.policy = make_policy(name, ctx)
        self.policy_name = name
        for key in self.policy.preload():
            self.cache[key] = self._copy(key, count=False)
        self._check_resident()

    # -- set-up checks -------------------------------------------------------------------------
    def _check_budget(self, budget: int) -> None:
        capacity = self._device_memory()
        if budget < 0:
            raise HaqError(f"--gpu-budget must be >= 0, got {budget}")
        if 0 < budget < self.expert_bytes:
            raise HaqError(f"--gpu-budget {budget} B is below one expert ({self.expert_bytes} B): "
                           f"use 0 (all experts on the CPU) or at least {self.expert_bytes}")
        if budget > capacity:
            raise HaqError(f"--gpu-budget {budget / 2**30:.2f} GiB exceeds the device memory "
                           f"({capacity / 2**30:.2f} GiB on {self.device})")

    def _device_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # the "device" is host memory

    def _flops_per_token(self) -> float:
        w = self.store[(0, 0)]
        return 2.0 * (w.gate_up.numel() + w.down.numel())

    # -- expert movement -----------------------------------------------------------------------
    def _copy(self, key: Key, count: bool = True) -> ExpertWeights:
        host = self.store[key]
        if count:
            self.copies += 1
        if self.device.type == "cuda":
            with torch.cuda.stream(self.copy_stream):
                weights = host.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.pending[key] = event
            return weights
        return host.copy()  # the "device" is the CPU: a separate copy still costs its bytes

    def _evict(self, key: Key) -> None:
        """Free a cache slot; a copy still landing in it finishes first (its memory is reused)."""
        self.cache.pop(key, None)
        self.prefetched.discard(key)
        event = self.pending.pop(key, None)
        if event is not None:
            event.synchronize()

    def ready(self, key: Key, weights: ExpertWeights) -> None:
        """Device compute on `weights` waits for their copy; the first use records the compute stream
        on them, so their memory is not handed out again before its reads are done."""
        event = self.pending.pop(key, None)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in weights.tensors():
                t.record_stream(stream)

    def _check_resident(self, passing: int = 0) -> None:
        """The budget holds; peaks of cached and staging bytes (`passing`: a copy made for one call
        and not kept, in a staging buffer while the call runs)."""
        resident = len(self.cache) * self.expert_bytes  # every expert has the same shape and bytes
        if resident > self.budget_bytes:
            raise AssertionError(f"device expert bytes {resident} exceed the budget {self.budget_bytes}")
        self.peak_expert_bytes = max(self.peak_expert_bytes, resident)
        staged = sum(k not in self.cache for k in self.ahead) + len(self.ahead_next) + passing
        self.peak_staging_bytes = max(self.peak_staging_bytes, staged * self.expert_bytes)

    def _free_ahead(self) -> None:
        """Drop this layer's staging buffers the cache did not take (its calls are issued)."""
        for key in self.ahead:
            if key not in self.cache:
                self.pending.pop(key, None)  # never used: only the copy stream touched the buffer
        self.ahead = {}

    # -- one MoE layer -------------------------------------------------------------------------
    def run_experts(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H]; top_k_index, top_k_weights [T, K]. Same result as the model's experts."""
        if self.record_routing:
            self.routing[layer].append(top_k_index.to("cpu", torch.int16))
        self.pregate.start_layer(layer)
        self.pregate.score(layer, top_k_index, self.record_routing)
        calls = route(top_k_index)
        # the CPU calls' inputs and token indices, copied before any device call is queued (they need
        # not wait for those), unless every routed expert is resident (then only if a call goes to the CPU)
        resident = hidden.device.type != "cpu" and all((layer, c.expert) in self.cache for c in calls)
        on_host = None if resident else _on_host(hidden, top_k_index, top_k_weights, calls)
        self.ahead, self.ahead_next = self.ahead_next, {}
        results, cpu_calls = self._run_calls(layer, hidden, calls)
        self._prefetch(layer, hidden)
        self._prefill_ahead(layer, hidden.shape[0])
        self._free_ahead()
        grouped = self.store.grouped[layer] if self.store.grouped is not None else None
        if grouped is not None and len(cpu_calls) == len(calls) and hidden.device.type == "cpu":
            return grouped.run(hidden, calls, top_k_weights)  # the whole layer in one kernel call
        if cpu_calls and on_host is None:
            on_host = _on_host(hidden, top_k_index, top_k_weights, calls)
        for call, y in zip(cpu_calls, self._run_cpu(layer, on_host, cpu_calls, grouped, hidden.device)):
            results[call.expert] = y
        return combine(hidden, calls, [results[call.expert] for call in calls], top_k_weights)

    def _run_calls(self, layer: int, hidden: torch.Tensor,
                   calls: Sequence[ExpertCall]) -> tuple[dict[int, torch.Tensor], list[ExpertCall]]:
        """The policy decides every call of the layer, largest first. Device calls run here (their
        outputs by expert); the CPU calls are returned, in ascending expert order, for `_run_cpu`."""
        self.cpu_assigned_s = 0.0
        results: dict[int, torch.Tensor] = {}
        cpu_calls = []
        for call in sorted(calls, key=lambda c: -c.tokens):  # largest calls first
            e, n = call.expert, call.tokens
            key = (layer, e)
            decision = self.policy.decide(key, n, self.view)
            for old in decision.evicted:
                self._evict(old)
            self.calls[layer] += 1
            if decision.where == "cpu":
                self.cpu_calls += 1
                self.cpu_assigned_s += self.predictor.t_cpu(n)
                cpu_calls.append(call)
                if decision.transfer:  # a background copy, so later calls find the expert resident
                    weights = self._copy(key)
                    if decision.admit:
                        self.cache[key] = weights
            else:
                if decision.transfer:
                    weights = self._copy(key)
                    if decision.admit:
                        self.cache[key] = weights
                elif decision.ahead:
                    weights = self.ahead[key]
                    if decision.admit:  # out of the staging buffer into the cache
                        self.cache[key] = weights
                else:
                    if key not in self.cache:
                        raise AssertionError(f"policy {self.policy_name} reused {key}, which is not resident")
                    weights = self.cache[key]
                    self.hits[layer] += 1
                    if key in self.prefetched:
                        self.prefetch_hits += 1
                        self.prefetched.discard(key)
                self.ready(key, weights)
                results[e] = self.store.math.forward(weights, hidden[call.token_idx])
            self._check_resident(passing=int(decision.transfer and not decision.admit))
        return results, sorted(cpu_calls, key=lambda c: c.expert)

    def _prefetch(self, layer: int, hidden: torch.Tensor) -> None:
        """Pre-gate layer l + d from layer l's input; start the copies the policy asks for."""
        predicted = self.pregate.predict(layer, hidden)
        if predicted is None:
            return
        target, probs, lead_s = predicted
        for pf in self.policy.prefetch(target, probs, self.view, lead_s):
            for old in pf.evicted:
                self._evict(old)
            self.cache[pf.key] = self._copy(pf.key)
            self.prefetched.add(pf.key)
            self.prefetches += 1
            self._check_resident()

    def _prefill_ahead(self, layer: int, tokens: int) -> None:
        """Prefill: start the copies of layer l + 1's experts the policy asks for, while layer l runs."""
        if not self.prefill_forward or layer + 1 >= self.store.num_layers:
            return
        for key in self.policy.prefill_ahead(layer + 1, tokens, self.view, self.pregate.last_layer_s):
            self.ahead_next[key] = self._copy(key)
            self.copies_ahead += 1
        self._check_resident()

    def _run_cpu(self, layer: int, on_host: tuple, calls: list[ExpertCall], grouped,
                 device: torch.device) -> list[torch.Tensor]:
        """The CPU calls' outputs on `device`: one grouped kernel call when the store has one, else call
        by call; on the worker thread when the device is a GPU (it overlaps the device calls).
        `on_host`: the layer's input, top-k weights and calls with everything in host memory."""
        if not calls:
            return []
        host, host_weights, host_calls = on_host
        by_expert = {c.expert: c for c in host_calls}
        calls = [by_expert[c.expert] for c in calls]  # the kernel reads the token indices from host memory
        if grouped is not None:
            run = lambda: grouped.run(host, calls, host_weights, combined=False)  # noqa: E731
        else:
            math = self.store.math
            run = lambda: [math.forward(self.store[(layer, c.expert)], host[c.token_idx]) for c in calls]  # noqa: E731
        outputs = run() if self.pool is None else self.pool.submit(run).result()
        return [y.to(device) for y in outputs]

    # -- generation and metrics ----------------------------------------------------------------
    def reset_counters(self) -> None:
        n = self.store.num_layers
        self.calls, self.hits = [0] * n, [0] * n
        self.cpu_calls = self.copies = 0
        self.routing: list[list[torch.Tensor]] = [[] for _ in range(n)]  # per layer, per forward: [T, K]
        self.pregate.reset()
        self.prefetched: set[Key] = set()
        self.prefetches = self.prefetch_hits = self.copies_ahead = 0
        self.peak_expert_bytes, self.peak_staging_bytes = len(self.cache) * self.expert_bytes, 0  # this run's

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32) -> tuple[list[int], EngineMetrics]:
        """Greedy decoding of one sequence (no EOS stop); the new token ids and the run's metrics.
        `input_ids`: [L] or [1, L]; several rows go to `generate_batch`, not joined into one."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or \
                (input_ids.dim() == 2 and input_ids.shape[0] != 1):
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise HaqError(f"generate takes one sequence, a tensor [L] or [1, L] of token ids, got {shape}; "
                           "decode several with generate_batch")
        prompt = input_ids.reshape(-1).tolist()
        outputs, metrics = self.generate_batch([prompt], SamplingParams(max_tokens=max_new_tokens))
        return outputs[0], metrics

    def generator(self, max_batch: int = 8, eos_token_ids: tuple[int, ...] = (), batch_invariant: bool = False,
                  prefill_chunk: int = 512) -> BatchGenerator:
        """A continuous-batching generator over this model (the server keeps one). No budget: every call
        is a CPU call (AllCpu), so decode steps may run in one kernel call (`native_decode`)."""
        every_call_on_cpu = self.budget_bytes < self.expert_bytes and self.device.type == "cpu" and bool(self.store.grouped)
        return BatchGenerator(self.model, max_batch=max_batch, eos_token_ids=eos_token_ids,
                              batch_invariant=batch_invariant, prefill_chunk=prefill_chunk,
                              native=every_call_on_cpu, native_experts=self.store.grouped,
                              on_native_routing=self._count_native_step, on_forward=self._set_prefill)

    def _set_prefill(self, prefill: bool) -> None:
        self.prefill_forward = prefill

    def _count_native_step(self, routing: np.ndarray) -> None:
        """A native decode step's routing [decoder layers, rows, top_k]: its calls, all on the CPU."""
        moe = routing[self.moe_layer_index]  # [MoE layers, rows, top_k], a copy
        ordered = np.sort(moe.reshape(len(moe), -1), axis=1)
        distinct = (1 + (ordered[:, 1:] != ordered[:, :-1]).sum(axis=1)).tolist()  # distinct experts per layer
        self.calls = [calls + new for calls, new in zip(self.calls, distinct)]
        if self.record_routing:  # views of the one copy
            for chunks, layer in zip(self.routing, torch.from_numpy(moe).unbind(0)):
                chunks.append(layer)
        self.cpu_calls += sum(distinct)

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], params: SamplingParams, max_batch: int = 8,
                       eos_token_ids: tuple[int, ...] = (), on_token: Callable[[TokenEvent], None] | None = None,
                       batch_invariant: bool = False) -> tuple[list[list[int]], EngineMetrics]:
        """Decode `prompts` together (continuous batching, `max_batch` at a time); `on_token` sees
        every token as it is sampled. Latency statistics are per decode step."""
        self.reset_counters()
        gen = self.generator(max_batch, eos_token_ids, batch_invariant)
        ids = [gen.add(prompt, params) for prompt in prompts]
        out: dict[int, list[int]] = {i: [] for i in ids}
        latencies, cum_hits, kv_peak, decoded = [], [], 0, 0
        self.sync()
        start = time.perf_counter()
        ttft = None
        while gen.has_work:
            events = gen.step()
            self.sync()
            if ttft is None and events:
                ttft = time.perf_counter() - start
            if gen.last_step.decode_rows and not gen.last_step.prefill_tokens:
                latencies.append(gen.last_step.seconds)
                decoded += gen.last_step.decode_rows
                cum_hits.append(sum(self.hits) / max(sum(self.calls), 1))
            kv_peak = max(kv_peak, kv_cache_bytes(gen.cache))
            for event in events:
                out[event.seq_id].append(event.token)
                if on_token is not None:
                    on_token(event)
        lat = np.array(latencies)
        metrics = engine_metrics(self, lat, ttft or 0.0, sum(len(p) for p in prompts) + sum(map(len, out.values())), kv_peak)
        if len(lat):
            metrics.tokens_per_s = decoded / float(lat.sum())
        metrics.cum_hit_rate = [round(x, 5) for x in cum_hits]
        return [out[i] for i in ids], metrics

    def last_trace(self, model_name: str) -> Trace:
        """Routing of the last `generate` (prompt, then each decode input) as a trace, for replay."""
        from haq.runtime.trace import TraceMeta

        experts = torch.stack([torch.cat(chunks) for chunks in self.routing], dim=1).numpy()  # [T, L, K]
        T = experts.shape[0]
        pregate = self.pregate.recorded(T)
        meta = TraceMeta(model=model_name, num_experts=self.store.num_experts, layers=self.store.num_layers,
                         top_k=experts.shape[2], source=f"engine run (policy {self.policy_name})",
                         extra={"pregate_distance": self.pregate.distance} if pregate is not None else {})
        return Trace(experts=experts, seq_id=np.zeros(T, dtype=np.int32), pos=np.arange(T, dtype=np.int32), meta=meta,
                     pregate=pregate)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
