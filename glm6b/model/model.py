"""ChatGLM-6B (v1) as plain PyTorch: 2D rotary attention, GLM blocks, prefix-LM masks, KV cache.

Written from the behaviour description in the THUDM reference (`modeling_chatglm.py`, HF repo
THUDM/chatglm-6b). Module and parameter names are the HF ones (`transformer.layers.0.attention.
query_key_value.weight`, ...) so the real checkpoint loads with no key map and PEFT targets match.

Shapes: B = batch, T = new tokens this call, S = keys attended (past + new), nh = heads,
d = head dim, H = hidden size, V = vocab rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ChatGLMConfig
from .cache import KVCache, PrefixPast, StaticKVCache, write_slots
from .masks import InputError, prompt_inputs

# The reference's GLMBlock takes `num_layers` with a default of 28 and the model never passes
# config.num_layers, so the residual scale is sqrt(2 * 28) for every depth (spec 4.2).
RESIDUAL_ALPHA = math.sqrt(2 * 28)
# The reference fills masked scores with -10000, not -inf: fully masked rows attend uniformly.
MASKED_SCORE = -10000.0


# ----------------------------------------------------------------------------------- rotary


def rotary_inv_freq(rot_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies 1 / 10000^(2j / rot_dim), rounded to float16 as the reference stores them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
    return inv_freq.half().float()


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for integer positions [B, T] -> two [B, 1, T, rot_dim] tensors in `dtype`.

    The angle is one float32 product p * inv_freq, as in the reference's float32 path. In half
    precision the reference also rounds p and the angle to float16; we keep them in float32 and
    round only cos/sin, which is exact for positions beyond 2048 too.
    """
    freqs = positions.float()[..., None] * inv_freq  # [B, T, rot_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, rot_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------- layers


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused per-head QKV and 2D rotary positions."""

    def __init__(self, config: ChatGLMConfig, layer_id: int, dtype=None, device=None):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.query_key_value = nn.Linear(h, 3 * h, dtype=dtype, device=device)
        self.dense = nn.Linear(h, h, dtype=dtype, device=device)

    def forward(self, x, cos, sin, mask, kv_cache=None, input_pos=None):
        """x [B, T, H]; cos/sin: (absolute, block) pairs from `rotary_cos_sin`; mask [B, 1, T, S] or None;
        input_pos: where a StaticKVCache stores the new keys (see StaticKVCache.update)."""
        q, k, v = self.rotated_qkv(x, cos, sin)
        padded_queries = True
        if isinstance(kv_cache, StaticKVCache):
            k, v = kv_cache.update(self.layer_id, k, v, input_pos)  # [B, nh, S, d]
            # A decode step's token always sees itself: no fully masked query, no host sync needed.
            padded_queries = isinstance(input_pos, int)
        elif kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, k, v)  # [B, nh, S, d]
        return self.attend(q, k, v, mask, padded_queries)

    def rotated_qkv(self, x, cos, sin):
        """x [B, T, H] -> q, k, v [B, nh, T, d], q and k rotated by their 2D positions."""
        b, t, _ = x.shape
        d = self.head_dim
        # Fused rows are per-head interleaved: [nh, 3d] with q | k | v inside each head (spec 4.1).
        # -1 rather than num_heads: under tensor parallelism a rank holds only some of the heads.
        qkv = self.query_key_value(x).view(b, t, -1, 3 * d)
        q, k, v = qkv.transpose(1, 2).split(d, dim=-1)  # each [B, nh, T, d]
        # 2D RoPE: the first half of each head rotates with the absolute positions, the second half
        # with the block positions (spec 4.3).
        (cos0, cos1), (sin0, sin1) = cos, sin
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        q = torch.cat([apply_rotary(q1, cos0, sin0), apply_rotary(q2, cos1, sin1)], dim=-1)
        k = torch.cat([apply_rotary(k1, cos0, sin0), apply_rotary(k2, cos1, sin1)], dim=-1)
        return q, k, v

    def attend(self, q, k, v, mask, padded_queries: bool = True):
        """Queries [B, nh, T, d] over keys/values [B, nh, S, d] -> the projected output [B, T, H]."""
        context = attention(q, k, v, mask, coeff=float(self.layer_id + 1), padded_queries=padded_queries)
        return self.project(context)

    def project(self, context):
        """Per-head attention outputs [B, nh, T, d] -> the output projection of the heads concatenated, [B, T, H]."""
        b, _, t, _ = context.shape
        return self.dense(context.transpose(1, 2).reshape(b, t, -1))


def attention(q, k, v, mask: torch.Tensor | None, coeff: float, padded_queries: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the reference's layer scaling and -10000 masking.

    The reference divides q by sqrt(d) * coeff and multiplies the float32 scores by coeff again
    (coeff = layer index + 1); we do the same division and pass coeff as the kernel's scale so the
    arithmetic matches to rounding. A query row whose keys are all masked (a left-padding token)
    gets, as in the reference, a uniform distribution over all keys, i.e. the mean of v.

    Args:
        q [B, nh, T, d], k and v [B, nh, S, d]; mask [B, 1, T, S] bool, True = masked, or None.
        padded_queries: False promises that no query row is fully masked (a decode step); the mask
            is then used as it is, with none of the data-dependent checks that sync with the device.
    """
    q = q / (math.sqrt(q.shape[-1]) * coeff)
    if not padded_queries:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else ~mask, scale=coeff)
    if mask is None or not mask.any():
        return F.scaled_dot_product_attention(q, k, v, scale=coeff)
    fully_masked = mask.all(dim=-1, keepdim=True)  # [B, 1, T, 1]
    allowed = ~(mask & ~fully_masked)  # fully masked rows: let them see everything, fixed below
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=coeff)
    if fully_masked.any():
        context = torch.where(fully_masked, v.mean(dim=2, keepdim=True), context)
    return context


def decode_attention(q, keys, values, mask: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """`attention` for a decode step, with the layer's coeff as a tensor: the reference's explicit
    product (scores in the activation dtype, scaled by coeff in float32, -10000 where masked, float32
    softmax). A tensor coeff lets one compiled graph serve every layer (SDPA takes its scale as a
    Python number, which a compiled graph would hold as a per-layer constant).

    Args:
        q [B, nh, 1, d]; keys, values [B, nh, S, d]; mask [B, 1, 1, S] bool, True = masked (a decode
        step's token always sees itself, so no row is fully masked); coeff: [] float32, layer index + 1.
    """
    q = q / (coeff * math.sqrt(q.shape[-1]))
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * coeff
    probs = scores.masked_fill(mask, MASKED_SCORE).softmax(dim=-1).to(values.dtype)
    return torch.matmul(probs, values)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximate GELU: the reference's 0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2))).

    PyTorch's fused kernel computes the same function in one pass over the [T, 4H] activations
    instead of eight (rounded once, where the reference's elementwise ops round after each); on the
    golden model the logits move by under 2e-7 of their largest magnitude.
    """
    return F.gelu(x, approximate="tanh")


class GLU(nn.Module):
    """The MLP (the reference names it GLU although it is not gated): dense_4h_to_h(gelu(dense_h_to_4h(x)))."""

    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size, dtype=dtype, device=device)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, x):
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    """One layer: the residual adds the *normalized* input scaled by alpha = sqrt(56) (spec 4.2)."""

    def __init__(self, config: ChatGLMConfig, layer_id: int, dtype=None, device=None):
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.attention = SelfAttention(config, layer_id, dtype=dtype, device=device)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.mlp = GLU(config, dtype=dtype, device=device)

    def forward(self, x, cos, sin, mask, kv_cache=None, input_pos=None):
        a = self.input_layernorm(x)
        return self.after_attention(a, self.attention(a, cos, sin, mask, kv_cache, input_pos))

    def after_attention(self, a, attended):
        """The rest of the layer from the normalized input `a` and the attention's output: both residuals
        and the MLP."""
        h = a * RESIDUAL_ALPHA + attended
        m = self.post_attention_layernorm(h)
        return m * RESIDUAL_ALPHA + self.mlp(m)

    def decode(self, x, cos, sin, mask, keys, values, slots, coeff):
        """One token per row through the layer, with every per-layer value passed in as a tensor, so
        that one compiled graph serves every layer (the engine's compiled CPU step compiles this).

        The math of `forward` with a StaticKVCache and a [B] input_pos, up to rounding (attention by
        `decode_attention`). x [B, 1, H]; cos/sin as for forward; mask [B, 1, 1, S]; keys/values
        [B, nh, S, d], this layer's cache (the new token's are written at slots [B]); coeff: [] float32,
        the layer index + 1.
        """
        a = self.input_layernorm(x)
        q, k, v = self.attention.rotated_qkv(a, cos, sin)
        write_slots(keys, values, k, v, slots)
        context = decode_attention(q, keys, values, mask, coeff)  # [B, nh, 1, d]
        return self.after_attention(a, self.attention.project(context))

    def forward_chunked(self, x, cos, sin, mask, kv_cache: StaticKVCache, input_pos: int, chunk_size: int):
        """The same layer for a long prompt, C = chunk_size tokens at a time (prefill into a StaticKVCache).

        A prefix-LM context attends in both directions, so a chunk's queries need the keys of later
        chunks: first every chunk's keys/values go to the cache, then every chunk's queries attend
        to all of them. Per-token work (projections, MLP) and the attention scores thus stay at
        [B, C, ...] instead of [B, T, ...], and the results equal the unchunked layer's.
        """
        t = x.shape[1]
        chunks = [slice(s, min(s + chunk_size, t)) for s in range(0, t, chunk_size)]
        (cos0, cos1), (sin0, sin1) = cos, sin
        normed, queries = [], []
        for c in chunks:
            a = self.input_layernorm(x[:, c])
            q, k, v = self.attention.rotated_qkv(a, (cos0[:, :, c], cos1[:, :, c]), (sin0[:, :, c], sin1[:, :, c]))
            kv_cache.update(self.attention.layer_id, k, v, input_pos + c.start)
            normed.append(a)
            queries.append(q)
        keys, values = kv_cache.update_range(self.attention.layer_id, input_pos + t)  # [B, nh, P+T, d]
        out = []
        for c, a, q in zip(chunks, normed, queries):
            out.append(self.after_attention(a, self.attention.attend(q, keys, values, mask[:, :, c])))
        return torch.cat(out, dim=1)


class PrefixEncoder(nn.Module):
    """P-tuning v2: trainable past keys/values for every layer, [P, 2 * L * H] (spec 6)."""

    def __init__(self, config: ChatGLMConfig, device=None):
        super().__init__()
        out = 2 * config.num_layers * config.hidden_size
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            h = config.hidden_size
            self.embedding = nn.Embedding(config.pre_seq_len, h, device=device)
            self.trans = nn.Sequential(nn.Linear(h, h, device=device), nn.Tanh(), nn.Linear(h, out, device=device))
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, out, device=device)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        x = self.embedding(prefix)
        return self.trans(x) if self.prefix_projection else x


# ----------------------------------------------------------------------------------- model


class ChatGLMModel(nn.Module):
    """Embeddings, the GLM blocks and the final LayerNorm (the HF `transformer` submodule)."""

    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__()
        self.config = config
        # On the meta device skip Embedding's random init: normal_ on meta imports torch._dynamo (seconds).
        weight = None
        if device is not None and torch.device(device).type == "meta":
            weight = torch.empty(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight, dtype=dtype,
                                            device=device)
        self.layers = nn.ModuleList(GLMBlock(config, i, dtype=dtype, device=device) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, dtype=dtype,
                                            device=device)
        if config.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config, device=device)
            self.prefix_dropout = nn.Dropout(0.1)
        self.gradient_checkpointing = False
        # Python floats, not a tensor: built into a compiled graph as exact constants (a traced
        # .half().float() round trip is dropped by the compiler, which would change the angles).
        self.rotary_inv_freq = tuple(rotary_inv_freq(config.head_dim // 2, device="cpu").tolist())

    def prefix_past(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The P-tuning past for every layer: [L, 2 (key, value), B, nh, P, d]."""
        c = self.config
        prefix = torch.arange(c.pre_seq_len, device=self.word_embeddings.weight.device)
        past = self.prefix_encoder(prefix).to(dtype)  # [P, 2 * L * H]
        past = past.view(c.pre_seq_len, c.num_layers, 2, c.num_attention_heads, c.head_dim)
        past = past.expand(batch_size, *past.shape)  # [B, P, L, 2, nh, d]
        past = self.prefix_dropout(past)
        return past.permute(2, 3, 0, 4, 1, 5)  # [L, 2, B, nh, P, d]

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """The cos/sin tables of 2D positions [B, 2, T]: ((cos0, cos1), (sin0, sin1)), each [B, 1, T, d/2],
        index 0 for the absolute positions and 1 for the block positions (each half-head rotates)."""
        inv_freq = torch.tensor(self.rotary_inv_freq, device=position_ids.device)
        cos0, sin0 = rotary_cos_sin(position_ids[:, 0], inv_freq, dtype)
        cos1, sin1 = rotary_cos_sin(position_ids[:, 1], inv_freq, dtype)
        return (cos0, cos1), (sin0, sin1)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, kv_cache=None,
                inputs_embeds=None, output_hidden_states: bool = False, input_pos=None, chunk_size=None):
        """Run the blocks. Masks/positions must already be built (see ChatGLMForConditionalGeneration).
        chunk_size: prefill a StaticKVCache in chunks of that many tokens (GLMBlock.forward_chunked)."""
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, H]
        cos, sin = self.rotary(position_ids, x.dtype)
        hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training and not isinstance(kv_cache, KVCache):
                x = checkpoint(layer, x, cos, sin, attention_mask, kv_cache, use_reentrant=False)
            elif chunk_size is not None and isinstance(input_pos, int) and x.shape[1] > chunk_size:
                x = layer.forward_chunked(x, cos, sin, attention_mask, kv_cache, input_pos, chunk_size)
            else:
                x = layer(x, cos, sin, attention_mask, kv_cache, input_pos)
        x = self.final_layernorm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return x, hidden_states


@dataclass
class CausalLMOutput:
    """What a forward call returns; `kv_cache` is the cache that was filled (if any)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    kv_cache: KVCache | StaticKVCache | None = None


class ChatGLMForConditionalGeneration(nn.Module):
    """ChatGLM-6B with its LM head: the class the HF checkpoint's weights belong to.

    Args:
        config: the architecture.
        dtype, device: of the parameters (use device="meta" to build without memory, then load).
    """

    def __init__(self, config: ChatGLMConfig, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.config = config
        self.transformer = ChatGLMModel(config, dtype=dtype, device=device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        self.tie_weights()
        if config.pre_seq_len:
            # The reference freezes the base model when P-tuning (only the prefix encoder trains).
            for name, param in self.named_parameters():
                if not name.startswith("transformer.prefix_encoder."):
                    param.requires_grad_(False)

    def tie_weights(self) -> None:
        """Make lm_head share the input embeddings, as the reference's loader does (spec 4.1)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    # Read from the final LayerNorm, which is float in every checkpoint layout (THUDM's int4-qe
    # stores the word embeddings as int8).
    @property
    def device(self) -> torch.device:
        return self.transformer.final_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.final_layernorm.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | StaticKVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        last_token_only: bool = False,
        input_pos: int | torch.Tensor | None = None,
        prefill_chunk_size: int | None = None,
        **unused,
    ) -> CausalLMOutput:
        """Logits (and the loss when labels are given) for a batch.

        Args:
            input_ids: [B, T] ids. Without a cache (or with an empty one) and without
                position_ids/attention_mask, both are derived from the ids (spec 4.7): every row
                needs [gMASK] (or [MASK]) and <sop>.
            position_ids: [B, 2, T] (the tokenizer's, or the decoding positions).
            attention_mask: [B, 1, T, S] bool with True = masked (the tokenizer's), or a
                [B, T] 0/1 padding mask (1 = real token) from which the prefix-LM mask is built.
            labels: [B, T] targets; position t's logits predict labels[t + 1]; -100 is ignored.
            kv_cache: a KVCache; the new keys/values are appended and attention covers the
                cached ones too. With P-tuning an empty cache is first filled with the prefix.
                Or a StaticKVCache (the decode engine's): then input_pos, position_ids and a
                [B, 1, T, S'] bool attention_mask over the slots attended are required, and
                nothing is derived or checked, so that the call never syncs with the device (the
                caller fills the prefix and records lengths; see glm6b.inference.engine).
            inputs_embeds: [B, T, H] instead of input_ids (then masks/positions must be given).
            output_hidden_states: also return the input of every layer and the final output.
            last_token_only: compute logits for the last position only (generation's prefill).
            input_pos: with a StaticKVCache, where the new tokens go: an int s (slots [s, s + T)
                of every row) or a [B] int64 tensor (one token per row, at slot input_pos[b]).
            prefill_chunk_size: with a StaticKVCache and an int input_pos, process the prompt this
                many tokens at a time (same results, smaller activations; GLMBlock.forward_chunked).
        """
        c = self.config
        if isinstance(kv_cache, StaticKVCache):
            if input_pos is None or position_ids is None or attention_mask is None or attention_mask.dim() != 4:
                raise InputError("with a StaticKVCache, pass input_pos, position_ids and a [B, 1, T, S] attention_mask")
            x, _ = self.transformer(input_ids, position_ids, attention_mask, kv_cache, inputs_embeds,
                                    input_pos=input_pos, chunk_size=prefill_chunk_size)
            if last_token_only:
                x = x[:, -1:]
            return CausalLMOutput(logits=self.lm_head(x), kv_cache=kv_cache)
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            raise InputError("forward needs input_ids or inputs_embeds")
        if unused:  # HF-style past_key_values / use_cache, or a typo: refuse rather than ignore
            raise InputError(f"forward got unknown keyword argument(s) {', '.join(sorted(unused))}; the KV cache is "
                             f"passed as kv_cache=KVCache(...) (there is no past_key_values / use_cache)")
        batch, length = source.shape[:2]
        first_call = kv_cache is None or kv_cache.length == 0
        if first_call and (attention_mask is None or attention_mask.dim() == 2 or position_ids is None):
            if input_ids is None:
                raise InputError("with inputs_embeds, pass attention_mask and position_ids as well")
            attention_mask, position_ids = prompt_inputs(input_ids, c, attention_mask, position_ids)
        if position_ids is None:
            raise InputError("decoding with a KV cache needs position_ids for the new tokens")

        if c.pre_seq_len:
            if first_call:
                past = self.transformer.prefix_past(batch, self.dtype)
                if kv_cache is None:
                    kv_cache = PrefixPast(past)
                else:
                    kv_cache.fill_prefix(past)
            if attention_mask is not None:
                # The prefix is visible to every token.
                attention_mask = F.pad(attention_mask, (c.pre_seq_len, 0), value=False)

        x, hidden_states = self.transformer(input_ids, position_ids, attention_mask, kv_cache, inputs_embeds,
                                            output_hidden_states)
        if isinstance(kv_cache, KVCache):
            kv_cache.length += length
        if last_token_only:
            x = x[:, -1:]
        logits = self.lm_head(x)

        loss = None
        if labels is not None:
            # Shifted cross entropy in float32 over labels != -100 (spec 4.10).
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                   ignore_index=-100).to(logits.dtype)
        return CausalLMOutput(logits=logits, loss=loss,
                              hidden_states=tuple(hidden_states) if output_hidden_states else None,
                              kv_cache=kv_cache)

    def gradient_checkpointing_enable(self) -> None:
        self.transformer.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.transformer.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random weights for models built from a preset (not from a checkpoint)."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
