"""Continuous batching over a causal LM (a plain HF model or the engine's offloaded one).

Sequences join and leave between steps. A step prefills joining sequences up to `prefill_chunk`
prompt tokens (each in its own batch-1 forward with its own cache; a long prompt is cut into
chunks so it does not stall running decodes), then one decode forward for every running
sequence together: the MoE blocks see all of the step's tokens, so expert calls carry n >= 1 and
the policy decides on the real n.

The running sequences share one left-padded KV cache: row b holds `pad[b]` masked columns, then
its tokens; each row gets its own position ids. A joining sequence's prefilled cache is padded to
the common length and stacked in; a finished row is dropped, and columns that are padding in every
row are trimmed.

Boundary: token ids in, token ids out; no tokenizer here (stop strings are the caller's: it can
`abort` a sequence between steps).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from haq.errors import NOT_FINITE, HaqError
from haq.runtime.sampling import Logprob, SamplingParams, logprobs_of, next_token


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in its cache
    cache: object = None  # its own cache while prefilling
    finish_reason: str | None = None
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # of prompt tokens 1.. (params.prompt_logprobs)

    @property
    def length(self) -> int:
        """Tokens in the cache once the last sampled token is fed: prompt + generated - 1."""
        return len(self.prompt) + len(self.tokens) - 1


@dataclass(frozen=True)
class TokenEvent:
    seq_id: int
    token: int
    index: int  # 0 for the first generated token
    finish_reason: str | None  # "stop" (EOS or stop token), "length", or None while running
    logprob: Logprob | None = None  # with params.logprobs
    prompt_logprobs: tuple[Logprob, ...] | None = None  # with params.prompt_logprobs, on index 0: tokens 1..


@dataclass
class StepStats:
    decode_rows: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0


def first_invalid_token(prompt: list, vocab: int | None):
    """The first entry of `prompt` that is not a token id in [0, vocab), or None."""
    return next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or t < 0
                 or (vocab is not None and t >= vocab)), None)


def check_request(prompt: list, params: SamplingParams, vocab: int | None, max_context: int | None) -> None:
    """A request the model can take: a non-empty prompt of token ids in its vocabulary, with room
    for `params.max_tokens` more in its context."""
    if not prompt:
        raise HaqError("the prompt is empty: give at least one token")
    bad = first_invalid_token(prompt, vocab)
    if bad is not None:
        raise HaqError(f"the prompt must be token ids in [0, {vocab}): got {bad!r}")
    if max_context is not None and len(prompt) + params.max_tokens > max_context:
        room = max_context - len(prompt)
        fix = f"lower max_tokens (--max-new-tokens) to {room} or less" if room > 0 else "shorten the prompt"
        raise HaqError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                       f"context of {max_context} tokens: {fix}")


class BatchGenerator:
    def __init__(self, model: nn.Module, *, max_batch: int = 8, prefill_chunk: int = 512,
                 eos_token_ids: tuple[int, ...] = (), max_context: int | None = None,
                 batch_invariant: bool = False, native: bool = True, native_experts=None,
                 on_native_routing: Callable[[np.ndarray], None] | None = None,
                 on_forward: Callable[[bool], None] | None = None) -> None:
        """`native`: decode steps in one kernel call where the model allows it
        (`haq.runtime.native_decode`; `native_reason` says why not); `native_experts`, the
        experts' kernel tables when the model's own expert modules are not haq's (the engine's
        store), and `on_native_routing` sees each such step's routing [layers, rows, top_k].
        `on_forward(prefill)` is told before each module forward whether it is a prefill chunk."""
        if max_batch < 1:
            raise HaqError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise HaqError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.eos = set(eos_token_ids)
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", None)
        self.batch_invariant = batch_invariant
        self._attention = None
        if batch_invariant:
            from haq.runtime.invariant import register

            self._attention = register()
        self._check_cache_kinds()
        from haq.runtime import decode_attention

        decode_attention.install(self.model)  # decode steps of llama-layout attention in one kernel call
        self.native, self.native_reason = None, "disabled"
        if native and not batch_invariant:
            from haq.runtime.native_decode import NativeDecoder

            self.native, self.native_reason = NativeDecoder.build(self.model, native_experts)
        self.on_native_routing = on_native_routing
        self.on_forward = on_forward or (lambda prefill: None)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: Sequence | None = None
        self.running: list[Sequence] = []
        self.pads: list[int] = []
        self.cache = None  # the running rows' shared cache
        self._ids = itertools.count()
        self.last_step = StepStats()

    # -- requests ---------------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams) -> int:
        check_request(prompt, params, getattr(self.model.config, "vocab_size", None), self.max_context)
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            if params.seed is None:
                generator.seed()  # its own entropy; torch's global generator is left alone
            else:
                generator.manual_seed(params.seed)
        seq = Sequence(next(self._ids), list(prompt), params, generator)
        self.waiting.append(seq)
        return seq.id

    def abort(self, seq_id: int) -> None:
        """Drop a sequence wherever it is (waiting, prefilling or running), freeing its slot now."""
        self.waiting = deque(s for s in self.waiting if s.id != seq_id)
        if self.prefilling is not None and self.prefilling.id == seq_id:
            self.prefilling = None
        rows = [i for i, s in enumerate(self.running) if s.id == seq_id]
        if rows:
            self._drop_rows(rows)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def active(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    # -- one step -------------------------------------------------------------------------------
    def _check_cache_kinds(self) -> None:
        """Refuse at start, not at the first join, a model whose cache cannot be left-padded."""
        from transformers import DynamicCache

        if self.max_batch > 1:
            self._layers(DynamicCache(config=self.model.config))

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One prefill chunk and/or one decode forward (the model's attention is haq's batch-invariant
        one for the step's duration only, in that mode)."""
        config = self.model.config
        saved = config._attn_implementation
        if self._attention is not None:
            config._attn_implementation = self._attention
        try:
            return self._step()
        finally:
            config._attn_implementation = saved

    def _step(self) -> list[TokenEvent]:
        start = time.perf_counter()
        events: list[TokenEvent] = []
        self.last_step = StepStats()
        decoding = bool(self.running)  # a sequence that joins in this step decodes with them, or next step
        budget = self.prefill_chunk  # prompt tokens per step: several short prompts, or a chunk of a long one
        while budget > 0:
            if self.prefilling is None and self.waiting and self.active < self.max_batch:
                self.prefilling = self.waiting.popleft()
            if self.prefilling is None:
                break
            seq = self.prefilling
            chunk = min(budget, len(seq.prompt) - seq.prefilled)
            events += self._prefill_chunk(seq, chunk)
            budget -= chunk
        if decoding:
            events += self._decode()
        self.last_step.seconds = time.perf_counter() - start
        return events

    def _prefill_chunk(self, seq: Sequence, size: int) -> list[TokenEvent]:
        from transformers import DynamicCache

        from haq.runtime.kv_cache import preallocated

        if seq.cache is None:  # room for the whole sequence: decoding appends without copying
            seq.cache = preallocated(DynamicCache(config=self.model.config), len(seq.prompt) + seq.params.max_tokens)
        chunk = seq.prompt[seq.prefilled:seq.prefilled + size]
        ids = torch.tensor([chunk], device=self.device)
        positions = torch.arange(seq.prefilled, seq.prefilled + len(chunk), device=self.device)[None]
        self.on_forward(True)
        every = seq.params.prompt_logprobs  # every position's logits (0: all), not only the last one's
        out = self.model(ids, past_key_values=seq.cache, position_ids=positions, use_cache=True,
                         logits_to_keep=0 if every else 1)
        if every:  # position i predicts the prompt's next token, where the prompt has one
            targets = seq.prompt[seq.prefilled + 1:seq.prefilled + len(chunk) + 1]
            _check_logits(out.logits[0, :len(targets)])
            seq.prompt_logprobs += logprobs_of(out.logits[0, :len(targets)], targets, seq.params.logprobs or 0)
        seq.prefilled += len(chunk)
        self.last_step.prefill_tokens += len(chunk)
        if seq.prefilled < len(seq.prompt):
            return []
        self.prefilling = None
        _check_logits(out.logits[0, -1])
        event = self._sample(seq, out.logits[0, -1])
        if every:
            event = replace(event, prompt_logprobs=tuple(seq.prompt_logprobs))
        if event.finish_reason is None:
            self._join(seq)
        return [event]

    def _decode(self) -> list[TokenEvent]:
        rows = self.running
        if self.native is not None and self.native.accepts(self.cache):
            logits, routing = self.native.step([s.tokens[-1] for s in rows], [s.length for s in rows], self.pads,
                                               self.cache)
            if self.on_native_routing is not None:
                self.on_native_routing(routing)
        else:
            logits = self._module_decode(rows)
        self.last_step.decode_rows = len(rows)
        _check_logits(logits)  # the whole step, before any row takes a token
        events = [self._sample(seq, logits[b]) for b, seq in enumerate(rows)]
        done = [b for b, event in enumerate(events) if event.finish_reason is not None]
        if done:
            self._drop_rows(done)
        return events

    def _module_decode(self, rows: list[Sequence]) -> torch.Tensor:
        """The decode forward through the model's modules: logits [B, vocab]."""
        width = self.pads[0] + rows[0].length  # every row: pad + length == cached columns
        ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)
        positions = torch.tensor([[s.length] for s in rows], device=self.device)
        mask = torch.ones(len(rows), width + 1, dtype=torch.long, device=self.device)
        for b, pad in enumerate(self.pads):
            mask[b, :pad] = 0
        self.cache.haq_pads = list(self.pads)  # the rows' left padding, for haq.runtime.decode_attention
        mode = _fixed_rows() if self.batch_invariant else nullcontext()
        self.on_forward(False)
        with mode:
            out = self.model(ids, past_key_values=self.cache, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> TokenEvent:
        token = next_token(logits, seq.tokens, seq.params, seq.generator)
        logprob = None if seq.params.logprobs is None else logprobs_of(logits[None], [token], seq.params.logprobs)[0]
        seq.tokens.append(token)
        if (token in self.eos and not seq.params.ignore_eos) or token in seq.params.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.tokens) >= seq.params.max_tokens:
            seq.finish_reason = "length"
        return TokenEvent(seq.id, token, len(seq.tokens) - 1, seq.finish_reason, logprob)

    # -- the shared cache ---------------------------------------------------------------------
    def _layers(self, cache) -> list:
        from transformers.cache_utils import DynamicLayer

        from haq.runtime.kv_cache import PreallocatedLayer

        layers = cache.layers
        if any(type(layer) not in (DynamicLayer, PreallocatedLayer) for layer in layers):  # sliding-window, hybrid or quantized
            kinds = sorted({type(layer).__name__ for layer in layers})
            raise HaqError(f"batched decoding needs full-attention caches; this model uses {', '.join(kinds)}: "
                           "use --max-batch 1")
        return layers

    def _join(self, seq: Sequence) -> None:
        cache, seq.cache = seq.cache, None
        new = self._layers(cache)
        length = new[0].keys.shape[-2]
        if self.cache is None:
            self.cache, self.pads, self.running = cache, [0], [seq]
            return
        width = self.pads[0] + self.running[0].length
        target = max(width, length)
        for own, other in zip(self._layers(self.cache), new):
            own.keys = torch.cat([_left_pad(own.keys, target - width), _left_pad(other.keys, target - length)])
            own.values = torch.cat([_left_pad(own.values, target - width), _left_pad(other.values, target - length)])
        self.pads = [p + target - width for p in self.pads] + [target - length]
        self.running.append(seq)

    def _drop_rows(self, rows: list[int]) -> None:
        keep = [b for b in range(len(self.running)) if b not in rows]
        self.running = [self.running[b] for b in keep]
        self.pads = [self.pads[b] for b in keep]
        if not keep:
            self.cache, self.pads = None, []
            return
        trim = min(self.pads)
        index = torch.tensor(keep, device=self.device)
        for layer in self._layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[..., trim:, :]
            layer.values = layer.values.index_select(0, index)[..., trim:, :]
        self.pads = [p - trim for p in self.pads]

    # -- convenience ----------------------------------------------------------------------------
    def stream(self) -> Iterator[TokenEvent]:
        """Step until nothing is left, yielding every token as it is sampled."""
        while self.has_work:
            yield from self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Every prompt's generated tokens, decoded together."""
        ids = [self.add(p, params) for p in prompts]
        out: dict[int, list[int]] = {i: [] for i in ids}
        for event in self.stream():
            out[event.seq_id].append(event.token)
        return [out[i] for i in ids]


def _check_logits(logits: torch.Tensor) -> None:
    """NaN or +inf logits come from damaged weights or an overflow, never from a real distribution
    (-inf is a token a model rules out, but not every token of a row): an error with the reason, not a
    silent first-token stop. One pass: a row's max is NaN if the row holds a NaN (max propagates
    it), +inf if it holds one, -inf if every token is ruled out."""
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
        raise HaqError(NOT_FINITE)


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """t [B, heads, S, D] with n zero columns before its S."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)


def _fixed_rows():
    from haq.runtime.invariant import FixedRowLinears

    return FixedRowLinears()
