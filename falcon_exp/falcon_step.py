"""Falcon's one-token decode step, made lean for the fast path.

transformers' Falcon is written for every shape; one new token over a static cache needs less:
- heads split with slices, not Python lists (a list index is a host tensor a CUDA graph cannot capture);
- Falcon-7B's 71 query heads against its one key-value head attended as 71 query rows of one
  head: one fused attention kernel, where transformers' broadcast (a shape no fused kernel
  takes) runs torch's math attention (two float32 cuBLAS products, a softmax and copies);
- where attention and MLP read the same normed input (Falcon-7B's parallel layout), their four
  weight matrices read as two: [query_key_value; dense_h_to_4h] on the input, [dense |
  dense_4h_to_h] on the joined outputs. Fewer, larger GEMVs stream closer to the memory's
  bandwidth. The layers' own weights become views of the joined ones (the weights take no more
  memory), so every other path computes with the same numbers.
Any other call (a prompt, alibi, attention weights asked for) runs transformers' own code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import Cache, PreTrainedModel
from transformers.models.falcon.modeling_falcon import FalconAttention, FalconDecoderLayer, FalconLinear, apply_rotary_pos_emb

SHARED = "falcon_exp_shared_reads"  # a layer's joined weights: (into, out_of)


def _split_heads_by_slices(self: FalconAttention, fused_qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """FalconAttention._split_heads with slices where it indexes with Python lists (`[-2]`).
    Same values (the list form copies, the slice form views)."""
    batch, length, _ = fused_qkv.shape
    if self.new_decoder_architecture:
        qkv = fused_qkv.view(batch, length, -1, self.num_heads // self.num_kv_heads + 2, self.head_dim)
        query, key, value = qkv[:, :, :, :-2], qkv[:, :, :, -2:-1], qkv[:, :, :, -1:]
        key, value = torch.broadcast_to(key, query.shape), torch.broadcast_to(value, query.shape)
        return tuple(x.flatten(2, 3) for x in (query, key, value))
    if self.multi_query:
        fused_qkv = fused_qkv.view(batch, length, self.num_heads + 2, self.head_dim)
        return fused_qkv[..., :-2, :], fused_qkv[..., -2:-1, :], fused_qkv[..., -1:, :]
    return _LIST_INDEXED_SPLIT(self, fused_qkv)


def _lean(attention: FalconAttention, hidden_states: torch.Tensor, alibi: torch.Tensor | None, output_attentions: bool) -> bool:
    """Whether this call is one new token of a multi-query Falcon with rotary positions and SDPA,
    in inference (the lean step has no dropout)."""
    return (attention.multi_query and not attention.new_decoder_architecture and alibi is None and not output_attentions
            and hidden_states.shape[1] == 1 and attention.config._attn_implementation == "sdpa" and not attention.training)


def _attend(attention: FalconAttention, fused_qkv: torch.Tensor, attention_mask: torch.Tensor | None,
            layer_past: Cache | None, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The new token's attention output before `dense`, [batch, 1, heads x head_dim]: its heads as
    the query rows of the one key-value head, against the same cache and mask (the mask's one row
    serves every head)."""
    batch = fused_qkv.shape[0]
    query, key, value = (x.transpose(1, 2) for x in _split_heads_by_slices(attention, fused_qkv))  # [batch, heads, 1, head_dim]
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, attention.layer_idx)
    # the query rows against the one head: torch's fused attention (cuDNN's, on the H200), in
    # float32 where it reduces, its probabilities rounded to the values' dtype before they weigh them
    attended = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key, value, attn_mask=attention_mask)
    return attended.reshape(batch, 1, attention.num_heads * attention.head_dim)


def _one_token_attention(self: FalconAttention, hidden_states: torch.Tensor, alibi: torch.Tensor | None,
                         attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                         layer_past: Cache | None = None, use_cache: bool = False, output_attentions: bool = False,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
    """FalconAttention.forward, lean where `_lean` says so."""
    if not _lean(self, hidden_states, alibi, output_attentions):
        return _TRANSFORMERS_ATTENTION(self, hidden_states, alibi, attention_mask, position_ids, layer_past, use_cache,
                                       output_attentions, position_embeddings, **kwargs)
    return self.dense(_attend(self, self.query_key_value(hidden_states), attention_mask, layer_past, position_embeddings)), None


def _one_token_layer(self: FalconDecoderLayer, hidden_states: torch.Tensor, alibi: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                     layer_past: Cache | None = None, use_cache: bool = False, output_attentions: bool = False,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
    """FalconDecoderLayer.forward with its weights read as two matrices, where `share_reads`
    joined them and the call is lean: x + [attention, act(h)] @ out_of.T, [qkv, h] = ln(x) @ into.T."""
    shared = self.__dict__.get(SHARED)
    if shared is None or not _lean(self.self_attention, hidden_states, alibi, output_attentions):
        return _TRANSFORMERS_LAYER(self, hidden_states, alibi, attention_mask, position_ids, layer_past, use_cache,
                                   output_attentions, position_embeddings, **kwargs)
    into, out_of = shared
    attention = self.self_attention
    both = self.input_layernorm(hidden_states) @ into.T
    split = attention.query_key_value.out_features
    attended = _attend(attention, both[..., :split], attention_mask, layer_past, position_embeddings)
    joined = torch.cat([attended, self.mlp.act(both[..., split:])], dim=-1)
    return joined @ out_of.T + hidden_states, None


def share_reads(model: PreTrainedModel) -> int:
    """Joins the four weight matrices of every Falcon layer whose attention and MLP read one
    normed input (parallel attention, one layer norm, multi-query, plain unbiased weights: the
    16-bit Falcon-7B) into two, the layer's own weights becoming views of them. The join stays
    with the model (a later job on the cached model reads the same values through the views); a
    layer whose weights were replaced since is joined again. Joining takes one layer's weights
    more memory at a time; on a GPU without it, the layers left are not joined. Returns the
    number of layers joined."""
    joined = 0
    for layer in model.modules():
        if not isinstance(layer, FalconDecoderLayer):
            continue
        if SHARED in layer.__dict__ and not _still_joined(layer):
            del layer.__dict__[SHARED]
        if SHARED in layer.__dict__ or not _joinable(layer):
            continue
        attention, mlp = layer.self_attention, layer.mlp
        try:
            with torch.no_grad():
                into = torch.cat([attention.query_key_value.weight, mlp.dense_h_to_4h.weight])
                out_of = torch.cat([attention.dense.weight, mlp.dense_4h_to_h.weight], dim=1)
        except torch.OutOfMemoryError:
            break
        for linear, view in _views(layer, into, out_of):
            linear.weight.data = view
        layer.__dict__[SHARED] = (into, out_of)
        joined += 1
    if joined and torch.cuda.is_available():
        # what the allocator can hand back; holes the freed matrices left in its segments stay
        # reserved (by reasoning up to one layer's weights, 0.41 GB on Falcon-7B; not measured)
        torch.cuda.empty_cache()
    return joined


def _views(layer: FalconDecoderLayer, into: torch.Tensor, out_of: torch.Tensor) -> tuple[tuple[torch.nn.Module, torch.Tensor], ...]:
    """Each of the layer's four linear layers with the part of the joined matrices that is its weight."""
    attention, mlp = layer.self_attention, layer.mlp
    rows, width = attention.query_key_value.out_features, attention.dense.in_features
    return ((attention.query_key_value, into[:rows]), (mlp.dense_h_to_4h, into[rows:]),
            (attention.dense, out_of[:, :width]), (mlp.dense_4h_to_h, out_of[:, width:]))


def _still_joined(layer: FalconDecoderLayer) -> bool:
    """Whether the layer's weights are still the views `share_reads` made (a `.to()` or a loaded
    state dict replaces them, and the joined matrices would then be stale)."""
    return all(linear.weight.data_ptr() == view.data_ptr() and linear.weight.shape == view.shape
               for linear, view in _views(layer, *layer.__dict__[SHARED]))


def _joinable(layer: FalconDecoderLayer) -> bool:
    """The layout share_reads joins: FalconLinear or nn.Linear (what the harness builds it as),
    on one device, not placed by accelerate's hooks (offloaded weights are loaded into the
    layers at each call, not into joined copies)."""
    config, attention, mlp = layer.config, layer.self_attention, layer.mlp
    linears = (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
    placed_by_hooks = any(hasattr(m, "_hf_hook") for m in layer.modules())
    return (config.parallel_attn and not config.new_decoder_architecture and attention.multi_query and not config.alibi
            and not placed_by_hooks
            and all(type(m) in (torch.nn.Linear, FalconLinear) and m.bias is None and type(m.weight.data) is torch.Tensor for m in linears)
            and len({(m.weight.dtype, m.weight.device) for m in linears}) == 1 and linears[0].weight.device.type != "meta")


_LIST_INDEXED_SPLIT = FalconAttention._split_heads
_TRANSFORMERS_ATTENTION = FalconAttention.forward
_TRANSFORMERS_LAYER = FalconDecoderLayer.forward


@contextlib.contextmanager
def falcon_for_decoding() -> Iterator[None]:
    """While the fast path decodes or captures its step, Falcon runs the lean step above."""
    classes = FalconAttention._split_heads, FalconAttention.forward, FalconDecoderLayer.forward
    FalconAttention._split_heads, FalconAttention.forward = _split_heads_by_slices, _one_token_attention
    FalconDecoderLayer.forward = _one_token_layer
    try:
        yield
    finally:
        FalconAttention._split_heads, FalconAttention.forward, FalconDecoderLayer.forward = classes
