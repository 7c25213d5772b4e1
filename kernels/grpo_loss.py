"""Triton kernel 3: the GRPO per-token loss (clipped surrogate + beta x KL to a reference),
fused forward and gradient. The formula is the one in minirl/grpo.py's module docstring
(the objective's home); its plain PyTorch definition, which this kernel is tested equal to,
is kernels.reference.grpo_token_loss_reference. Below, A = advantage, r = exp(logp - old_logp),
log_r = ref_logp - logp, all [N, T] flattened.

Gradient with respect to logp (d r / d logp = r, d log_r / d logp = -1):

    surrogate: -r A where the unclipped term is the minimum or r is inside the clip range;
               0 where the clip is active:  A > 0 and r > 1 + eps_high  ("clip high"),
                                            A < 0 and r < 1 - eps_low   ("clip low").
               (A > 0, r < 1 - eps_low: min is r A, unclipped, gradient -r A; likewise
               A < 0, r > 1 + eps_high. That asymmetry is PPO's pessimistic bound.)
    k1: d/dlogp = 1       k2: d/dlogp = -log_r       k3: d/dlogp = 1 - exp(log_r)

Design choice: the kernel takes log-probs rather than being fused into kernel 1 or 2 --
the simpler option. The loss is elementwise over [N, T] (a few MB), tiny beside the [N, V]
work that produces the log-probs; fusing it into kernel 2 would save that kernel's one
recomputed matmul (see kernels/linear_logprobs.py) at the price of a loss-specific kernel 2.
Not yet measured on a GPU: benchmarks/bench_kernels.py times this kernel against the torch
reference and kernel 2 against naive, which is the data this choice should be checked with.

The forward writes d loss / d logp [N, T] next to the loss (one more fp32 [N, T]), so the
backward is a single multiply by the upstream gradient and no kernel at all (the custom op
minirl::grpo_token_loss in kernels/ops.py registers that backward). It also writes ratio,
kl and the clip code per token, from which kernels.reference.token_stats computes the
logged statistics.
"""
import os

import torch
import triton
import triton.language as tl

KL_CODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _grpo_loss_kernel(
    logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, ref_logp_ptr,  # inputs [N*T]; mask is bool
    loss_ptr, dlogp_ptr, ratio_ptr, kl_ptr, clipped_ptr,  # outputs [N*T]
    n_elements, eps_low, eps_high, beta,
    KL: tl.constexpr, BLOCK: tl.constexpr,  # KL: 0 none, 1 k1, 2 k2, 3 k3
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    keep = inside & (tl.load(mask_ptr + offs, mask=inside, other=0) != 0)
    # Masked positions are never read (other=0): padding holding inf / nan cannot leak.
    logp = tl.load(logp_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    old_logp = tl.load(old_logp_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=keep, other=0.0).to(tl.float32)

    ratio = tl.exp(logp - old_logp)
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    surrogate = -tl.minimum(ratio * adv, clipped_ratio * adv)
    clip_low = (adv < 0.0) & (ratio < 1.0 - eps_low)
    clip_high = (adv > 0.0) & (ratio > 1.0 + eps_high)
    dlogp = tl.where(clip_low | clip_high, 0.0, -ratio * adv)

    kl = tl.zeros([BLOCK], dtype=tl.float32)
    if KL != 0:
        ref_logp = tl.load(ref_logp_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        log_r = ref_logp - logp
        if KL == 1:
            kl = -log_r
            dkl = tl.full([BLOCK], 1.0, tl.float32)
        elif KL == 2:
            kl = 0.5 * log_r * log_r
            dkl = -log_r
        else:
            r_ref = tl.exp(log_r)
            kl = r_ref - log_r - 1.0
            dkl = 1.0 - r_ref
        surrogate = surrogate + beta * kl
        dlogp = dlogp + beta * dkl

    tl.store(loss_ptr + offs, tl.where(keep, surrogate, 0.0), mask=inside)
    tl.store(dlogp_ptr + offs, tl.where(keep, dlogp, 0.0), mask=inside)
    tl.store(ratio_ptr + offs, tl.where(keep, ratio, 0.0), mask=inside)
    tl.store(kl_ptr + offs, tl.where(keep, kl, 0.0), mask=inside)
    code = clip_low.to(tl.int8) + 2 * clip_high.to(tl.int8)
    tl.store(clipped_ptr + offs, tl.where(keep, code, 0).to(tl.int8), mask=inside)


def _launch(logp, old_logp, adv, mask, ref_logp, loss, dlogp, ratio, kl, clipped,
            eps_low, eps_high, beta, kl_estimator):
    """Grid, arguments and compile-time options exactly as launched (also read by
    aot_launches, so the AOT check compiles what runs)."""
    n = logp.numel()
    block = 4096 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 1024
    args = (logp, old_logp, adv, mask, ref_logp if ref_logp is not None else logp,
            loss, dlogp, ratio, kl, clipped, n, float(eps_low), float(eps_high), float(beta))
    code = KL_CODES[kl_estimator if ref_logp is not None else None]
    return (triton.cdiv(n, block),), args, dict(KL=code, BLOCK=block, num_warps=4)


def grpo_loss_fwd_triton(logp, old_logp, adv, mask, ref_logp, eps_low, eps_high, beta,
                         kl_estimator):
    """All [N, T] contiguous on one device; logp / old_logp / adv / ref_logp fp32, mask bool.
    Returns (loss, dlogp, ratio, kl, clipped): dlogp = d loss / d logp, clipped the clip code
    (int8: 1 low clip active, 2 high), all 0 where mask is False."""
    loss = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    dlogp, ratio, kl = torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)
    clipped = torch.empty(logp.shape, dtype=torch.int8, device=logp.device)
    if logp.numel() > 0:
        grid, args, meta = _launch(logp, old_logp, adv, mask, ref_logp, loss, dlogp, ratio, kl,
                                   clipped, eps_low, eps_high, beta, kl_estimator)
        _grpo_loss_kernel[grid](*args, **meta)
    return loss, dlogp, ratio, kl, clipped


def aot_launches():
    """Every launch grpo_loss_fwd_triton can make on a GPU, as (kernel, args, options,
    label): with and without a reference (each KL estimator), for a token count that is a
    multiple of 16 and one that is not (Triton specialises the integer on it). The inputs'
    dtypes are fixed: the kernels.ops wrapper casts them to fp32 and the mask to bool."""
    out = []
    for n in (4096, 4099):
        f, b = (torch.empty(n, dtype=d, device="meta") for d in (torch.float32, torch.bool))
        i8 = torch.empty(n, dtype=torch.int8, device="meta")
        for kl_estimator, ref in ((None, None), ("k1", f), ("k2", f), ("k3", f)):
            _, args, opts = _launch(f, f, f, b, ref, f, f, f, f, i8, 0.2, 0.28, 0.04,
                                    kl_estimator)
            out.append((_grpo_loss_kernel, args, opts, f"n={n} kl={kl_estimator or 'none'}"))
    return out
