"""Decode steps replayed from a CUDA graph, for a model whose every weight is on the device.

At decode sizes a GPU step is launch-bound: a layer is a few dozen small kernels, each one
Python dispatch and launch, and the per-call expert path adds a host sync per MoE layer. Here one
step is captured once and replayed: the KV cache is transformers' `StaticCache` (fixed buffers,
written at a device-side length, from which positions and masks follow too), the input ids are a
fixed buffer the step reads, and the routed experts run without a host round trip (int8:
`haq.kernels.device_moe`; float experts: transformers' `grouped_mm` implementation, which the
caller sets). On a CPU the same step runs eagerly, which is what the tests compare with
transformers' own decoding.

The offloading engine cannot be captured whole: its policy decides every expert call on the host
from the routing. This serves the all-resident configuration (the bf16 baseline and int8 at
full budget) and is the step a piecewise capture of the engine would reuse.
"""
from __future__ import annotations

import torch
from torch import nn

from haq.errors import HaqError
from haq.kernels.experts import Int8Experts

SYNC_FREE_EXPERTS = ("grouped_mm", "batched_mm")
"""transformers' experts implementations that keep the routing on the device."""
WARMUP_STEPS = 2
"""Eager steps on a side stream before the capture: kernels compiled, lazy buffers allocated."""


def capture_refusal(model: nn.Module) -> str | None:
    """Why a decode step of `model` cannot be captured (its experts read the routing on the host), or None."""
    device = next(model.parameters()).device
    implementation = getattr(model.config, "_experts_implementation", None)
    for name, module in model.named_modules():
        if isinstance(module, Int8Experts) and not module.grouped_on_device(torch.empty(0, device=device)):
            return (f"{name} runs its experts call by call (a weight-only or static-scale checkpoint, or no "
                    "triton): only dynamic per-token W8A8 experts have a device path")
        if type(module).__name__ == "OffloadedExperts":
            return "the engine's offloaded experts are decided on the host: use haq.runtime.resident.static_step"
        if hasattr(module, "gate_up_proj") and implementation not in SYNC_FREE_EXPERTS:
            return (f"{name} uses transformers' {implementation!r} experts, which read the "
                    "routing on the host: model.set_experts_implementation('grouped_mm') first")
    return None


class GraphedDecoder:
    """A fixed batch of equal-length sequences: `prefill` the prompts, then `step` one token per row."""

    def __init__(self, model: nn.Module, max_len: int, batch: int = 1, graphs: bool | None = None) -> None:
        from transformers import StaticCache

        if max_len < 2 or batch < 1:
            raise HaqError(f"a graphed decoder needs max_len >= 2 and batch >= 1, got {max_len} and {batch}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise HaqError(f"CUDA graphs need the model on a CUDA device, not {self.device}")
        if self.graphs and model.config._attn_implementation != "sdpa":
            raise HaqError(f"CUDA graphs need SDPA attention ({model.config._attn_implementation!r} masks copy from the host)")
        why = capture_refusal(model) if self.graphs else None
        if why is not None:
            raise HaqError(f"no CUDA graph for this model: {why}")
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        if any(layer.is_sliding for layer in self.cache.layers):
            raise HaqError("sliding-window attention keeps its cache length on the host: no static step for it")
        self.max_len, self.batch = max_len, batch
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.length = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.closed = False

    def close(self) -> None:
        """Drop the graph: the weights it reads may be freed (the engine's static step ends)."""
        self.graph, self.logits, self.closed = None, None, True

    def _check_open(self) -> None:
        if self.closed:
            raise HaqError("this decoder is closed (its static step has ended): make a new one")

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """prompts [batch, L] -> the last position's logits [batch, V]; the cache starts over."""
        self._check_open()
        if prompts.dim() != 2 or prompts.shape[0] != self.batch or prompts.shape[1] < 1:
            raise HaqError(f"prefill takes [{self.batch}, L >= 1] token ids, got {tuple(prompts.shape)}")
        if prompts.shape[1] >= self.max_len:
            raise HaqError(f"a prompt of {prompts.shape[1]} tokens leaves no room in max_len {self.max_len}")
        self.cache.reset()  # in place: a captured step keeps its buffers
        L = prompts.shape[1]
        out = self.model(input_ids=prompts.to(self.device), past_key_values=self.cache, use_cache=True)
        self.length = L
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch] (the last sampled) -> next logits [batch, V]; a view of a fixed buffer
        under graphs, valid until the next step."""
        self._check_open()
        if self.length == 0:
            raise HaqError("step before prefill: give the prompts first")
        if tokens.numel() != self.batch:
            raise HaqError(f"step takes one token per row ({self.batch}), got {tokens.numel()}")
        if self.length >= self.max_len:
            raise HaqError(f"the static cache is full ({self.max_len} positions): make the decoder with a larger max_len")
        self.ids.copy_(tokens.reshape(self.batch, 1))
        if not self.graphs:
            logits = self._forward()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.length += 1
        return logits

    def _warm_up(self) -> None:
        """Run the step WARMUP_STEPS times without moving on: each advances the cache's write
        length, which is put back after each, so every run writes the step's own column (the
        cache's last one, possibly) and the next real step overwrites it."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        for _ in range(WARMUP_STEPS):
            self._forward()
            for layer, length in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(length)

    def _capture(self) -> None:
        """Warm up on a side stream (kernels compiled, lazy buffers allocated), then capture."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._warm_up()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()


@torch.no_grad()
def greedy(decoder: GraphedDecoder, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each row of prompts [batch, L] by `new_tokens` tokens."""
    if new_tokens < 1:
        raise HaqError(f"new_tokens must be >= 1, got {new_tokens}")
    token = decoder.prefill(prompts).argmax(-1)
    out = [token]
    for _ in range(new_tokens - 1):
        token = decoder.step(token).argmax(-1)
        out.append(token)
    return torch.stack(out, dim=1).tolist()
