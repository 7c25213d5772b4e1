"""The Transformer: Llama (incl. Llama-3 rope scaling, SmolLM2), Qwen2/Qwen2.5 (q/k/v bias)
and Qwen3 (per-head q/k RMSNorm, free head_dim) in one decoder-only definition.

It computes exactly what `transformers` computes for those families (same op order in the
norms and rotary embeddings), with one forward for training, prefill and decode:

    logits = model(input_ids)                                       # training / scoring
    logits = model(ids, attention_mask=m)                           # left-padded batch
    h = model(ids, return_hidden=True)                              # for fused log-prob kernels
    model(ids, attention_mask=m, kv_cache=cache, cache_start=t)     # prefill / decode
    model(ids, positions=p, segment_ids=s)                          # packed sequences (SFT)

Parameter names equal the Hugging Face names, so a checkpoint maps one to one.
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minirl.common import MinirlError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False   # Qwen2: bias on q/k/v only; Llama/Qwen3 attention_bias: q/k/v/o
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False    # Qwen3: RMSNorm over head_dim on q and k before rotary
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None  # int or list of ints
    pad_token_id: Optional[int] = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back on save

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face config.json dict; refuse what this model cannot compute."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise MinirlError(f"{source}: model_type {mt!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in d:
                raise MinirlError(f"{source}: missing key {key!r}")
        if d.get("use_sliding_window"):
            raise MinirlError(f"{source}: use_sliding_window=true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise MinirlError(f"{source}: hidden_act {d.get('hidden_act')!r} is not supported (only silu)")
        for moe_key in ("num_experts", "num_local_experts", "moe_intermediate_size"):
            if d.get(moe_key):
                raise MinirlError(f"{source}: mixture-of-experts ({moe_key}) is not supported")
        # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        if scaling is None and d.get("rope_scaling"):
            scaling = dict(d["rope_scaling"])
            scaling.setdefault("rope_type", scaling.get("type"))
        if scaling is not None and scaling.get("rope_type") not in ("llama3", "linear"):
            raise MinirlError(f"{source}: rope scaling type {scaling.get('rope_type')!r} is not "
                              "supported (supported: llama3, linear)")
        heads = d["num_attention_heads"]
        attention_bias = bool(d.get("attention_bias", False))
        known = {f for f in cls.__dataclass_fields__} | {
            "rope_parameters", "rope_scaling", "attention_bias", "hidden_act", "use_sliding_window"}
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            model_type=mt, rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attention_bias,
            o_bias=False if mt == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=(mt == "qwen3"),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_hf(self) -> dict:
        """The config.json dict that transformers reads back into the same model."""
        d = dict(self.extra)
        d.update(asdict(self))
        for k in ("extra", "qkv_bias", "o_bias", "qk_norm", "rope_scaling", "rope_theta"):
            d.pop(k)
        d["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                               "qwen3": "Qwen3ForCausalLM"}[self.model_type]]
        d["hidden_act"] = "silu"
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        d["rope_parameters"] = rope
        # Older transformers read these two keys instead of rope_parameters.
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq [D/2] in fp32, with Llama-3 or linear scaling applied as transformers does."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return torch.where(medium, blended, scaled)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32, cast back, then scale: the same rounding as transformers.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Preallocated keys and values for every layer: k[l], v[l] are [B, Hkv, S, D].

    A forward with a cache writes its T new keys at columns cache_start .. cache_start+T-1
    (the same columns for every row: rows of unequal length are left-padded and the
    attention mask hides the padding) and attends to columns [0, attention_mask.shape[1])."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]

    @property
    def batch_size(self):
        return self.k[0].shape[0]

    @property
    def max_len(self):
        return self.k[0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache_k=None, cache_v=None, cols=None, width=None):
        B, T, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, d)  # [B, T, Hq, D]
        k = self.k_proj(x).view(B, T, -1, d)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(B, T, -1, d)  # [B, T, Hkv, D]
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache_k is not None:
            # index_copy_ with a column tensor (not a Python slice) keeps decode capturable
            # in a CUDA graph: the write position is data, not a constant.
            cache_k.index_copy_(2, cols, k.to(cache_k.dtype))
            cache_v.index_copy_(2, cols, v.to(cache_v.dtype))
            k, v = cache_k[:, :, :width], cache_v[:, :, :width]  # [B, Hkv, S, D]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif T == 1 and q.shape[1] != k.shape[1]:
            # Decode (one query per row): the query heads sharing a KV head go on the query
            # axis, so SDPA sees equal head counts. With a mask and GQA, CUDA has no fused
            # kernel (flash takes no mask, mem-efficient no GQA): the math fallback would copy
            # K and V once per query head at every step.
            g = q.shape[1] // k.shape[1]
            y = F.scaled_dot_product_attention(q.reshape(B, -1, g, d), k, v, attn_mask=mask)  # [B, Hkv, G, D]
            y = y.reshape(B, -1, 1, d)  # [B, Hq, 1, D]
        elif q.is_cuda and q.shape[1] != k.shape[1]:
            # Masked attention with GQA on CUDA (left-padded prefill, packed training): flash
            # takes no mask and mem-efficient no GQA, so repeat K/V to let mem-efficient run
            # instead of the math kernel, which would build [B, H, T, T] scores in fp32.
            g = q.shape[1] // k.shape[1]
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                               attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # [B, T, Hq*D]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache_k=None, cache_v=None, cols=None, width=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_k, cache_v, cols, width)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Named as in Hugging Face checkpoints: model.embed_tokens, model.layers.N, model.norm.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)
        self.gradient_checkpointing = False

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The [V, H] output projection (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits from final hidden states (matmul in the weights' dtype, as transformers)."""
        return F.linear(hidden, self.lm_head_weight).float()

    def init_weights(self, std: float = 0.02, generator: torch.Generator = None):
        """Normal(0, std) for matrices, ones for norms, zeros for biases (a model from scratch)."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)

    def forward(self, input_ids, positions=None, attention_mask=None, kv_cache: KVCache = None,
                cache_start=0, segment_ids=None, return_hidden=False):
        B, T = input_ids.shape
        device = input_ids.device
        cols = None
        if kv_cache is not None:
            if attention_mask is None:
                raise ValueError("a forward with kv_cache needs attention_mask over the cached columns")
            # Columns of the cache that this call writes (same for every row).
            cols = torch.arange(T, device=device) + cache_start  # [T]
        if positions is None:
            if attention_mask is None:
                positions = torch.arange(T, device=device).expand(B, T)
            else:
                # Left padding: a row's first real token is position 0.
                pos_all = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, S]
                positions = pos_all if cols is None else pos_all.index_select(1, cols)  # [B, T]
        mask = self._attention_mask(attention_mask, segment_ids, cols, T, device)

        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        h = self.model.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = emb.cos().to(h.dtype)[:, None], emb.sin().to(h.dtype)[:, None]  # [B, 1, T, D]

        width = attention_mask.shape[1] if kv_cache is not None else None
        for i, block in enumerate(self.model.layers):
            ck = kv_cache.k[i] if kv_cache is not None else None
            cv = kv_cache.v[i] if kv_cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, cos, sin, mask, ck, cv, cols, width, use_reentrant=False)
            else:
                h = block(h, cos, sin, mask, ck, cv, cols, width)
        h = self.model.norm(h)  # [B, T, H]
        return h if return_hidden else self.logits(h)

    @staticmethod
    def _attention_mask(attention_mask, segment_ids, cols, T, device):
        """Boolean [B, 1, Tq, Tk] (True = may attend), or None for plain causal attention."""
        if attention_mask is None and segment_ids is None:
            return None
        q_col = cols if cols is not None else torch.arange(T, device=device)  # [Tq]
        Tk = attention_mask.shape[1] if attention_mask is not None else T
        k_col = torch.arange(Tk, device=device)  # [Tk]
        mask = (k_col[None, :] <= q_col[:, None])[None]  # [1, Tq, Tk] causal
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]  # [B, Tq, Tk]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        # A query always sees itself, so padded query rows are never all -inf (no NaN);
        # their outputs are ignored by every caller.
        mask = mask | (k_col[None, :] == q_col[:, None])[None]
        return mask[:, None]  # [B, 1, Tq, Tk]
