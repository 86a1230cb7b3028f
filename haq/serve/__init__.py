"""The OpenAI-compatible server: request models (`protocol`), the model thread (`worker`), the HTTP
app (`app`) and its Prometheus metrics (`metrics`); `build_server` puts them together."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace


@dataclass
class Server:
    app: object
    worker: object
    model_name: str
    device: str


def eos_ids(tokenizer, model) -> tuple[int, ...]:
    """The model's end-of-sequence tokens: the tokenizer's and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    return tuple(sorted(ids))


def build_server(model_ref: str, budget: str = "0", *, device: str = "cpu", policy: str = "haq",
                 hardware: str | None = None, profile: str | None = None, max_batch: int = 8, max_queue: int = 64,
                 request_timeout: float = 600.0, chat_template: str | None = None, batch_invariant: bool = False,
                 served_name: str | None = None, int8_backend: str | None = None, prefill_chunk: int = 512) -> Server:
    """Load MODEL (MoE: offloaded by the engine under `budget`; dense: as it is) and build the app."""
    from haq.api import open_engine
    from haq.errors import HaqError
    from haq.loading import load_model, read_config, resolve_model_path
    from haq.models.adapters import adapter_for
    from haq.runtime.generation import BatchGenerator
    from haq.serve.app import create_app
    from haq.serve.metrics import ServeMetrics
    from haq.serve.worker import Worker

    if max_queue < 1:
        raise HaqError(f"--max-queue must be >= 1, got {max_queue}")
    if request_timeout <= 0:
        raise HaqError(f"--request-timeout must be > 0 seconds, got {request_timeout}")
    if prefill_chunk < 1:
        raise HaqError(f"--prefill-chunk must be >= 1 tokens, got {prefill_chunk}")
    template = None
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise HaqError(f"--chat-template {chat_template}: no such file")
        template = path.read_text()
    path = resolve_model_path(model_ref)
    name = served_name or path.name
    engine = None
    if adapter_for(SimpleNamespace(**read_config(path))).moe is not None:
        engine, tokenizer = open_engine(path, budget, device=device, policy=policy, hardware=hardware,
                                        profile=profile, int8_backend=int8_backend)
        engine.record_routing = False  # a server runs for days: keep no per-forward routing
        generator = engine.generator(max_batch, eos_ids(tokenizer, engine.model), batch_invariant, prefill_chunk)
        model = engine.model
    else:
        model, tokenizer, _ = load_model(path, int8_backend=int8_backend)
        model = model.to(device)
        generator = BatchGenerator(model, max_batch=max_batch, eos_token_ids=eos_ids(tokenizer, model),
                                   batch_invariant=batch_invariant, prefill_chunk=prefill_chunk)
    context = generator.max_context or 2048
    # two tokenizer instances: the model thread decodes while the HTTP side encodes
    worker = Worker(generator, copy.deepcopy(tokenizer), ServeMetrics(), max_queue=max_queue, engine=engine)
    app = create_app(worker, tokenizer, name, context, request_timeout=request_timeout, chat_template=template)
    return Server(app, worker, name, device)
