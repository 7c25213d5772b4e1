"""python -m minirl.plan — will a run fit on a GPU, and about how long will a step take?

    python -m minirl.plan --model Qwen2.5-Math-1.5B --preset drgrpo --gpu h100-80
    python -m minirl.plan --model config.json --trainer sft --tokens-per-micro-batch 16384 --gpu a100-40
    python -m minirl.plan --model DIR --ranks 8 --gpu h100-80 --json plan.json

From a model's config.json alone (no weights are read) and the flags the run would get (the
training script's own parser reads them, presets included), this builds the model on *fake
tensors* (torch's FakeTensorMode: every tensor has its shape, dtype and size, no data) and runs
the real training code on them: one micro-batch's forward and backward through
minirl.grpo.policy_loss (log-prob chunks included) or minirl.sft.response_logprobs, the
gradient clip and MasterAdamW's step (fp32 masters + AdamW states), and the sampler's KV-cache
allocation with one decode step. The accounting is torch's own:

* memory: `LiveMemory`, a TorchDispatchMode that sees every tensor an op creates and adds up
  the bytes of the storages alive at each moment (a storage counts from its first appearance
  until Python frees it); the peak is the most bytes alive at once;
* FLOPs: torch.utils.flop_counter.FlopCounterMode over the same forward and backward.

Exactly what is planned (one process, the state a step runs in after the first step):
weights (compute dtype), fp32 master copy (when the dtype is not fp32), AdamW's two fp32
moments, gradients (present from the previous micro-batch), the saved activations and the
transient of one micro-batch of rows x (prompt + max new tokens) tokens (every completion at
full length: the worst case), the log-prob chunk (minirl.kernels.linear_logprobs: the largest
[C, V] buffers), the optimizer step (its fp32 copy of the gradients), the reference model
(--beta > 0), and the sampler: KV cache for a wave of rows x (prompt + max new tokens)
columns, one decode step and the sampler's own allowance for sampling temporaries
(minirl.sampler.SAMPLING_BYTES_PER_VOCAB per row and vocabulary entry).

Fake CPU tensors stand in for CUDA ones (on a CPU-only torch build fake "cuda" tensors fail in
backward); sizes are the same. Two things depend on the device type, and for a GPU plan they
are set as on CUDA: the log-prob chunk size (the CUDA budget of
minirl.kernels.linear_logprobs.default_chunk_size) and attention, counted as FlashAttention-2
keeps it (saves q, k, v, the output and an fp32 log-sum-exp per query; its backward allocates
an fp32 dq accumulator and, with grouped-query attention, dk / dv per query head). The CPU's
attention kernels are used for a CPU plan (--device cpu), which is how the plan is checked
against a measured step (benchmarks/bench_plan.py, tests/test_plan.py).

Derived, not measured (and labelled so in the output): the largest micro-batch and sampler
wave that fit (the measured bytes per row extrapolated linearly, the micro-batch answer then
checked by a second fake run), the per-rank memory under FSDP2 with N ranks (parameters,
gradients and optimizer state sharded 1/N; one gathered bf16 block plus the prefetched next
one, and the unsharded root module; full gathered weights for sampling), and a roofline
ESTIMATE of the step time: training FLOPs at the GPU's dense bf16 peak, decode as the bytes of
the weights plus the KV cache read per token at the memory bandwidth (a lower bound: no real
run reaches either peak).
"""
import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from minirl.common import MinirlError, atomic_write_json, parse_dtype
from minirl.model import KVCache, ModelConfig, Transformer

GiB = 2**30
# name: (memory in bytes as CUDA reports it, dense bf16 FLOP/s, memory bandwidth B/s); the
# vendors' data sheets (SXM parts). A100 40/80 GB, H100 80 GB (81,559 MiB), H200 141 GB (143,771 MiB).
GPUS = {
    "a100-40": (40 * GiB, 312e12, 1.555e12),
    "a100-80": (80 * GiB, 312e12, 2.039e12),
    "h100-80": (81559 * 2**20, 989e12, 3.35e12),
    "h200-141": (143771 * 2**20, 989e12, 4.8e12),
}
RESERVED = 1 * GiB  # CUDA context, cuBLAS workspace, allocator slack: not usable by tensors


# ---------------------------------------------------------------- the run's settings

def run_settings(trainer: str, argv: list) -> argparse.Namespace:
    """The flags as the training script itself resolves them (its parser, its presets).
    The one place that reads train_grpo.py / train_sft.py: the scripts sit next to the
    minirl/ folder of a source checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "train_grpo.py" if trainer == "grpo" else "train_sft.py")
    if not os.path.exists(path):
        raise MinirlError(f"--trainer {trainer}: {path} not found (the plan reads the script's flags; "
                          "run it from a source checkout)")
    spec = importlib.util.spec_from_file_location(f"_minirl_plan_{trainer}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if trainer == "grpo":
        return module.parse_args(argv)
    return module.parser.parse_args(argv)


def read_model_config(path: str) -> ModelConfig:
    """--model: a model folder or a config.json file (weights are never read)."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise MinirlError(f"--model {path}: no config.json there") from None
    except json.JSONDecodeError as e:
        raise MinirlError(f"--model {cfg_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return ModelConfig.from_hf(d, source=cfg_path)


# ---------------------------------------------------------------- torch's accounting

class LiveMemory(TorchDispatchMode):
    """Bytes of the tensor storages alive now (`live`) and at most so far (`peak`). A storage is
    counted when an op first returns it and uncounted when Python frees it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes = {}
        self._depth = 0
        self._collected = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Only the outputs of the outermost op count: fake tensors run some ops as a
        # decomposition into several smaller ops, whose intermediates the real kernel never makes.
        self._depth += 1
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self._depth -= 1
        if self._depth == 0:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._count(t.untyped_storage())
        return out

    def _count(self, storage):
        key = id(storage)
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        if self.live > self.peak and self.live > max(1.02 * self._collected, self._collected + 4 * 2**20):
            # Fake tensors sit in reference cycles, which Python frees only when its cycle
            # collector runs; a real step frees them at once. Collect before a new peak.
            gc.collect()
            self._collected = self.live
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.live -= self._sizes.pop(key)

    def reset_peak(self):
        self.peak = self.live


class _FlashAttentionMemory(torch.autograd.Function):
    """What FlashAttention-2 keeps and allocates (no values: the plan runs on fake tensors)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)  # [B, Hq, T, D]
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # [B, Hq, T]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # [B, Hq, T, D]
        delta = torch.empty_like(lse)  # [B, Hq, T] rowsum(dO * O)
        if k.shape[1] != q.shape[1]:  # GQA: per query head, then summed over the group
            dk_heads, dv_heads = torch.empty_like(q), torch.empty_like(q)
            del dk_heads, dv_heads
        del dq_accum, delta
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attention(q, k, v, *args, **kwargs):
    return _FlashAttentionMemory.apply(q, k, v)


@contextlib.contextmanager
def device_rules(device: str):
    """For a GPU plan: CUDA's log-prob chunk size and attention memory on fake CPU tensors.
    Both are swapped at module level, not by a TorchFunctionMode, because gradient
    checkpointing recomputes the forward inside backward, where function modes are off."""
    if device != "cuda":
        yield
        return
    from minirl.kernels import ops as ll   # ops.py is where the chunk size is chosen
    cpu_rule, sdpa = ll.default_chunk_size, F.scaled_dot_product_attention
    ll.default_chunk_size = lambda n_rows, vocab, _device: cpu_rule(n_rows, vocab, "cuda")
    F.scaled_dot_product_attention = _flash_attention
    try:
        yield
    finally:
        ll.default_chunk_size, F.scaled_dot_product_attention = cpu_rule, sdpa


def fake_model(cfg: ModelConfig, dtype: torch.dtype) -> Transformer:
    """The Transformer with fake parameters in `dtype` (call inside FakeTensorMode)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: a cast afterwards would copy every tensor
    try:
        return Transformer(cfg)
    finally:
        torch.set_default_dtype(default)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- one micro-batch, as the scripts run it

def micro_batch_loss(model, S, rows: int):
    """The loss of one micro-batch of `rows` full-length rows, through the training code."""
    if S.trainer == "grpo":
        from minirl import grpo
        c = S.new_tokens
        samples = [grpo.Sample(prompt_ids=[1] * S.prompt_len, completion_ids=[1] * c, advantage=1.0,
                               old_logprobs=torch.zeros(c), ref_logprobs=torch.zeros(c) if S.beta > 0 else None,
                               sampler_logprobs=torch.zeros(c)) for _ in range(rows)]
        loss, _ = grpo.policy_loss(model, samples, pad_id=0, temperature=S.temperature, eps_low=0.2, eps_high=0.2,
                                   beta=S.beta, kl_estimator="k3", aggregation=S.aggregation,
                                   num_sequences=rows, num_tokens=rows * c, norm_length=c,
                                   on_policy=S.on_policy)
        return loss
    from minirl import sft
    seqs = [sft.Sequence(ids=[1] * S.seq_len, mask=[1] * S.seq_len, group="", where="plan")
            for _ in range(rows)]
    batch = sft.collate(seqs, [[i] for i in range(rows)], 0, "cpu")
    return -sft.response_logprobs(model, batch).sum() / batch.num_targets


def measure_step(cfg, S, rows: int, with_optimizer: bool = True) -> dict:
    """One training step's memory (bytes) and FLOPs on fake tensors: the steady state of a run
    (AdamW states made by an earlier step, gradients by an earlier micro-batch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from minirl.training import MasterAdamW
    mem, out = LiveMemory(), {}
    with FakeTensorMode(allow_non_fake_inputs=True), mem:
        model = fake_model(cfg, S.dtype)
        ref = fake_model(cfg, S.dtype).requires_grad_(False) if S.beta > 0 else None
    params = list(model.parameters())
    out["weights"] = nbytes(params)
    out["reference model"] = nbytes(ref.parameters()) if ref is not None else 0
    model.gradient_checkpointing = S.checkpointing
    model.train()
    with mem, device_rules(S.device):
        base = mem.live
        opt = MasterAdamW(params, lr=1e-6, weight_decay=0.1)
        out["fp32 masters"] = mem.live - base
        if with_optimizer:  # the moments, as the first step leaves them
            base = mem.live
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad()
            out["AdamW states"] = mem.live - base
        base = mem.live
        for p in params:  # as left by the previous micro-batch
            p.grad = torch.zeros_like(p)
        out["gradients"] = mem.live - base
        resident = mem.live
        mem.reset_peak()
        with FlopCounterMode(display=False) as flops_fwd:
            loss = micro_batch_loss(model, S, rows)
        out["activations"] = mem.live - resident  # saved for backward (and the loss)
        with FlopCounterMode(display=False) as flops_bwd:
            loss.backward()
        del loss
        out["micro-batch peak"] = mem.peak
        if with_optimizer:
            mem.reset_peak()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # grad_norm_and_finite's clip, without its host read
            opt.step()
            out["optimizer step peak"] = mem.peak
        out["resident"] = resident
        out["flops forward"] = flops_fwd.get_total_flops()
        out["flops forward+backward"] = out["flops forward"] + flops_bwd.get_total_flops()
        out["log-prob chunk"] = logprob_chunk_peak(model, S, rows, mem)
        opt.zero_grad()
        out["sampling resident"] = mem.live + out["reference model"]
    return out


def logprob_chunk_peak(model, S, rows: int, mem: LiveMemory) -> int:
    """The largest transient of the fused log-prob path alone (its [C, V] chunk buffers)
    for the micro-batch's completion tokens, forward and backward, above its inputs."""
    from minirl.kernels.ops import linear_logprobs
    n = rows * (S.new_tokens if S.trainer == "grpo" else S.seq_len - 1)
    w = model.lm_head_weight
    h = w.new_empty((n, w.shape[1])).requires_grad_(True)  # [N, H] fake, like w
    targets = w.new_zeros(n, dtype=torch.long)  # [N]
    base = mem.live
    mem.reset_peak()
    logp, ent = linear_logprobs(h, w, targets, True)
    (logp.sum() + ent.sum()).backward()
    peak = mem.peak - base
    del logp, ent, h
    return peak


def measure_sampling(cfg, S, rows: int) -> dict:
    """Bytes of a sampler wave of `rows` rows: the KV cache (minirl.model.KVCache, as the
    sampler allocates it) and one decode step, above the weights; plus the sampler's own
    allowance for its [rows, V] sampling temporaries."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from minirl.sampler import SAMPLING_BYTES_PER_VOCAB
    mem = LiveMemory()
    width = S.prompt_len + S.new_tokens
    with FakeTensorMode(allow_non_fake_inputs=True), mem:
        model = fake_model(cfg, S.dtype).eval()
    with mem, device_rules(S.device), torch.no_grad():
        base = mem.live
        cache = KVCache(cfg, rows, width, device="cpu", dtype=S.dtype)
        kv = mem.live - base
        mem.reset_peak()
        ids = torch.zeros(rows, 1, dtype=torch.long)  # [R, 1]
        pos = torch.full((rows, 1), width - 1, dtype=torch.long)  # [R, 1] the last column: widest attention
        mask = torch.ones(rows, width, dtype=torch.long)  # [R, W]
        h = model(ids, positions=pos, attention_mask=mask, kv_cache=cache,
                  cache_start=torch.tensor(width - 1), return_hidden=True)  # [R, 1, H]
        logits = model.logits(h[:, 0])  # [R, V]
        del h, logits
        step = mem.peak - base
    return {"KV cache": kv, "decode peak": step + rows * SAMPLING_BYTES_PER_VOCAB * cfg.vocab_size,
            "kv bytes per token": kv // (rows * width)}


# ---------------------------------------------------------------- derived answers

def largest_rows(usable: int, fixed: int, per_row: float, cap: int = 10**6) -> int:
    """Rows r with fixed + r * per_row <= usable (0 if not even one)."""
    if per_row <= 0:
        return cap
    return max(0, min(cap, int((usable - fixed) // per_row)))


def fsdp_per_rank(cfg, S, step: dict, ranks: int) -> dict:
    """Memory of one rank under FSDP2 (minirl.distributed.shard: fp32 parameters sharded,
    compute in --dtype), from the one-process measurement."""
    n_params = step["weights"] // dtype_bytes(S.dtype)
    compute = dtype_bytes(S.dtype)
    per_block = block_params(cfg)
    root = n_params - cfg.num_hidden_layers * per_block  # embeddings, final norm, untied lm_head
    sharded = {"parameters (fp32, 1/N)": 4 * n_params // ranks, "gradients (fp32, 1/N)": 4 * n_params // ranks,
               "AdamW states (1/N)": step["AdamW states"] // ranks}
    gathered = compute * (root + 2 * per_block)  # root unit + current block + prefetched next
    grads_unsharded = compute * (root + per_block)  # before the reduce-scatter
    train = sum(sharded.values()) + gathered + grads_unsharded + step["micro-batch peak"] - step["resident"]
    ref = step["reference model"] // ranks + (compute * (root + 2 * per_block) if S.beta > 0 else 0)
    # Sampling: a full replica per rank in the compute dtype, built from a full fp32 state dict.
    replica = compute * n_params
    sampling = 4 * n_params // ranks * 2 + step["AdamW states"] // ranks + replica + 4 * n_params + ref
    return {"ranks": ranks, **sharded, "gathered weights (one block + next, root)": gathered,
            "unsharded gradients (block, root)": grads_unsharded,
            "training peak per rank": train + ref, "sampling resident per rank": sampling - 4 * n_params,
            "replica build transient (full fp32 state dict)": 4 * n_params,
            "sampling replica (full weights)": replica}


def block_params(cfg) -> int:
    h, q, kv, i = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    n = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    if cfg.qkv_bias:
        n += q + 2 * kv
    if cfg.o_bias:
        n += h
    if cfg.mlp_bias:
        n += 2 * i + h
    if cfg.qk_norm:
        n += 2 * cfg.head_dim
    return n


def dtype_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def roofline(cfg, S, step: dict, rows: int, wave_rows: int, gpu) -> dict:
    """ESTIMATES (lower bounds) of one step's time on `gpu` = (memory, bf16 FLOP/s, bytes/s)."""
    _, peak_flops, bandwidth = gpu
    micro_batches = math.ceil(S.rows_per_step / rows)
    forwards = (0 if S.on_policy else 1) + (1 if S.beta > 0 else 0)  # old / reference log-probs
    train_flops = micro_batches * (step["flops forward+backward"] + forwards * step["flops forward"])
    out = {"training FLOPs": train_flops, "training s (estimate)": train_flops / peak_flops}
    if S.trainer == "grpo":
        kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes(S.dtype)
        waves = math.ceil(S.rows_per_step / max(1, wave_rows))
        per_wave_rows = S.rows_per_step / waves
        mean_width = S.prompt_len + S.new_tokens / 2
        n_params = step["weights"] // dtype_bytes(S.dtype)
        token_bytes = step["weights"] + per_wave_rows * mean_width * kv_token  # read once per decode step
        token_s = max(token_bytes / bandwidth, 2 * n_params * per_wave_rows / peak_flops)
        prefill_s = 2 * n_params * S.prompts * S.prompt_len / peak_flops
        out.update({"decode waves": waves, "decode s per token step (estimate)": token_s,
                    "sampling s (estimate)": waves * S.new_tokens * token_s + prefill_s})
    out["step s (estimate)"] = out["training s (estimate)"] + out.get("sampling s (estimate)", 0.0)
    return out


# ---------------------------------------------------------------- the plan

def settings(args, run) -> argparse.Namespace:
    """What the plan needs from the run's flags, with the scripts' own defaults."""
    S = argparse.Namespace(trainer=args.trainer, device=args.device)
    dtype = parse_dtype(run.dtype) if run.dtype else None
    S.dtype = dtype or (torch.bfloat16 if args.device == "cuda" else torch.float32)
    S.checkpointing = run.gradient_checkpointing == "on" or (run.gradient_checkpointing == "auto" and args.device == "cuda")
    if args.trainer == "grpo":
        S.prompt_len = args.prompt_len or run.max_prompt_len or 256
        S.new_tokens, S.prompts, S.beta = run.max_new_tokens, run.prompts_per_step, run.beta
        S.rows_per_step = run.prompts_per_step * run.num_samples
        S.micro_tokens = run.micro_batch_tokens or (16384 if args.device == "cuda" else 4096)
        S.seq_len = S.prompt_len + S.new_tokens
        S.on_policy = run.epochs_per_rollout == 1 and run.mini_batches == 1
        S.temperature, S.aggregation = run.temperature, run.loss_aggregation
        S.rows_per_step *= run.epochs_per_rollout
    else:
        S.seq_len = run.max_len or 2048
        S.micro_tokens, S.beta, S.on_policy, S.new_tokens, S.prompt_len = run.tokens_per_micro_batch, 0.0, True, 0, 0
        rows_micro = max(1, S.micro_tokens // S.seq_len)
        S.rows_per_step = run.grad_accum * rows_micro if run.grad_accum else max(1, (run.batch_tokens or 16384) // S.seq_len)
        S.prompts = 0
    for name in ("prompt_len", "new_tokens", "rows_per_step", "micro_tokens", "seq_len"):
        if getattr(S, name) < 0 or (name != "prompt_len" and name != "new_tokens" and getattr(S, name) < 1):
            raise MinirlError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(S, name)}")
    S.rows = max(1, S.micro_tokens // S.seq_len)
    return S


def make_plan(cfg, S, usable: int, gpu, ranks: int, search: bool = True) -> dict:
    """Measure on fake tensors and derive the answers (see the module docstring)."""
    t0 = time.time()
    step = measure_step(cfg, S, S.rows)
    train_peak = max(step["micro-batch peak"], step["optimizer step peak"]) + step["reference model"]
    # Bytes per row of the micro-batch: what grows with rows (the log-prob chunk does not).
    per_row = (step["micro-batch peak"] - step["resident"] - step["log-prob chunk"]) / S.rows
    fixed = step["resident"] + step["log-prob chunk"] + step["reference model"]
    max_rows = largest_rows(usable - (step["optimizer step peak"] > usable) * 0, fixed, per_row)
    checked = None
    if search and max_rows >= 1 and max_rows != S.rows and step["optimizer step peak"] + step["reference model"] <= usable:
        check = measure_step(cfg, S, max_rows, with_optimizer=False)
        checked = check["micro-batch peak"] + step["reference model"]
        while max_rows > 1 and checked > usable:  # the linear model was optimistic: step down
            max_rows = int(max_rows * usable / checked)
            check = measure_step(cfg, S, max_rows, with_optimizer=False)
            checked = check["micro-batch peak"] + step["reference model"]
    plan = {"step": step, "training peak": train_peak, "usable": usable,
            "micro-batch rows": S.rows, "row tokens": S.seq_len,
            "largest micro-batch rows": max_rows, "largest micro-batch tokens": max_rows * S.seq_len,
            "largest micro-batch peak (checked)": checked}
    if S.trainer == "grpo":
        probe = min(8, S.rows_per_step)
        samp = measure_sampling(cfg, S, probe)
        per_wave_row = samp["decode peak"] / probe
        fit_rows = largest_rows(usable, step["sampling resident"], per_wave_row, S.rows_per_step)
        free = max(0, usable - step["sampling resident"])
        from minirl.sampler import CUDA_FREE_FRACTION, SAMPLING_BYTES_PER_VOCAB
        default_rows = min(S.rows_per_step, int(CUDA_FREE_FRACTION * free // (samp["kv bytes per token"] * S.seq_len)),
                           int(0.2 * free // (SAMPLING_BYTES_PER_VOCAB * cfg.vocab_size)))
        wave = min(fit_rows, default_rows) if S.device == "cuda" else min(fit_rows, S.rows_per_step)
        plan.update({"sampling": samp, "sampling bytes per row": per_wave_row,
                     "largest sampler rows": fit_rows, "sampler default rows": default_rows,
                     "KV cache of a wave": samp["KV cache"] / probe * wave,
                     "sampling peak": step["sampling resident"] + per_wave_row * wave, "wave rows": wave})
    plan["peak"] = max(train_peak, plan.get("sampling peak", 0))
    plan["fits"] = plan["peak"] <= usable and max_rows >= 1
    plan["time"] = roofline(cfg, S, step, min(S.rows, max(1, max_rows)), plan.get("wave rows", 1), gpu)
    if ranks > 1:
        plan["fsdp"] = fsdp_per_rank(cfg, S, step, ranks)
        t = plan["time"]
        plan["fsdp"]["step s per rank (estimate)"] = t["step s (estimate)"] / ranks
    plan["plan seconds"] = time.time() - t0
    return plan


def gb(x) -> str:
    return f"{x / GiB:8.2f} GiB"


def format_plan(cfg, S, plan, gpu_name) -> str:
    st, L = plan["step"], []
    n = st["weights"] // dtype_bytes(S.dtype)
    L.append(f"plan: {S.trainer} | {n / 1e9:.3f} B parameters | {str(S.dtype).replace('torch.', '')} | "
             f"{'gradient checkpointing' if S.checkpointing else 'no checkpointing'} | micro-batch "
             f"{S.rows} rows x {S.seq_len} tokens | {gpu_name}: {plan['usable'] / GiB:.1f} GiB usable")
    L.append("memory (measured on fake tensors, one process):")
    for key in ("weights", "fp32 masters", "AdamW states", "gradients", "activations", "log-prob chunk",
                "reference model"):
        L.append(f"  {key:34s}{gb(st[key])}")
    if "sampling" in plan:
        L.append(f"  {'KV cache (wave of %d rows)' % plan['wave rows']:34s}{gb(plan['KV cache of a wave'])}")
    L.append(f"  {'peak, training micro-batch':34s}{gb(st['micro-batch peak'] + st['reference model'])}")
    L.append(f"  {'peak, optimizer step':34s}{gb(st['optimizer step peak'] + st['reference model'])}")
    if "sampling" in plan:
        L.append(f"  {'peak, sampling':34s}{gb(plan['sampling peak'])}")
    L.append(f"  {'PEAK':34s}{gb(plan['peak'])}  -> {'fits' if plan['fits'] else 'DOES NOT FIT'} in {gpu_name}")
    L.append("derived (linear in rows from the measurement):")
    chk = plan["largest micro-batch peak (checked)"]
    L.append(f"  largest micro-batch: {plan['largest micro-batch rows']} rows = --micro-batch-tokens "
             f"{plan['largest micro-batch tokens']}" + (f" (checked: peak {chk / GiB:.2f} GiB)" if chk else ""))
    if "sampling" in plan:
        L.append(f"  sampler: at most {plan['largest sampler rows']} rows per wave fit; the sampler's default "
                 f"budget takes {plan['sampler default rows']} of the {S.rows_per_step} rows per wave")
    if "fsdp" in plan:
        f = plan["fsdp"]
        L.append(f"FSDP2, {f['ranks']} ranks, per rank (derived from the one-process parts):")
        for key, v in f.items():
            if key != "ranks" and not key.startswith("step s"):
                L.append(f"  {key:48s}{gb(v)}")
    t = plan["time"]
    L.append("time ESTIMATE (roofline: dense bf16 peak FLOP/s and memory bandwidth; a lower bound):")
    L.append(f"  training  {t['training FLOPs'] / 1e15:9.1f} PFLOP -> {t['training s (estimate)']:8.1f} s")
    if "sampling s (estimate)" in t:
        L.append(f"  sampling  {t['decode waves']} waves x {S.new_tokens} tokens -> {t['sampling s (estimate)']:8.1f} s")
    L.append(f"  step      {t['step s (estimate)']:8.1f} s" + (
        f"   ({plan['fsdp']['step s per rank (estimate)']:.1f} s on {plan['fsdp']['ranks']} ranks)" if "fsdp" in plan else ""))
    L.append(f"(planned in {plan['plan seconds']:.1f} s)")
    return "\n".join(L)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m minirl.plan", description=__doc__.split("\n")[0],
                                epilog="Every other flag goes to the training script's parser "
                                       "(--preset, --prompts-per-step, --num-samples, --max-new-tokens, "
                                       "--micro-batch-tokens, --gradient-checkpointing, --dtype, --beta, ...).")
    a = p.add_argument
    a("--model", required=True, help="model folder or config.json (no weights needed)")
    a("--trainer", default="grpo", choices=["grpo", "sft"])
    a("--gpu", default="h100-80", choices=sorted(GPUS))
    a("--gpu-memory", type=float, default=None, help="GiB of GPU memory instead of --gpu's")
    a("--ranks", type=int, default=1, help="GPUs under torchrun (FSDP2)")
    a("--device", default="cuda", choices=["cuda", "cpu"],
      help="plan a GPU run (default) or a CPU run (how the plan is checked against a measured step)")
    a("--prompt-len", type=int, default=None, help="GRPO prompt tokens (default: --max-prompt-len or 256)")
    a("--check", action="store_true", help="check the largest micro-batch with a second fake run (doubles the time)")
    a("--json", default=None, metavar="FILE", help="also write the plan as JSON")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)
    if args.ranks < 1:
        raise MinirlError(f"--ranks: must be >= 1, got {args.ranks}")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise MinirlError(f"--gpu-memory: must be > 0 GiB, got {args.gpu_memory}")
    if args.prompt_len is not None and args.prompt_len < 1:
        raise MinirlError(f"--prompt-len: must be >= 1, got {args.prompt_len}")
    cfg = read_model_config(args.model)
    run = run_settings(args.trainer, ["--model", args.model, *rest])
    S = settings(args, run)
    gpu = GPUS[args.gpu]
    name = args.gpu
    if args.gpu_memory is not None:
        gpu, name = (int(args.gpu_memory * GiB), *gpu[1:]), f"{args.gpu_memory:g} GiB"
    usable = gpu[0] - (RESERVED if args.device == "cuda" else 0)
    plan = make_plan(cfg, S, usable, gpu, args.ranks, search=args.check)
    print(format_plan(cfg, S, plan, name))
    if args.json:
        atomic_write_json(args.json, {"gpu": name, "dtype": str(S.dtype), "trainer": S.trainer, **{
            k: v for k, v in plan.items()}})


if __name__ == "__main__":
    try:
        main()
    except MinirlError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
