"""This project's own causal language model, in one file to read and change.

A decoder-only transformer: token embedding, `n_layers` blocks (RMSNorm, attention with rotary
positions and grouped-query heads, RMSNorm, MLP, each with a residual), a final RMSNorm and an
output layer. Architecture options are fields of GPTConfig:

    qk_norm        RMSNorm on each head's queries and keys before the rotary positions
    mlp            "swiglu" (gate, up, down: Llama's) or "relu2" (up, relu(x)^2, down)
    tie_embeddings the output layer shares the embedding's weights
    logit_softcap  logits squashed to (-c, c) by c * tanh(logits / c)

The modules carry Llama's names (model.embed_tokens, model.layers.N.self_attn.q_proj, ...,
lm_head), and with QK-norm Qwen3's (self_attn.q_norm, k_norm), so a model with the default
options is, weight for weight, a LlamaForCausalLM (lib/model/export.py writes it as one), and
LoRA's target names, FSDP's per-layer wrapping and the fused output layer find what they look
for. It is a transformers PreTrainedModel, so `generate`, `save_pretrained` and peft work on it.

Packed sequences: where position ids restart inside a row (train.py's --data.doc_mask), attention
stays within each document, as transformers' Llama does it (a new document wherever a position
does not follow the one before).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class GPTConfig(PretrainedConfig):
    model_type = "lm_repo_gpt"
    # the names transformers' utilities and this project's helpers read
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len"}

    def __init__(self, vocab_size: int = 4096, d_model: int = 256, n_layers: int = 4, n_heads: int = 4,
                 n_kv_heads: int | None = None, d_ff: int | None = None, max_seq_len: int = 512,
                 mlp: str = "swiglu", qk_norm: bool = False, tie_embeddings: bool = True,
                 logit_softcap: float | None = None, rope_theta: float = 10_000.0, norm_eps: float = 1e-5,
                 dropout: float = 0.0, init_std: float = 0.02, attention: str = "sdpa", **kwargs):
        if mlp not in ("swiglu", "relu2"):
            raise ValueError(f"mlp {mlp!r}: swiglu or relu2")
        self.vocab_size, self.d_model, self.n_layers, self.n_heads = vocab_size, d_model, n_layers, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        # SwiGLU's three matrices at 8/3 the width cost what ReLU²'s two at 4x do
        self.d_ff = d_ff or (-(-int(8 * d_model / 3) // 64) * 64 if mlp == "swiglu" else 4 * d_model)
        self.max_seq_len, self.mlp, self.qk_norm = max_seq_len, mlp, qk_norm
        self.logit_softcap, self.rope_theta, self.norm_eps = logit_softcap, rope_theta, norm_eps
        self.dropout, self.init_std = dropout, init_std
        # sdpa: torch's fused kernel; eager: the products and a softmax written out, which on a CPU
        # ran faster in training than sdpa's kernel (and faster still with a document mask)
        self.attention = attention
        # a saved config.json holds transformers' name for it
        super().__init__(tie_word_embeddings=kwargs.pop("tie_word_embeddings", tie_embeddings), **kwargs)


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm with its weight cast to the input's dtype: under bf16 autocast the queries
    and keys arrive in bf16, and a float32 weight beside them sends torch to its unfused path with
    a warning on every run."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def rotary(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, [batch, tokens, head_dim] (the two halves repeat)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on x [batch, heads, tokens, head_dim]: each pair (i, i + d/2) turned by its angle."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None].to(x.dtype) + turned * sin[:, None].to(x.dtype)


def document_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[batch, 1, tokens, tokens] True where a query may attend a key: causal and in the same
    document (a document starts wherever a position does not follow the one before); None where
    every row is one document (plain causal attention)."""
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    doc = (step != 1).cumsum(-1)
    if not bool((doc != doc[:, :1]).any()):
        return None
    n = position_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv = layer, cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.eager = cfg.attention == "eager"

    def forward(self, x, cos, sin, mask, cache=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        if cache is not None:  # generation: the keys and values of the tokens before these
            k, v = cache.update(k, v, self.layer)
        dropout = self.dropout if self.training else 0.0
        if self.eager:
            if self.n_kv != self.n_heads:
                k, v = (z.repeat_interleave(self.n_heads // self.n_kv, dim=1) for z in (k, v))
            scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = F.dropout(scores.float().softmax(-1).to(q.dtype), dropout, self.training)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False) if cfg.mlp == "swiglu" else None
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.relu(self.up_proj(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class GPT(PreTrainedModel, GenerationMixin):
    config_class = GPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]  # FSDP wraps each block
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    supports_gradient_checkpointing = True

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # --activation_checkpointing (transformers' switch sets it)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def set_attention(self, kind: str) -> None:
        """Attention through torch's fused kernel ("sdpa") or written out ("eager"): the same function."""
        if kind not in ("sdpa", "eager"):
            raise ValueError(f"attention {kind!r}: sdpa or eager")
        self.config.attention = kind
        for block in self.model.layers:
            block.self_attn.eager = kind == "eager"

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, labels=None, logits_to_keep=0, **kwargs):
        cfg = self.config
        past_key_values = cache if cache is not None else kwargs.get("past_key_values")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if use_cache and past_key_values is None:
            from transformers import DynamicCache

            past_key_values = DynamicCache(config=cfg)
        done = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(done, done + t, device=x.device).expand(b, t)
        mask = document_mask(position_ids) if done == 0 else None
        if mask is None and t > 1:  # causal; a prompt after cached tokens is causal from the end
            mask = torch.ones(t, done + t, dtype=torch.bool, device=x.device).tril(done)
        if attention_mask is not None and not bool(attention_mask.all()):  # left padding (batched generation)
            keys = attention_mask[:, None, None, -(done + t):].bool()
            mask = keys if mask is None else mask & keys
        cos, sin = rotary(position_ids, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(block.__call__, x, cos, sin, mask, past_key_values)
            else:
                x = block(x, cos, sin, mask, past_key_values)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)
        if cfg.logit_softcap:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=past_key_values if use_cache else None)


def standard_config(cfg: GPTConfig, **ids) -> PretrainedConfig:
    """The Hugging Face config of the standard architecture whose weights are this model's under
    the same names: Llama, or Qwen3 with QK-norm. A ValueError names the option no standard
    architecture has (ReLU², a logit soft-cap)."""
    from transformers import LlamaConfig, Qwen3Config

    if cfg.mlp != "swiglu":
        raise ValueError(f"mlp {cfg.mlp}: Llama and Qwen3 have SwiGLU MLPs only")
    if cfg.logit_softcap:
        raise ValueError(f"logit_softcap {cfg.logit_softcap:g}: Llama and Qwen3 have no soft-capped logits")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
                  attention_bias=False, **ids)
    if cfg.qk_norm:
        return Qwen3Config(head_dim=cfg.d_model // cfg.n_heads, use_sliding_window=False, **common)
    return LlamaConfig(mlp_bias=False, **common)


def register() -> None:
    """Let AutoConfig and AutoModelForCausalLM read this project's own format (a model whose
    options no standard architecture has), with no trust_remote_code: the code is this file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(GPTConfig.model_type, GPTConfig)
        AutoModelForCausalLM.register(GPTConfig, GPT)
    except ValueError:  # registered already (a second import under another module name)
        pass


register()


def to_standard(model: GPT, state_dict: dict | None = None):
    """The same weights in the standard architecture (standard_config), or a ValueError naming the
    option none has. `state_dict`: the full weights where `model`'s are sharded."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    ids = {k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    standard = AutoModelForCausalLM.from_config(standard_config(cfg, **ids), dtype=torch.float32)
    weights = state_dict if state_dict is not None else model.state_dict()
    missing, unexpected = standard.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]:
        raise ValueError(f"weights that do not map: {sorted(unexpected)[:3]} {sorted(missing)[:3]}")
    standard.generation_config = model.generation_config
    return standard.eval()
