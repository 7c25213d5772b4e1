"""PyTorch definitions of what minirl's kernels compute (pure torch: no triton needed).

Notation, per token row n (logits z = z_n [V], target t = t_n):

    lse       = log sum_j exp(z_j)                         log-sum-exp, fp32
    log p_j   = z_j - lse                                   log-softmax
    logprob   = log p_t                                     the token's log-probability
    entropy H = -sum_j p_j log p_j                          entropy of the next-token distribution

Gradients (derived in kernels/logprobs.py), for upstream grads g (on logprob) and e (on H):

    d logprob / d z_j = 1[j = t] - p_j
    d H / d z_j       = -p_j (log p_j + H)
    d loss / d z_j    = g (1[j = t] - p_j) - e p_j (log p_j + H)
                      = g 1[j = t] - p_j (g + e (log p_j + H))

Kernel 3, the GRPO per-token loss (kernels/grpo_loss.py), computes the formula written in
minirl/grpo.py's module docstring (the home of the objective, where a reader looks for
it); grpo_token_loss_reference at the end of this file is that formula in plain PyTorch,
and token_stats the statistics trainers log from its per-token outputs.

All maths runs in fp32 (fp64 when the inputs are fp64, which the tests use), whatever the
input dtype; outputs are fp32 (fp64 for fp64 inputs).
"""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64 (tests use it as ground truth)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Kernel 1: token log-probs (and entropy) from logits. The definition, through autograd.
# --------------------------------------------------------------------------------------

def token_logprobs_reference(logits, targets, return_entropy=False):
    """log p(targets) from logits [N, V] -> [N] (and entropy [N]), via plain autograd.

    This is the definition the Triton kernel is tested against, and the torch backend of
    `minirl.losses.token_logprobs`. It makes one fp32 copy of the logits (log_softmax
    output, kept by autograd for backward), which the Triton kernel avoids; training on
    CPU goes through the chunked linear path instead, which never holds [N, V]."""
    logp_all = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)  # [N, V]
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [N]
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N]
    return logp, entropy


# --------------------------------------------------------------------------------------
# The same maths split into a forward and a backward over one chunk of rows, without
# autograd. The chunked linear path (kernels/linear_logprobs.py) calls these on CPU (and on
# GPU with backend="torch"), and the Triton kernel 1 versions of them otherwise.
# --------------------------------------------------------------------------------------

def logprobs_fwd_torch(z, targets, with_entropy):
    """Forward over one chunk. z: logits [C, V] (may be overwritten: the caller discards it).

    Returns (logprob [C], entropy [C] or None, lse [C]); lse is kept for the backward so
    that the backward needs no second reduction over V."""
    work = z if z.dtype in (torch.float32, torch.float64) else z.float()  # [C, V] fp32 maths
    lse = torch.logsumexp(work, dim=-1)  # [C]
    logp = work.gather(1, targets.long().unsqueeze(1)).squeeze(1) - lse  # [C]
    entropy = None
    if with_entropy:
        logp_all = work.sub_(lse.unsqueeze(1))  # [C, V] in place: the logits are not needed again
        p = logp_all.exp()  # [C, V]
        entropy = -p.mul_(logp_all).sum(-1)  # [C]; mul_ reuses p's buffer
    return logp, entropy, lse


def logprobs_bwd_torch_(z, targets, lse, entropy, g_logp, g_entropy):
    """Backward over one chunk: overwrite z (logits [C, V]) with d loss / d z and return it.

    g_logp [C] and g_entropy [C] (or None) are the upstream gradients; entropy [C] is needed
    only when g_entropy is given. Formula (module docstring):
        dz_j = g 1[j = t] - p_j (g + e (log p_j + H))"""
    work = z if z.dtype in (torch.float32, torch.float64) else z.float()  # [C, V]
    logp_all = work.sub_(lse.unsqueeze(1))  # [C, V] log p, in place
    rows = torch.arange(z.shape[0], device=z.device)
    if g_entropy is None:
        dz = logp_all.exp_().mul_(-g_logp.unsqueeze(1))  # [C, V] -p_j g (one buffer)
    else:
        p = logp_all.exp()  # [C, V]
        coef = logp_all.add_(entropy.unsqueeze(1)).mul_(g_entropy.unsqueeze(1))  # e (log p + H)
        dz = coef.add_(g_logp.unsqueeze(1)).mul_(p).neg_()  # -p_j (g + e (log p_j + H))
        del p
    dz[rows, targets.long()] += g_logp  # + g 1[j = t]
    if dz.data_ptr() != z.data_ptr():  # low-precision z: write the fp32 result back, rounded
        z.copy_(dz)
    return z


# --------------------------------------------------------------------------------------
# Kernel 3: the GRPO per-token loss (formula: minirl/grpo.py's module docstring).
# --------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def grpo_token_loss_reference(logp, old_logp, adv, mask, eps_low, eps_high, ref_logp=None,
                              beta=0.0, kl_estimator="k3"):
    """The per-token loss l [B, T] of minirl/grpo.py's docstring, and for the statistics
    ratio, kl and the clip code (1: low clip active, 2: high clip active), all 0 where mask
    is False. logp [B, T] differentiable (through autograd); old_logp, adv (per token),
    ref_logp [B, T] fp32; mask bool."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)  # [B, T]: padding may hold garbage (inf, nan)
    old_logp = torch.where(mask, old_logp.detach(), zero)
    adv = torch.where(mask, adv.detach(), zero)
    ratio = torch.exp(logp - old_logp)  # [B, T]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        log_ref = torch.where(mask, ref_logp.detach(), zero) - logp  # log(ref / policy)
        if kl_estimator == "k1":
            kl = -log_ref
        elif kl_estimator == "k2":
            kl = log_ref**2 / 2
        else:  # k3: unbiased and always >= 0
            kl = torch.exp(log_ref) - log_ref - 1
    loss = torch.where(mask, -surrogate + beta * kl, zero)  # [B, T]
    clipped = (((adv < 0) & (ratio < 1 - eps_low)).to(torch.int8)
               + 2 * ((adv > 0) & (ratio > 1 + eps_high)).to(torch.int8))  # [B, T]
    return loss, ratio.detach() * mask, kl.detach() * mask, clipped * mask


@torch.no_grad()
def token_stats(mask, ratio, kl, clipped):
    """The statistics trainers log, as 0-dim fp32 tensors (no host sync), over the tokens
    where mask is True: clip_low_frac / clip_high_frac (fraction of tokens whose gradient the
    low / high clip zeroes), clip_frac, ratio_mean/min/max (1 with no token), kl_mean, n_tokens."""
    n = mask.sum().to(torch.float32)
    denom = n.clamp(min=1.0)
    clip_low = (clipped == 1).sum().to(torch.float32) / denom
    clip_high = (clipped == 2).sum().to(torch.float32) / denom
    one = torch.ones((), dtype=torch.float32, device=ratio.device)
    any_token = n > 0
    ratio_min = torch.where(mask, ratio, torch.inf).min() if ratio.numel() else one
    ratio_max = torch.where(mask, ratio, -torch.inf).max() if ratio.numel() else one
    return {"clip_low_frac": clip_low, "clip_high_frac": clip_high, "clip_frac": clip_low + clip_high,
            "ratio_mean": torch.where(any_token, ratio.sum() / denom, one),
            "ratio_min": torch.where(any_token, ratio_min, one),
            "ratio_max": torch.where(any_token, ratio_max, one),
            "kl_mean": kl.sum() / denom, "n_tokens": n}
