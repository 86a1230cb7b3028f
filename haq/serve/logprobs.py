"""OpenAI's two log-probability layouts, built from the generator's `Logprob` entries: the legacy
completions one (parallel lists: tokens, token_logprobs, top_logprobs as {text: logprob},
text_offset; lm-eval's `local-completions` reads it with echo for loglikelihood) and the chat one
(a list of {token, logprob, bytes, top_logprobs}). A token's text is its own decoding."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

from haq.runtime.sampling import Logprob

FLOOR = -9999.0  # a token the model rules out (-inf) as a number JSON can carry, as vLLM reports it


def token_texts(tokenizer) -> Callable[[int], str]:
    """The text of one token id, cached (a response names each top token too)."""
    @lru_cache(maxsize=65536)
    def text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def completion_logprobs(entries: Sequence[tuple[int, Logprob | None]], text: Callable[[int], str],
                        offset: int = 0) -> dict:
    """(token, its entry or None) pairs, None for a token nothing precedes (the prompt's first);
    `offset`: where the first token's text starts in the choice's text."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in entries:
        piece = text(token)
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        out["token_logprobs"].append(None if entry is None else _value(entry.logprob))
        if entry is None:
            out["top_logprobs"].append(None)
            continue
        top: dict = {}
        for t, v in entry.top:  # two ids may share a text: the key keeps the likelier (first) one
            top.setdefault(text(t), _value(v))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(entries: Sequence[Logprob], text: Callable[[int], str]) -> dict:
    def item(token: int, logprob: float) -> dict:
        piece = text(token)
        return {"token": piece, "logprob": _value(logprob), "bytes": list(piece.encode())}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                        for e in entries]}
