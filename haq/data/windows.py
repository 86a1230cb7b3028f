"""Token windows from corpora, cut the way GPTQ (IST-DASLab/gptq `datautils.py`) does, so
perplexities compare with published numbers: non-overlapping evaluation windows and seeded
calibration windows.

Boundary: this module turns text into LongTensor windows of token ids; it knows nothing about models.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from haq.data.sources import C4_EVAL_WINDOWS, Role, Source, c4_docs, c4_shard_for, resolve, source_text, stamp
from haq.errors import HaqError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# ---------------------------------------------------------------------------------------------
# Tokenizing (cached)


@dataclass(frozen=True)
class _TokenizerKey:
    """Hashable stand-in for a tokenizer: the same name and vocabulary share cached streams."""

    name: str
    vocab_size: int
    tokenizer: Any = field(compare=False, hash=False, repr=False)


def _tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> _TokenizerKey:
    # A tokenizer built in memory has no name: key it by identity. The key holds the tokenizer, so
    # the id cannot be reused by another object while the entry is cached.
    name = getattr(tokenizer, "name_or_path", "") or f"<tokenizer object {id(tokenizer)}>"
    return _TokenizerKey(str(name), len(tokenizer), tokenizer)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # Special tokens as GPTQ gets them (tokenizer defaults). verbose=False: streams are longer than
    # model_max_length on purpose; windows are cut afterwards.
    return tokenizer(text, verbose=False)["input_ids"]


@lru_cache(maxsize=4)
def _stream(src: Source, role: Role, tok: _TokenizerKey, stamp: tuple) -> torch.Tensor:
    """The whole eval or calib text tokenized once: 1-D LongTensor. Cached: 4.6 MB takes seconds."""
    return torch.tensor(_encode(tok.tokenizer, source_text(src, role)), dtype=torch.long)


@lru_cache(maxsize=4)
def _c4_windows(
    src: Source, split: str, tok: _TokenizerKey, stamp: tuple, count: int, seqlen: int, seed: int
) -> torch.Tensor:
    """GPTQ's C4 sampler: per window, draw random docs until one has more than seqlen tokens, then a
    random window of it. Same random.Random calls as GPTQ's random.seed + random.randint.

    Deviation: GPTQ accepts docs with `>= seqlen` tokens, then draws randint(0, n - seqlen - 1),
    which raises when n == seqlen. We require `> seqlen`: identical draws on every run where GPTQ
    does not crash. GPTQ loops forever when no doc is long enough; we raise instead."""
    shard = c4_shard_for(src, split)
    docs = c4_docs(shard, stamp)
    rng = random.Random(seed)
    long_docs: dict[int, list[int]] = {}
    short_docs: set[int] = set()
    windows = []
    for _ in range(count):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i not in long_docs and i not in short_docs:  # tokenize each drawn doc once
                ids = _encode(tok.tokenizer, docs[i])
                if len(ids) > seqlen:
                    long_docs[i] = ids
                else:
                    short_docs.add(i)
            if i in long_docs:
                break
            if len(short_docs) == len(docs):
                raise HaqError(f"{shard}: no document has more than seqlen={seqlen} tokens; use a smaller seqlen")
        ids = long_docs[i]
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Public API


def eval_windows(
    dataset: str, tokenizer: PreTrainedTokenizerBase, seqlen: int = 2048, max_windows: int | None = None
) -> torch.Tensor:
    """Evaluation windows, LongTensor [n, seqlen], GPTQ protocol: the eval text as one token stream
    cut into non-overlapping windows, tail dropped (c4: 256 sampled windows; c4-new: the first
    256 * seqlen tokens). max_windows keeps the first windows, for quick runs."""
    _check_positive(seqlen=seqlen)
    if seqlen < 2:
        raise HaqError(f"seqlen={seqlen}: a window must hold at least 2 tokens (the first is never predicted)")
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
    src = resolve(dataset)
    tok = _tokenizer_key(tokenizer)
    if src.kind == "c4":
        # The sampler is sequential, so the first k of GPTQ's 256 windows need only k draws.
        count = C4_EVAL_WINDOWS if max_windows is None else min(max_windows, C4_EVAL_WINDOWS)
        return _c4_windows(src, "validation", tok, stamp(src), count, seqlen, 0).clone()
    stream = _stream(src, "eval", tok, stamp(src))
    if src.kind == "c4-new":
        stream = stream[: C4_EVAL_WINDOWS * seqlen]
    n = stream.numel() // seqlen
    if n == 0:
        raise HaqError(f"{src.path}: {stream.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seqlen].view(n, seqlen).clone()


def calib_windows(
    dataset: str, tokenizer: PreTrainedTokenizerBase, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """Calibration windows, LongTensor [nsamples, seqlen], deterministic in seed: start offsets drawn
    with random.Random(seed).randint(0, n - seqlen - 1) from the calib token stream as GPTQ draws
    them (windows may overlap; the window ending at the last token is never drawn, as in GPTQ).
    c4 and c4-new: GPTQ's C4 sampler over the train shard."""
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    src = resolve(dataset)
    tok = _tokenizer_key(tokenizer)
    if src.kind in ("c4", "c4-new"):
        return _c4_windows(src, "train", tok, stamp(src), nsamples, seqlen, seed).clone()
    # A .txt or .jsonl file is one stream for both roles: tokenize it once.
    role: Role = "calib" if src.kind in ("wiki-offline", "wikitext2") else "eval"
    stream = _stream(src, role, tok, stamp(src))
    n = stream.numel()
    if n <= seqlen:
        raise HaqError(f"{src.path}: {n} calibration tokens; windows of seqlen={seqlen} need more than {seqlen}")
    if nsamples * seqlen > n:  # allowed (GPTQ draws with replacement), but it adds no information
        log.warning("%s: %d windows of %d tokens cover its %d tokens %.1f times over: they repeat the text; a "
                    "longer --calib or fewer --nsamples calibrates as well, faster", src.path, nsamples, seqlen, n,
                    nsamples * seqlen / n)
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise HaqError(f"{name}={value!r}: expected a positive integer")
