"""A quantization recipe: which method, bits and granularity; explains itself, rejects unknown keys."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from haq.errors import HaqError

Method = Literal["fp", "rtn", "smoothquant", "gptq", "haq"]
METHODS: tuple[str, ...] = ("fp", "rtn", "smoothquant", "gptq", "haq")


CALIBRATION_FLAGS = ("calib", "nsamples", "seqlen", "seed")  # `haq quantize` flags, not recipe fields
_FIELD_TYPES = {"int": int, "float": float, "bool": bool}  # the rest are strings (Literal choices)

FIELD_HELP = {
    "method": "rtn: round to nearest; smoothquant: fixed-alpha smoothing + RTN; gptq: Hessian-aware weights; "
              "haq: per-layer alpha searched on the quantized block's output error, then GPTQ",
    "wbits": "weight bits (per output channel, symmetric)",
    "abits": "activation bits; 16 = weight-only (activations stay float)",
    "act": "activation scales: dynamic per token, or static per tensor (calibrated)",
    "alpha": "smoothquant's fixed migration strength",
    "alpha_step": "haq's alpha grid step: candidates none, 0, step, ..., 1",
    "alpha_search": "haq: proxy = rank the whole grid by the consumers' own quantized output error and let the "
                    "block error decide among the best proxy_keep and none; "
                    "coarse-to-fine = the block error on about half the grid; grid = the block error on all of it",
    "proxy_keep": "haq's proxy search: how many of the best-ranked candidates the block error decides among",
    "search_tokens": "calibration tokens (whole windows) on which haq scores alphas by block error",
    "percdamp": "GPTQ damping, a fraction of mean diag(H); raised x10 until the Cholesky succeeds",
    "blocksize": "GPTQ column block size",
    "actorder": "GPTQ: quantize columns in decreasing Hessian diagonal order",
    "calibrate_all_experts": "expert Hessians from all tokens (outputs still combine routed experts only)",
    "min_expert_tokens": "experts routed fewer calibration tokens than this get RTN weights, with a warning",
    "expert_shrink": "GPTQ: each expert's Hessian is shrunk toward the pool of all experts' Hessians of that input, "
                     "with the weight of this many times the input width in tokens (0: its routed tokens only)",
    "rotate": "on: rotate the residual stream (exact; unties a tied lm_head) and the down inputs (dense MLPs' and "
              "every routed expert's) at run time, which flattens outlier tokens; auto: on for --method haq where the architecture "
              "allows it (RMSNorm families), with run-time rotations only of widths that have a Hadamard matrix, so "
              "the checkpoint exports (compressed-tensors transforms); off: never",
    "quantize_lm_head": "the lm_head too: RTN int8 per output channel, dynamic per-token activations (as llama.cpp's "
                        "Q8_0 does); a tied lm_head is untied, the embedding stays float; does not export",
}
"""What each field does, for `haq quantize --help` (one flag per field)."""


@dataclass(frozen=True)
class Recipe:
    method: Method = "haq"
    wbits: int = 8
    abits: int = 8  # 16 = activations stay float (weight-only, e.g. GPTQ W8A16)
    act: Literal["per-token", "per-tensor"] = "per-token"  # per-tensor = static, calibrated
    alpha: float = 0.5  # smoothquant's fixed migration strength (SmoothQuant's default)
    alpha_step: float = 0.05  # haq's grid: None (no smoothing), 0, step, ..., 1
    alpha_search: Literal["proxy", "coarse-to-fine", "grid"] = "proxy"  # grid = block error on every point
    proxy_keep: int = 2
    search_tokens: int = 1024  # calibration tokens (whole windows) on which haq scores alphas by block error
    percdamp: float = 0.01  # GPTQ damping, fraction of mean diag(H); raised x10 until Cholesky succeeds
    blocksize: int = 128
    actorder: bool = True
    calibrate_all_experts: bool = False  # expert Hessians from all tokens (outputs still use routed ones)
    min_expert_tokens: int = 16  # fewer routed calibration tokens than this: RTN for that expert, with a warning
    expert_shrink: float = 1.0  # expert Hessians shrunk toward the experts' pool: prior of this x width tokens
    rotate: Literal["auto", "on", "off"] = "auto"  # residual stream offline, down inputs online
    quantize_lm_head: bool = False  # a decode token's largest single read; kept float by default

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), _FIELD_TYPES.get(str(f.type), str)
            numeric_ok = kind is float and isinstance(value, int)
            if isinstance(value, bool) != (kind is bool) or not (isinstance(value, kind) or numeric_ok):
                raise HaqError(f"recipe {f.name}={value!r}: expected {kind.__name__}")
        if self.method not in METHODS:
            raise HaqError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if not 2 <= self.wbits <= 8:
            raise HaqError(f"--wbits must be in [2, 8], got {self.wbits}")
        if self.abits != 16 and not 2 <= self.abits <= 8:
            raise HaqError(f"--abits must be in [2, 8] or 16 (no activation quantization), got {self.abits}")
        if self.act not in ("per-token", "per-tensor"):
            raise HaqError(f"--act must be per-token or per-tensor, got {self.act!r}")
        if self.rotate not in ("auto", "on", "off"):
            raise HaqError(f"--rotate must be auto, on or off, got {self.rotate!r}")
        if self.alpha_search not in ("proxy", "coarse-to-fine", "grid"):
            raise HaqError(f"--alpha-search must be proxy, coarse-to-fine or grid, got {self.alpha_search!r}")
        if not 0 <= self.alpha <= 1:
            raise HaqError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.alpha_step <= 1:
            raise HaqError(f"alpha_step must be in (0, 1], got {self.alpha_step}")
        if not 0 < self.percdamp < 1:
            raise HaqError(f"percdamp must be in (0, 1), got {self.percdamp}")
        for name in ("search_tokens", "blocksize", "proxy_keep"):
            if getattr(self, name) < 1:
                raise HaqError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.expert_shrink < 0:
            raise HaqError(f"expert_shrink must be >= 0, got {self.expert_shrink}")
        if self.min_expert_tokens < 0:
            raise HaqError(f"min_expert_tokens must be >= 0, got {self.min_expert_tokens}")

    @property
    def smooths(self) -> bool:
        return self.method in ("smoothquant", "haq")

    @property
    def uses_gptq(self) -> bool:
        return self.method in ("gptq", "haq")

    def ignored(self, given: set[str]) -> list[str]:
        """The fields among `given` (set by the user) that this method does not read."""
        reads = {"alpha": self.method == "smoothquant",
                 **dict.fromkeys(("alpha_step", "alpha_search", "proxy_keep", "search_tokens"), self.method == "haq"),
                 **dict.fromkeys(("percdamp", "blocksize", "actorder", "calibrate_all_experts", "min_expert_tokens",
                                  "expert_shrink"), self.uses_gptq)}
        return sorted(name for name in given if not reads.get(name, True))

    @property
    def quant_acts(self) -> bool:
        return self.abits <= 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise HaqError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> dict:
        """The recipe fields a YAML or JSON file sets (checked by `from_dict` once flags are merged in)."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise HaqError(f"cannot read the recipe file {path}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            where = f"line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "its syntax"
            raise HaqError(f"the recipe file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                           f"({where}): fix it or write the fields as flags") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise HaqError(f"the recipe file {path} must hold a mapping of recipe fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, data)) - known)
        calibration = [name for name in unknown if name in CALIBRATION_FLAGS]
        if calibration:  # as in llm-compressor, the recipe is what is done; the data it is done on is given apart
            flags = " ".join(f"--{name} {data[name]}" for name in calibration)
            raise HaqError(f"the recipe file {path} sets {', '.join(calibration)}: calibration data is not part of a "
                           f"recipe; remove it there and pass {flags} to `haq quantize`")
        if unknown:
            raise HaqError(f"the recipe file {path} has unknown fields {unknown}; known: {sorted(known)}")
        return data

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
