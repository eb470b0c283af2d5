"""Greedy decoding two ways, each calling `on_token()` the moment a token exists.

eager: transformers' `generate` with its dynamic cache, as a user would call it.
fast (`generation.fast=true`): a static KV cache (fixed addresses, no reallocation as the text
grows) and the one-token forward compiled (torch.compile fuses its small elementwise kernels)
and captured once as a CUDA graph replayed per token, so a decode step costs the GPU's kernels,
not Python's launches of them. Where compilation fails (or `generation.compile=false` skips its
minutes) it captures the uncompiled step; where a graph cannot be captured (no CUDA device, a
model over several GPUs, layers a graph cannot hold, as LLM.int8's host-side outlier search, or a
capture error) it decodes with the static cache alone. `fallback` says why a path was not taken.
For Falcon-7B's layout the fast step is falcon_exp/falcon_step.py's lean one. Both pick greedy
tokens, end-of-sequence suppressed when the length is forced (as `min_new_tokens` does): in
float32 the same tokens as `generate(do_sample=False)` (tests); in bf16 the fast step's fused
kernels round in another order, so a near-tie may go the other way.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from falcon_exp.cache import cache_dir, content_hash
from falcon_exp.config import JobConfig
from falcon_exp.falcon_step import falcon_for_decoding, share_reads
from falcon_exp.roofline import kv_bytes_per_token


class Decoder(Protocol):
    """What the runner and the quality reference ask of a decoder."""

    path: str  # eager, compiled_cuda_graph, cuda_graph or static_cache
    fallback: str | None  # why the fast path runs without the compilation asked for, or without a graph
    prepare_s: float | None  # seconds spent building it (the fast path's compile and capture); None for eager
    inductor_options: str  # `key=value, ...`: the options beyond inductor's defaults its compiled step was built with; "" for none
    kv_bytes_per_token: float  # KV-cache bytes stored per token of context

    def kv_bytes_per_step(self, prompt_tokens: int, new_tokens: int) -> float:
        """Mean KV-cache bytes one decode step reads, for a generation of this shape (every sequence's)."""

    def generate(self, input_ids: torch.Tensor, new_tokens: int, force_length: bool, on_token: Callable[[], None],
                 attention_mask: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy tokens after each row of `input_ids` (left-padded where `attention_mask` has 0s),
        calling `on_token()` the moment each step's tokens exist."""


class _Streamer(BaseStreamer):
    def __init__(self, on_token: Callable[[], None]) -> None:
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:  # generate first hands over the prompt itself
            self.on_token()
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _eos_ids(model: PreTrainedModel) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class EagerDecoder:
    path = "eager"
    fallback = None
    prepare_s = None  # nothing to prepare
    inductor_options = ""  # nothing compiled

    def __init__(self, model: PreTrainedModel, pad_token_id: int, batch: int = 1) -> None:
        self.model, self.pad_token_id, self.batch = model, pad_token_id, batch
        token = torch.zeros((1, 1), dtype=torch.long, device=model.get_input_embeddings().weight.device)
        self.kv_bytes_per_token = kv_bytes_per_token(model, token)

    def kv_bytes_per_step(self, prompt_tokens: int, new_tokens: int) -> float:
        """Mean KV-cache bytes a decode step reads: the dynamic cache holds what was generated so
        far, so decode step i (1..n-1) attends to prompt + i tokens, in every sequence of the batch."""
        return self.batch * self.kv_bytes_per_token * (prompt_tokens + new_tokens / 2)

    def generate(self, input_ids: torch.Tensor, new_tokens: int, force_length: bool, on_token: Callable[[], None],
                 attention_mask: torch.Tensor | None = None) -> list[list[int]]:
        with torch.inference_mode():
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens if force_length else None,
                do_sample=False,
                streamer=_Streamer(on_token),
                pad_token_id=self.pad_token_id,
            )
        return output[:, input_ids.shape[1] :].tolist()


class FastDecoder:
    """Static KV cache sized for the longest generation of `batch` sequences; one (compiled) CUDA
    graph per decoder. A batch of several left-padded sequences carries its attention mask, each
    sequence's position and the cache's next slot in buffers that the step itself advances."""

    def __init__(self, model: PreTrainedModel, max_tokens: int, config: JobConfig, device: str, batch: int = 1) -> None:
        from transformers import StaticCache

        self.model, self.max_tokens, self.batch, self.compile = model, max_tokens, batch, config.generation.compile
        self.devices = {p.device for p in model.parameters()}
        self.cache = StaticCache(config=model.config, max_cache_len=max_tokens)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        where = model.get_input_embeddings().weight.device
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=where)
        # batch > 1: the mask over the cache's slots, each sequence's next position, the next slot
        self.batched = batch > 1
        self.mask = torch.zeros((batch, max_tokens), dtype=torch.long, device=where)
        self.position = torch.zeros((batch, 1), dtype=torch.long, device=where)
        self.slot = torch.zeros((1,), dtype=torch.long, device=where)
        head = model.get_output_embeddings().weight
        self.eos = _eos_ids(model)
        self.suppress = torch.zeros(head.shape[0], dtype=torch.float32, device=head.device)  # -inf at EOS when forced
        self.graph, self.path, self.inductor_options = None, "static_cache", ""
        started = time.perf_counter()
        share_reads(model)
        self.fallback = self._why_no_graph(config, device) or self._capture(config)
        self.prepare_s = time.perf_counter() - started  # joining weights, compiling and capturing the step, where they run

    @property
    def kv_bytes_per_token(self) -> float:
        """Per token of one sequence's context."""
        return self._static_cache_bytes() / (self.max_tokens * self.batch)

    def kv_bytes_per_step(self, prompt_tokens: int, new_tokens: int) -> float:
        """KV-cache bytes a decode step reads: attention runs over the whole static cache (its
        unused positions masked), every sequence's, whatever the text's length."""
        return float(self._static_cache_bytes())

    def _static_cache_bytes(self) -> int:
        """The static cache's keys and values as allocated (on its first use)."""
        layers = [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]
        if not layers:
            raise RuntimeError("the static cache is allocated on first use; generate once before asking its size")
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))

    def _forward(self, input_ids: torch.Tensor, **where: torch.Tensor) -> torch.Tensor:
        """Next-token logits, as float32 with suppressed tokens at -inf (generate's order)."""
        output = self.model(input_ids, use_cache=True, logits_to_keep=1, **{self.cache_kwarg: self.cache}, **where)
        return output.logits[:, -1, :].float() + self.suppress

    def _advance(self, input_ids: torch.Tensor, **where: torch.Tensor) -> None:
        """Write the greedy next token after `input_ids` into the token buffer."""
        self.token.copy_(self._forward(input_ids, **where).argmax(-1, keepdim=True).to(self.token.device))

    def _step(self) -> None:
        """The decode step: read the last token from its buffer, write the next one there (in a
        batch: at each sequence's position and the cache's next slot, which it then advances)."""
        if not self.batched:
            self._advance(self.token)
            return
        self._advance(self.token, attention_mask=self.mask, position_ids=self.position, cache_position=self.slot)
        self.position.add_(1)
        self.slot.add_(1)
        self.mask.index_fill_(1, self.slot.clamp(max=self.max_tokens - 1), 1)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """The prompts, eager; in a batch, with their mask and positions, and the buffers set for the first step."""
        if not self.batched:
            self._advance(input_ids)
            return
        length = input_ids.shape[1]
        mask = attention_mask.to(self.mask.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.mask.zero_()
        self.mask[:, :length] = mask
        self._advance(input_ids, attention_mask=self.mask, position_ids=positions,
                      cache_position=torch.arange(length, device=self.mask.device))
        self.position.copy_(positions[:, -1:] + 1)
        self.slot.fill_(length)
        self.mask[:, length] = 1

    def _marks_follow_steps(self) -> bool:
        """Whether `on_token`'s mark (a CUDA event on the current device's stream) comes after each
        step without the host reading its token: the model wholly on the CPU or on the current GPU;
        across GPUs, or on another one, the step ends on a stream the mark does not wait for."""
        (only,) = self.devices if len(self.devices) == 1 else (None,)
        return only is not None and (only.type == "cpu" or only.index == torch.cuda.current_device())

    def _why_no_graph(self, config: JobConfig, device: str) -> str | None:
        if device != "cuda":
            return f"CUDA graphs need a CUDA device (device={device})"
        if len(self.devices) > 1:
            return f"the model spans {len(self.devices)} devices and a CUDA graph is captured on one"
        return config.quantization.method.graph_blocker(config) if config.bits != 16 else None

    def _capture(self, config: JobConfig) -> str | None:
        """The compiled step as a graph (with the inductor options its layers need), else (or with
        generation.compile=false) the plain step as one; the reasons for what failed."""
        self._buffers_beside_weights()
        torch._dynamo.reset()  # a fresh compile per decoder: past the recompile limit dynamo runs eager silently
        use_compile_cache()
        options = config.quantization.method.inductor_options(config) if config.bits != 16 else {}
        reasons = []
        with falcon_for_decoding(), torch._inductor.config.patch(options):
            for path, what, step in self._attempts():
                try:
                    self.graph, self.path = cuda_graph_of(step), path
                    if path == "compiled_cuda_graph":
                        self.inductor_options = ", ".join(f"{key}={value}" for key, value in options.items())
                    return "; ".join(reasons) or None
                except Exception as error:  # noqa: BLE001 - inductor and capture raise many kinds; each is a reason
                    torch.cuda.synchronize()
                    reasons.append(f"{what} failed: {str(error).strip().splitlines()[0][:200]}")
                finally:
                    self.cache.reset()
        return "; ".join(reasons)

    def _attempts(self) -> list[tuple[str, str, Callable[[], None]]]:
        """The steps to capture, in order of preference: (decode path, what may fail, step)."""
        plain = ("cuda_graph", "CUDA graph capture", self._step)
        return [("compiled_cuda_graph", "torch.compile", torch.compile(self._step, dynamic=False)), plain] if self.compile else [plain]

    def _buffers_beside_weights(self) -> None:
        """A loader may leave non-persistent buffers (rotary frequencies) on the host; a graph
        cannot copy them in at every step, so they move to the weights' device once."""
        device = next(self.model.parameters()).device
        for module in self.model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and buffer.device != device:
                    module._buffers[name] = buffer.to(device)

    def generate(self, input_ids: torch.Tensor, new_tokens: int, force_length: bool, on_token: Callable[[], None],
                 attention_mask: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy tokens. A forced length needs no look at them before the end, so the host does not
        read them: each step's token is copied to a device buffer and the next step is launched
        while the last runs. Otherwise the host reads each token (to stop at EOS), as it
        does wherever a mark on the current device would not follow the step."""
        self.suppress[self.eos] = float("-inf") if force_length else 0.0
        step = self.graph.replay if self.graph is not None else self._step
        with torch.no_grad(), falcon_for_decoding():
            self.cache.reset()
            self._prefill(input_ids, attention_mask)
            if force_length and self._marks_follow_steps():
                tokens = torch.empty((self.batch, new_tokens), dtype=self.token.dtype, device=self.token.device)
                for i in range(new_tokens):
                    on_token()
                    tokens[:, i : i + 1].copy_(self.token)
                    if i + 1 < new_tokens:
                        step()
                return tokens.tolist()
            generated: list[list[int]] = []
            while True:
                on_token()
                generated.append(self.token[:, 0].tolist())
                if len(generated) == new_tokens or (not force_length and generated[-1][0] in self.eos):
                    return [list(tokens) for tokens in zip(*generated)]
                step()


def use_compile_cache() -> Path:
    """Inductor's caches (its FX graph cache, the Triton kernels it builds) under the project's
    cache, in a folder of this torch and these GPUs, so that a job that compiles what an earlier
    one compiled (same model, quantization and cache length: the same graph) loads it instead,
    in this process or a later one. The graph's own key tells models and settings apart. A
    TORCHINDUCTOR_CACHE_DIR of the user's is kept (inductor writes its own default there once used)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    own = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if own and os.path.abspath(own) != os.path.abspath(default_cache_dir()):
        return Path(own)
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    folder = cache_dir() / "compile" / content_hash({"torch": torch.__version__, "gpus": gpus, "cuda": torch.version.cuda}, 16)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    torch._inductor.config.fx_graph_cache = True
    return folder


def cuda_graph_of(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """`step` captured as a CUDA graph: warmed up on a side stream first (compilation, cuBLAS and
    the cache allocate there)."""
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    return graph


def each_alone(model: PreTrainedModel, input_ids: tuple[torch.Tensor, ...], lengths: list[int], force_length: bool,
               pad_token_id: int) -> list[list[int]]:
    """Each prompt's greedy continuation of its length, decoded alone and untimed (what quality scores)."""
    decoder, where = EagerDecoder(model, pad_token_id), next(model.parameters()).device
    return [decoder.generate(ids.to(where), length, force_length, lambda: None)[0] for ids, length in zip(input_ids, lengths)]


def decoder_for(model: PreTrainedModel, config: JobConfig, max_tokens: int, device: str, pad_token_id: int) -> Decoder:
    """The eager decoder, or with generation.fast the fast one with room for `max_tokens` (prompt
    plus generated), for batches of config.batch_size."""
    if config.generation.fast:
        return FastDecoder(model, max_tokens, config, device, config.batch_size)
    return EagerDecoder(model, pad_token_id, config.batch_size)
