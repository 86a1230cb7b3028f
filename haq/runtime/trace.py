"""Routing traces: which experts each token chose in each MoE layer, recorded once, replayed often.

A trace is what the engine records (or the synthetic generator draws) and what placement, profiling
and the simulator read. It knows nothing about hardware or policies.

File format (`.npz`, no pickles):
  experts  int16   [T, L, K]  expert id per token, layer, routing slot; -1 where missing
  seq_id   int32   [T]        sequence of each token; a sequence's tokens are contiguous
  pos      int32   [T]        position in its sequence, strictly increasing within a sequence
  weights  float16 [T, L, K]  optional routing weights
  pregate  int16   [T, L, K]  optional pre-gate prediction: layer l's router applied to the MoE input
                              of layer l-d, d = meta pregate_distance (-1 in the first d layers)
  meta     str (0-d)          JSON: model, num_experts, layers, top_k, source (+ free extras)
T = tokens, L = MoE layers, K = top_k.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from haq.errors import HaqError
from haq.io import atomic_write_bytes

META_KEYS = ("model", "num_experts", "layers", "top_k", "source")
ARRAY_KEYS = ("experts", "seq_id", "pos", "meta")
OPTIONAL_KEYS = ("weights", "pregate")


@dataclass(frozen=True)
class TraceMeta:
    model: str
    num_experts: int
    layers: int
    top_k: int
    source: str  # how the trace was made: "engine", "synthetic: ...", "hf-hooks", ...
    extra: dict = field(default_factory=dict)  # anything else the producer wants to keep (JSON-able)

    def to_json(self) -> str:
        core = {k: getattr(self, k) for k in META_KEYS}
        return json.dumps({**self.extra, **core}, sort_keys=True)


@dataclass(frozen=True)
class Trace:
    experts: np.ndarray  # int16 [T, L, K]
    seq_id: np.ndarray  # int32 [T]
    pos: np.ndarray  # int32 [T]
    meta: TraceMeta
    weights: np.ndarray | None = None  # float16 [T, L, K]
    pregate: np.ndarray | None = None  # int16 [T, L, K]

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    def sequences(self) -> list[int]:
        """Sequence ids in order of first appearance."""
        _, first = np.unique(self.seq_id, return_index=True)
        return [int(self.seq_id[i]) for i in np.sort(first)]

    def select_sequences(self, ids: list[int]) -> Trace:
        mask = np.isin(self.seq_id, np.asarray(ids, dtype=np.int32))
        return Trace(
            experts=self.experts[mask],
            seq_id=self.seq_id[mask],
            pos=self.pos[mask],
            meta=self.meta,
            weights=None if self.weights is None else self.weights[mask],
            pregate=None if self.pregate is None else self.pregate[mask],
        )


def split_by_sequence(trace: Trace, frac: float = 0.5) -> tuple[Trace, Trace]:
    """(profile_part, eval_part): the first `frac` of sequences to profile, the rest to score.

    Splitting by sequence (not by token) keeps placement from seeing the very tokens it is scored on.
    """
    seqs = trace.sequences()
    if len(seqs) < 2:
        raise HaqError(f"trace has {len(seqs)} sequence(s); splitting into profile and eval parts needs >= 2: "
                       "record one over several windows with `haq trace MODEL`")
    if not 0.0 < frac < 1.0:
        raise HaqError(f"split fraction must be in (0, 1), got {frac}")
    cut = min(max(1, math.ceil(frac * len(seqs))), len(seqs) - 1)
    return trace.select_sequences(seqs[:cut]), trace.select_sequences(seqs[cut:])


def save_trace(path: str | Path, trace: Trace) -> None:
    """Write atomically (temp file, then rename): a crash never leaves a half-written trace."""
    _validate(trace, Path(path))
    arrays = {
        "experts": trace.experts,
        "seq_id": trace.seq_id,
        "pos": trace.pos,
        "meta": np.array(trace.meta.to_json()),
    }
    for key in OPTIONAL_KEYS:
        if getattr(trace, key) is not None:
            arrays[key] = getattr(trace, key)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_trace(path: str | Path) -> Trace:
    """Load and validate a trace; every problem is a HaqError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise HaqError(f"trace {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise HaqError(f"trace {path}: not a readable .npz file ({exc})") from exc
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise HaqError(f"trace {path}: missing array(s) {missing}; "
                       f"a trace holds {list(ARRAY_KEYS)} (+ optional {list(OPTIONAL_KEYS)})")
    unknown = sorted(set(arrays) - set(ARRAY_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise HaqError(f"trace {path}: unexpected array(s) {unknown}")
    trace = Trace(
        experts=arrays["experts"],
        seq_id=arrays["seq_id"],
        pos=arrays["pos"],
        meta=_parse_meta(arrays["meta"], path),
        weights=arrays.get("weights"),
        pregate=arrays.get("pregate"),
    )
    _validate(trace, path)
    return trace


def _parse_meta(raw: np.ndarray, path: Path) -> TraceMeta:
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise HaqError(f"trace {path}: meta must be a JSON string, got {raw.dtype} with shape {raw.shape}")
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise HaqError(f"trace {path}: meta is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise HaqError(f"trace {path}: meta must be a JSON object")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise HaqError(f"trace {path}: meta lacks {missing}")
    for key in ("num_experts", "layers", "top_k"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 1:
            raise HaqError(f"trace {path}: meta {key} must be a positive integer, got {meta[key]!r}")
    for key in ("model", "source"):
        if not isinstance(meta[key], str):
            raise HaqError(f"trace {path}: meta {key} must be a string, got {meta[key]!r}")
    extra = {k: v for k, v in meta.items() if k not in META_KEYS}
    return TraceMeta(**{k: meta[k] for k in META_KEYS}, extra=extra)


def _validate(trace: Trace, path: Path) -> None:
    where = f"trace {path}"
    ex, meta = trace.experts, trace.meta
    if ex.dtype != np.int16 or ex.ndim != 3:
        raise HaqError(f"{where}: experts must be int16 [tokens, layers, top_k], got {ex.dtype} {ex.shape}")
    T, L, K = ex.shape
    if (L, K) != (meta.layers, meta.top_k):
        raise HaqError(f"{where}: experts shape {ex.shape} disagrees with "
                       f"meta layers={meta.layers}, top_k={meta.top_k}")
    for name, arr in (("seq_id", trace.seq_id), ("pos", trace.pos)):
        if arr.dtype != np.int32 or arr.shape != (T,):
            raise HaqError(f"{where}: {name} must be int32 [{T}], got {arr.dtype} {arr.shape}")
    if trace.weights is not None and (trace.weights.dtype != np.float16 or trace.weights.shape != ex.shape):
        raise HaqError(f"{where}: weights must be float16 {ex.shape}, got {trace.weights.dtype} {trace.weights.shape}")
    pre = trace.pregate
    if pre is not None and (pre.dtype != np.int16 or pre.shape != ex.shape):
        raise HaqError(f"{where}: pregate must be int16 {ex.shape}, got {pre.dtype} {pre.shape}")
    for name, ids in (("expert", ex), ("pre-gate expert", pre)):
        bad = (ids < -1) | (ids >= meta.num_experts) if ids is not None else np.zeros(1, dtype=bool)
        if bad.any():
            t, layer, k = (int(i) for i in np.argwhere(bad)[0])
            raise HaqError(f"{where}: {name} id {int(ids[t, layer, k])} at token {t}, layer {layer} is outside "
                           f"[0, {meta.num_experts}) (use -1 for missing)")
    srt = np.sort(ex, axis=2)
    dup = (srt[:, :, 1:] == srt[:, :, :-1]) & (srt[:, :, 1:] >= 0)
    if dup.any():
        t, layer, _ = (int(i) for i in np.argwhere(dup)[0])
        raise HaqError(f"{where}: token {t} selects the same expert twice in layer {layer}")
    if T:
        same = trace.seq_id[1:] == trace.seq_id[:-1]
        starts = np.concatenate([[0], np.flatnonzero(~same) + 1])
        if len(np.unique(trace.seq_id[starts])) != len(starts):
            raise HaqError(f"{where}: the tokens of each sequence must be contiguous")
        if (np.diff(trace.pos)[same] <= 0).any():
            raise HaqError(f"{where}: pos must strictly increase within each sequence")
