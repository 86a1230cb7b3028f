"""Resolve a model argument (folder or zoo name) and load it with its tokenizer, or fail clearly."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from haq.checkpoint.native import CONFIG_NAME, FORMAT, WEIGHTS_NAME
from haq.errors import HaqError
from haq.models.adapters import SUPPORTED


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A folder on disk wins; otherwise the name of a built zoo model."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HaqError(f"{path} is not a model folder (expected a directory with config.json)")
        if not (path / "config.json").is_file():
            raise HaqError(f"{path} is not a model folder: no config.json inside")
        return path
    from haq.zoo import ZOO, model_path

    if str(name_or_path) in ZOO:
        return model_path(str(name_or_path))
    raise HaqError(f"model {str(name_or_path)!r} not found: not a folder, nor a zoo model ({', '.join(ZOO)})")


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise HaqError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise HaqError(f"{path / 'config.json'} is not a JSON object (got {type(config).__name__})")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise HaqError(f"unsupported architecture {model_type!r} in {path}; supported: {', '.join(SUPPORTED)}")
    return config


def refuse_orphaned_checkpoint(path: Path) -> None:
    """A haq int8 checkpoint without its haq_config.json (a copy that lost it, or the temp folder of
    a killed save) must not load as a float model with random weights."""
    from safetensors import safe_open

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        return
    try:
        with safe_open(weights, "pt") as handle:
            fmt = (handle.metadata() or {}).get("format", "")
    except Exception:  # unreadable: transformers' own error says it
        return
    if fmt.startswith(FORMAT.rsplit("-", 1)[0]):  # haq-int8-v1, or any later version
        raise HaqError(f"{path} holds haq int8 weights but no {CONFIG_NAME}: the checkpoint is incomplete "
                       "(copy it whole, or re-run `haq quantize`)")


def _first_line(exc: Exception) -> str:
    """The message of a library exception on one line (some end a line at 'one of:' and list below)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:400] or type(exc).__name__


QUIET_WHILE_LOADING = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
"""transformers' loggers whose warnings a load does not show: its multi-line load report (haq refuses
a folder whose tensors do not fit, naming them) and tensor-parallel notes (haq loads on one device)."""


class _Held(logging.Handler):
    """Keeps what a load logs instead of printing it: its report is read only if the load fails."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


def _conversion_error(report: str) -> str | None:
    """From transformers' load report, the first weight conversion that failed: its error and the
    tensor it was building ("Error: MergeModulelist on tensors destined for NAME ..."), or None."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", report).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Error:") and i > 0:
            target = re.search(r"destined for (\S+?)\.?(\s|$)", line)
            return f"{lines[i - 1]}{'; building ' + target.group(1) if target else ''}"
    return None


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, int8_backend: str | None = None):
    """(model, tokenizer, path); a haq quantized checkpoint loads with its int8 modules (on
    `int8_backend`, default the one its specs record)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    quantization = read_config(path).get("quantization_config")
    if quantization is not None and not isinstance(quantization, dict):
        raise HaqError(f"{path / 'config.json'}: quantization_config must be an object, got "
                       f"{type(quantization).__name__}: remove it from a float model's config")
    quant_method = (quantization or {}).get("quant_method")
    if (path / CONFIG_NAME).is_file():
        from haq.checkpoint.native import load_quantized

        model = load_quantized(path, backend=int8_backend)
    elif quant_method == "compressed-tensors":  # `haq export`'s format (vLLM's): haq's own reader
        model = _load_export(path, int8_backend)
    elif quant_method is not None:
        raise HaqError(f"{path} is quantized ({quant_method}, config.json's quantization_config): haq reads float "
                       "models, its own checkpoints and compressed-tensors int8 ones; give the float model's folder")
    else:
        refuse_orphaned_checkpoint(path)
        quiet = [logging.getLogger(name) for name in QUIET_WHILE_LOADING]
        held = _Held()
        saved = [logger.propagate for logger in quiet]
        for logger in quiet:
            logger.addHandler(held)
            logger.propagate = False
        try:  # mismatched sizes come back in `info` (refused below), not as an error that points at the report
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
        except Exception as exc:  # noqa: BLE001 - transformers, huggingface_hub's config validation and
            # safetensors raise a dozen types for a malformed folder; each is the folder's fault here
            conversion = _conversion_error(held.text) if "CONVERSION" in str(exc) else None
            if conversion:
                raise HaqError(f"cannot load the model in {path}: its weights do not convert to the model's layout "
                               f"({conversion}): the files are damaged or of another architecture") from None
            raise HaqError(f"cannot load the model in {path} ({type(exc).__name__}): {_first_line(exc)}") from None
        finally:
            for logger, propagate in zip(quiet, saved):
                logger.removeHandler(held)
                logger.propagate = propagate
        extra = info.get("mismatched_keys") or info.get("unexpected_keys")
        if extra:  # a mismatch comes as (name, shape in the files, shape the config gives)
            names = sorted(f"{k[0]} {list(k[1])} in the files, {list(k[2])} by the config" if isinstance(k, tuple)
                           else str(k) for k in extra)
            raise HaqError(f"{path}: {len(names)} tensors in its files do not fit its config.json "
                           f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): the config does not "
                           "describe these weights")
        if info["missing_keys"]:  # transformers would initialize them at random: a model that is not this one
            missing = sorted(info["missing_keys"])
            raise HaqError(f"{path}: {len(missing)} weights of the architecture are not in its files "
                           f"({', '.join(missing[:3])}...): incomplete or not an HF checkpoint")
    return model.eval(), load_tokenizer(path), path


def _load_export(path: Path, int8_backend: str | None):
    """A compressed-tensors int8 folder as haq int8 modules, inputs fused as a haq checkpoint's are."""
    from haq.checkpoint.compressed_tensors import load_compressed_tensors

    try:
        return load_compressed_tensors(path, backend=int8_backend, fuse=True)
    except HaqError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, transformers' config and a malformed layout raise
        # a dozen types; each is the folder's fault here, as in load_model
        raise HaqError(f"cannot read the compressed-tensors checkpoint in {path} ({type(exc).__name__}): "
                       f"{_first_line(exc)}") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise HaqError(f"no usable tokenizer in {path}: {_first_line(exc)}") from None


def check_seqlen(model, seqlen: int, option: str = "--seqlen") -> None:
    """Windows longer than the model's context index past its position table (OPT) or extrapolate
    positions it never saw (RoPE): an error, not a number that means nothing."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        raise HaqError(f"{option} {seqlen} exceeds the model's context of {context} tokens: use {option} {context} or less")
