"""Sampling parameters and the next-token choice, as pure functions of the logits.

Greedy when temperature is 0. Otherwise: repetition penalty (CTRL: divide positive logits,
multiply negative ones, for tokens already generated), presence penalty (subtract from tokens
already generated), frequency penalty (subtract once per time a token was generated),
temperature, top-k, top-p (nucleus), then a draw from the request's own seeded generator, so a
seeded request gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from haq.errors import HaqError


MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs and vLLM's default cap


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the model's own distribution (before penalties and
    temperature, as vLLM reports by default) and the `top` most likely tokens with theirs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = field(default=())  # besides the model's EOS
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks, tests)
    logprobs: int | None = None  # each generated token's log-probability and this many top ones; None: none
    prompt_logprobs: bool = False  # the prompt tokens' too (each given the ones before it), `logprobs` top ones

    def __post_init__(self) -> None:
        checks = [(self.max_tokens >= 1, f"max_tokens (--max-new-tokens) must be >= 1, got {self.max_tokens}"),
                  (0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}"),
                  (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
                  (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
                  (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
                  (-2.0 <= self.presence_penalty <= 2.0,
                   f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
                  (-2.0 <= self.frequency_penalty <= 2.0,
                   f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
                  (self.seed is None or -2**63 <= self.seed < 2**64,
                   f"seed must fit in 64 bits (a torch generator's seed), got {self.seed}"),
                  (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                   f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")]
        for ok, message in checks:
            if not ok:
                raise HaqError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def penalized(logits: torch.Tensor, generated: list[int], params: SamplingParams) -> torch.Tensor:
    """logits [V] with the repetition, presence and frequency penalties of the tokens generated so far."""
    if not generated or (params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
                         and params.frequency_penalty == 0.0):
        return logits
    logits = logits.clone()
    seen, counts = torch.tensor(generated, dtype=torch.long).unique(return_counts=True)
    seen = seen.to(logits.device)
    picked = logits[seen]
    if params.repetition_penalty != 1.0:
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    logits[seen] = picked - params.presence_penalty - params.frequency_penalty * counts.to(logits)
    return logits


def next_token(logits: torch.Tensor, generated: list[int], params: SamplingParams,
               generator: torch.Generator | None) -> int:
    """The next token from logits [V] (float)."""
    logits = penalized(logits.float(), generated, params)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))  # the request's CPU generator, any device


def logprobs_of(logits: torch.Tensor, tokens: list[int], top: int) -> list[Logprob]:
    """For logits [N, V] and the token that followed each row: that token's log-probability and
    the row's `top` most likely tokens (ties: the lower id first, as topk gives them)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    if not top:
        return [Logprob(t, c) for t, c in zip(tokens, chosen)]
    values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
    return [Logprob(t, c, tuple(zip(i, v))) for t, c, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]
