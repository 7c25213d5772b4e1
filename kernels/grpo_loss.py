"""Triton kernel 3: the GRPO per-token loss (clipped surrogate + KL to a reference), fused
forward and gradient, defined by minirl.grpo.token_loss (plain PyTorch).

Per token (all [N, T], flattened; A = advantage, r = exp(logp - old_logp)):

    surrogate = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    log_r     = ref_logp - logp
    kl        = k1: -log_r   |   k2: log_r^2 / 2   |   k3: exp(log_r) - log_r - 1
    loss      = surrogate + beta kl,   0 where mask == 0

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
backward is a single multiply by the upstream gradient and no kernel at all. It also writes
ratio, kl and the clip code per token, from which minirl.losses computes the logged
statistics.
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


class TritonGrpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, adv, mask, ref_logp, eps_low, eps_high, beta, kl_estimator):
        n = logp.numel()
        loss = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
        dlogp = torch.empty_like(loss)
        ratio = torch.empty_like(loss)
        kl = torch.empty_like(loss)
        clipped = torch.empty(logp.shape, dtype=torch.int8, device=logp.device)
        if n > 0:
            block = 4096 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 1024
            _grpo_loss_kernel[(triton.cdiv(n, block),)](
                logp, old_logp, adv, mask, ref_logp if ref_logp is not None else logp,
                loss, dlogp, ratio, kl, clipped,
                n, float(eps_low), float(eps_high), float(beta),
                KL=KL_CODES[kl_estimator if ref_logp is not None else None], BLOCK=block,
                num_warps=4,
            )
        ctx.save_for_backward(dlogp)
        ctx.mark_non_differentiable(ratio, kl, clipped)
        return loss, ratio, kl, clipped

    @staticmethod
    def backward(ctx, g_loss, _g_ratio, _g_kl, _g_clipped):
        (dlogp,) = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and g_loss is not None:
            grad = g_loss * dlogp  # [N, T]: chain rule, elementwise
        return grad, None, None, None, None, None, None, None, None


def grpo_token_loss_triton(logp, old_logp, adv, mask, eps_low, eps_high, ref_logp=None,
                           beta=0.0, kl_estimator="k3"):
    """The Triton backend of minirl.grpo.token_loss: all [N, T] contiguous on one device,
    logp/old_logp/adv/ref fp32, mask bool. Returns (loss, ratio, kl, clipped) like it."""
    return TritonGrpoLoss.apply(logp, old_logp, adv, mask, ref_logp, eps_low, eps_high, beta,
                                kl_estimator)
