"""The GRPO family: group advantages, the per-token objective and its aggregation, and the
log-probs of completions under the policy — exactly these variants:

Advantages (rewards r [P, n], one group of n samples per prompt):
    std_mode="group":  A = (r - mean_group(r)) / (std_group(r) + eps)      GRPO (DeepSeekMath)
    std_mode="batch":  A = (r - mean_group(r)) / (std_batch(r) + eps)      (REINFORCE++-style)
    std_mode="none":   A =  r - mean_group(r)                              Dr. GRPO
    std is the unbiased (n - 1) standard deviation, as in TRL.

Per-token loss (token_loss), with ratio = exp(logp - old_logp) and log_ref = ref_logp - logp:
    l_t = -min(ratio A_t, clip(ratio, 1 - eps_low, 1 + eps_high) A_t) + beta * KL_t
    KL_t = k1: -log_ref  |  k2: log_ref^2 / 2  |  k3: exp(log_ref) - log_ref - 1
(Schulman's estimators of KL(policy || reference); eps_high > eps_low is DAPO's clip-higher.)
A_t is the sequence's advantage, times a rollout-correction weight w_t when one is used:
    w_t = min(exp(old_logp - sampler_logp), C)                      "tis" (truncated IS)
    w_t = exp(old_logp - sampler_logp) if that is <= C, else 0      "mis" (masked IS)
(w_t >= 0, so weighting A_t is weighting the policy-gradient term; the KL term is unweighted.)

Aggregation over the tokens t of sequences i (|o_i| = completion length, G = #sequences):
    "seq-mean-token-mean":  (1/G) sum_i (1/|o_i|) sum_t l_it      GRPO
    "token-mean":           (1 / sum_i |o_i|) sum_i sum_t l_it    DAPO
    "seq-mean-token-sum-norm": (1/(G L)) sum_i sum_t l_it         Dr. GRPO, L = a constant
                                                                  (max completion length)
The denominators G, sum |o_i| are those of the whole optimisation (mini-)batch, so splitting
it into micro-batches for memory (gradient accumulation) gives the same gradient, and so does
leaving out sequences whose every l_it is 0 (A = 0 and beta = 0: their gradient is exactly 0).

Methods aimed at capability, stability or length (each off by default; with every one off
policy_loss computes exactly the plain objective above). n = group size, r = rewards.

Advantage estimators (replace group_advantages):
    passk_advantages (Chen et al., arXiv 2508.10751, the closed form of Pass@k training):
        binary rewards, N samples of which N_neg are wrong, 1 <= K <= N:
        R = 1 - C(N_neg, K) / C(N, K)            the group's pass@k estimate
        sigma = sqrt(R (1 - R))
        A_pos = (1 - R) / sigma,   A_neg = (1 - R - C(N_neg - 1, K - 1) / C(N - 1, K - 1)) / sigma
        A = 0 when sigma = 0 (all right, all wrong, or N_neg < K: every K-subset then holds a
        right sample, and both numerators are 0 too). K = 1 gives (r - mean) / population std.
    maxrl_advantages (Tajwar et al., arXiv 2602.02710, MaxRL): A = (r - mean) / mean, A = 0
        when mean = 0 (rewards >= 0). Dividing by the success rate p weights a prompt by 1/p:
        the gradient of log p (maximum likelihood) instead of p (pass@1).
    RLOO (Ahmadian et al.): A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean), which is
        std_mode="none" times n/(n-1); with a constant n that factor is a learning-rate scale
        (exactly, for SGD; AdamW is invariant to it up to its eps), so RLOO needs no mode of its own.

Rewards before the advantage:
    unlikeliness_rewards (He, Fried, Welleck, arXiv 2506.02355, as in the authors' released
        code): the n samples of a group are ranked by their mean token log-prob under the
        sampling policy, rank 0 = least likely, n - 1 = most likely (ties: lower index first);
        a correct sample's reward becomes r (1 - beta rank / n), so the most likely correct
        sample gains least. Wrong samples keep their reward.
    overlong_penalty (DAPO, arXiv 2503.14476, eq. 13), added to the reward, with L = max_len and
        B = buffer:  0 if |y| <= L - B,  (L - B - |y|) / B if L - B < |y| <= L,  -1 beyond L.

Per-sample and per-token weights on the policy-gradient term (they multiply A_t, like w_t;
the KL term is not weighted):
    positive_weights (Zhu et al., arXiv 2506.01347, W-REINFORCE): lambda for samples with A > 0,
        1 otherwise; lambda = 0 trains on negative samples only (NSR). The paper's W-REINFORCE
        is this weight on REINFORCE with +1/-1 rewards; here it weights any advantage.
    top_entropy_mask (Wang et al., arXiv 2506.01939): A_t kept only on tokens whose entropy
        H_t >= the (1 - rho) quantile (linear interpolation, as torch.quantile) of the
        entropies of the loss tokens of the call: the top-rho fraction, ties at the threshold
        all kept. No loss token: nothing kept. Denominators of the aggregation are unchanged.
    clip_cov_select (Cui et al., arXiv 2505.22617, Clip-Cov, as in verl): over the loss tokens,
        cov_t = (logp_t - mean logp)(A_t - mean A); among the tokens not already clipped by
        the PPO clip and with clip_low < cov_t < clip_high (defaults 1, 5), max(1,
        floor(ratio * #tokens)) are drawn at random (default ratio 2e-4); their A_t is set to 0
        (their policy-gradient term, value and gradient, is removed).

Other per-token losses (policy_loss's `loss`, `ratio_level`, `cov_control`):
    entropy bonus (entropy_coef = C): l_t - C H_t, aggregated like l_t (token-mean: the
        loss minus C times the mean token entropy). H_t's exact gradient comes from the
        log-prob kernels' entropy output (completion_logprobs(..., entropy_grad=True)).
    KL-Cov (Cui et al., as in verl): the unclipped surrogate -ratio A_t on every token, plus
        k |logp_t - old_logp_t| (default k = 1) on the max(1, floor(ratio * #tokens)) tokens
        with the largest cov_t (default ratio 2e-4). On the first on-policy pass logp = old_logp
        exactly, and the penalty's gradient there is 0 (the subgradient of |x| at 0).
    GSPO (Zheng et al., arXiv 2507.18071): s_i = exp((1/|o_i|) sum_t (logp - old_logp)), the
        geometric mean of sequence i's token ratios, clipped per sequence:
        l_t = -min(s_it A, clip(s_it, 1 - eps_low, 1 + eps_high) A) with the token form
        s_it = sg[s_i] exp(logp_t - sg[logp_t]) (value s_i). Its gradient, aggregated with
        seq-mean-token-mean, is exactly that of (1/G) sum_i -min(s_i A_i, clip(s_i) A_i).
        The paper uses clip ranges about 3e-4 / 4e-4, not 0.2.
    CISPO (MiniMax-M1, arXiv 2506.13585): l_t = -sg[clip(ratio_t, 1 - eps_low, 1 + eps_high)]
        A_t logp_t: the importance weight is clipped, not the gradient, so clipped tokens keep
        theirs (gradient -clip(ratio) A). eps_low >= 1 means no lower bound (the paper's choice).
        Its value is not a surrogate of the return (it is a function of logp); read its gradient.

Reference resets (ProRL, Liu et al., arXiv 2505.24864): every N steps the KL reference becomes a
copy of the current policy (reset_reference), and optionally the optimizer state is reset,
so the KL term stops pulling a long run back to the initial model.

The statistics that define a "batch" for top_entropy_mask, clip_cov_select and kl_cov_select
(quantile, means, counts) are those of the tokens of one policy_loss call: the paper's
definition exactly when a call holds the whole optimisation (mini-)batch.

token_loss is the definition, in plain PyTorch; the Triton kernel (kernels/grpo_loss.py) is a
fused drop-in behind the same call (backend="triton", or "auto" on CUDA), tested equal.
Inputs are not checked here (internal calls); minirl.losses.grpo_token_loss is the checked
public entry point.
"""
from dataclasses import dataclass

import torch

from minirl.common import MinirlError
from minirl.kernels import ops
from minirl.kernels.reference import KL_ESTIMATORS, token_stats  # noqa: F401 (part of this API)

STD_MODES = ("group", "batch", "none")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
ADVANTAGES = ("grpo", "passk", "maxrl")
LOSSES = ("clip", "cispo")
RATIO_LEVELS = ("token", "sequence")
COV_CONTROLS = ("none", "clip-cov", "kl-cov")


def group_advantages(rewards: torch.Tensor, std_mode: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """rewards [P, n] -> advantages [P, n] (see the module docstring)."""
    if std_mode not in STD_MODES:
        raise MinirlError(f"--advantage-std: unknown mode {std_mode!r} (choose from {STD_MODES})")
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [P, n]
    if std_mode == "none":
        adv = centred
    elif std_mode == "group":
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
        adv = centred / (std + eps)
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
        adv = centred / (std + eps)
    return adv.float()


def _binary(rewards, flag):
    rewards = torch.as_tensor(rewards).double()
    if rewards.dim() != 2:
        raise MinirlError(f"{flag}: rewards must be [P, n], got shape {tuple(rewards.shape)}")
    if not bool(((rewards == 0) | (rewards == 1)).all()):
        bad = rewards[(rewards != 0) & (rewards != 1)][0].item()
        raise MinirlError(f"{flag} needs binary rewards 1 (right) / 0 (wrong); got {bad}")
    return rewards


def passk_advantages(rewards, k: int) -> torch.Tensor:
    """Binary rewards [P, n] (1 right, 0 wrong) -> Pass@k advantages [P, n] fp32, the closed
    form of Chen et al. (module docstring)."""
    from math import comb, sqrt
    rewards = _binary(rewards, "--advantage passk")
    n = rewards.shape[1]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise MinirlError(f"--pass-k {k!r} must be an integer in [1, {n}] (the group size)")
    # One row per possible number of wrong samples: exact integer binomials, then fp64.
    a_pos, a_neg = torch.zeros(n + 1, dtype=torch.float64), torch.zeros(n + 1, dtype=torch.float64)
    for n_neg in range(n + 1):
        r = 1.0 - comb(n_neg, k) / comb(n, k)
        sigma = sqrt(r * (1.0 - r))
        if sigma > 0:
            a_pos[n_neg] = (1.0 - r) / sigma
            a_neg[n_neg] = (1.0 - r - comb(n_neg - 1, k - 1) / comb(n - 1, k - 1)) / sigma
    n_neg = (rewards == 0).sum(1)  # [P]
    return torch.where(rewards == 1, a_pos[n_neg][:, None], a_neg[n_neg][:, None]).float()


def maxrl_advantages(rewards) -> torch.Tensor:
    """Rewards [P, n] (>= 0, binary in the paper) -> MaxRL advantages (r - mean) / mean [P, n]
    fp32, 0 for a group whose mean is 0."""
    rewards = torch.as_tensor(rewards).double()
    if rewards.dim() != 2:
        raise MinirlError(f"--advantage maxrl: rewards must be [P, n], got shape {tuple(rewards.shape)}")
    if bool((rewards < 0).any()):
        raise MinirlError(f"--advantage maxrl needs rewards >= 0 (it divides by their mean); "
                          f"got {rewards.min().item()}")
    mean = rewards.mean(dim=1, keepdim=True)  # [P, 1]
    return torch.where(mean > 0, (rewards - mean) / mean.clamp(min=1e-300), 0.0).float()


def mean_logprobs(rows) -> torch.Tensor:
    """List of 1-D token log-prob tensors -> [len(rows)] fp64 means (0 for an empty row):
    the sequence likelihood unlikeliness_rewards ranks by."""
    return torch.tensor([float(r.double().mean()) if len(r) else 0.0 for r in rows], dtype=torch.float64)


def unlikeliness_rewards(rewards, seq_logprob, correct, beta: float) -> torch.Tensor:
    """rewards, seq_logprob (mean token log-prob under the sampler), correct (bool), all [P, n]
    -> rewards [P, n] fp64 with each correct one scaled by (1 - beta rank / n) (module docstring)."""
    if not 0.0 <= beta <= 1.0:
        raise MinirlError(f"--rank-penalty {beta} must lie in [0, 1] (a scaled reward keeps its sign)")
    rewards = torch.as_tensor(rewards).double()
    seq_logprob = torch.as_tensor(seq_logprob).double()
    correct = torch.as_tensor(correct).bool()
    if not rewards.shape == seq_logprob.shape == correct.shape or rewards.dim() != 2:
        raise MinirlError(f"--rank-penalty: rewards {tuple(rewards.shape)}, log-probs "
                          f"{tuple(seq_logprob.shape)} and correct {tuple(correct.shape)} must be one [P, n]")
    n = rewards.shape[1]
    order = torch.argsort(seq_logprob, dim=1, stable=True)  # [P, n] least likely first
    rank = torch.argsort(order, dim=1, stable=True).double()  # [P, n] 0 = least likely
    return torch.where(correct, rewards * (1.0 - beta * rank / n), rewards)


def overlong_penalty(lengths, max_len: int, buffer: int) -> torch.Tensor:
    """Completion lengths [...] -> DAPO's soft overlong reward penalty [...] fp64 in [-1, 0]."""
    if not isinstance(buffer, int) or not 1 <= buffer <= max_len:
        raise MinirlError(f"--overlong-buffer {buffer!r} must be an integer in [1, --max-new-tokens={max_len}]")
    lengths = torch.as_tensor(lengths).double()
    start = max_len - buffer
    return torch.where(lengths <= start, 0.0, torch.clamp((start - lengths) / buffer, min=-1.0))


def positive_weights(adv: torch.Tensor, weight: float) -> torch.Tensor:
    """W-REINFORCE's per-sample weight (same shape as adv): `weight` where adv > 0, else 1."""
    if weight < 0:
        raise MinirlError(f"--positive-weight {weight} must be >= 0")
    return torch.where(adv > 0, torch.as_tensor(weight, dtype=adv.dtype), torch.ones((), dtype=adv.dtype))


def token_loss(logp, old_logp, adv, mask, eps_low, eps_high, ref_logp=None, beta=0.0,
               kl_estimator="k3", backend=None):
    """Per-token loss l [B, T] (module docstring), and for the statistics ratio, kl and the
    clip code (1: low clip active, 2: high clip active), all 0 where mask is False.
    logp [B, T] differentiable; old_logp, adv (per token), ref_logp [B, T] fp32; mask bool."""
    return ops.grpo_token_loss(logp, old_logp, adv, mask, eps_low, eps_high, ref_logp, beta,
                               kl_estimator, backend)


def rollout_weights(old_logp, sampler_logp, mask, mode, cap):
    """Rollout-correction weights w [B, T] (module docstring) for the policy-gradient term:
    the trainer's rollout-policy log-probs old_logp against the sampler's sampler_logp."""
    rho = torch.exp(torch.where(mask, old_logp - sampler_logp, 0.0))  # [B, T]
    if mode == "tis":
        return rho.clamp(max=cap)
    return torch.where(rho <= cap, rho, 0.0)  # mis


@torch.no_grad()
def mismatch_stats(old_logp, sampler_logp, mask):
    """Sampler vs trainer on the completion tokens (sums, for per-token means after
    accumulation): k3(sampler || trainer) with log_r = trainer - sampler, |log_r| and the
    number of tokens with |log_r| > 0.1; max |log_r|."""
    log_r = torch.where(mask, old_logp - sampler_logp, 0.0)  # [B, T]
    k3 = torch.exp(log_r) - log_r - 1
    return {"mismatch_k3_sum": k3.sum(), "mismatch_abs_sum": log_r.abs().sum(),
            "mismatch_big_sum": (log_r.abs() > 0.1).sum().to(torch.float32),
            "mismatch_abs_max": log_r.abs().max() if log_r.numel() else torch.zeros(()),
            "mismatch_tokens": mask.sum().to(torch.float32)}


def top_entropy_mask(entropy, mask, rho: float) -> torch.Tensor:
    """Bool [B, T]: the loss tokens whose entropy is at least the (1 - rho) quantile of the
    loss tokens' entropies (Wang et al.; module docstring). entropy [B, T], mask [B, T] bool."""
    if not 0.0 < rho <= 1.0:
        raise MinirlError(f"--top-entropy-quantile {rho} must lie in (0, 1]")
    values = entropy.detach()[mask]  # [M]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - rho)
    return mask & (entropy.detach() >= threshold)


def cov_scores(logp, adv, mask) -> torch.Tensor:
    """Centred covariance terms [B, T] fp32 (0 off the mask): (logp - mean logp)(A - mean A),
    the means over the tokens where mask is True (Cui et al.)."""
    logp, adv = logp.detach().float(), adv.detach().float()
    n = mask.sum().clamp(min=1)
    mean_logp = torch.where(mask, logp, 0.0).sum() / n
    mean_adv = torch.where(mask, adv, 0.0).sum() / n
    return torch.where(mask, (logp - mean_logp) * (adv - mean_adv), 0.0)


def _select_count(mask, ratio):
    return max(1, int(ratio * int(mask.sum()))) if bool(mask.any()) else 0


def clip_cov_select(logp, old_logp, adv, mask, eps_low, eps_high, ratio=2e-4, bounds=(1.0, 5.0),
                    generator=None) -> torch.Tensor:
    """Bool [B, T]: the tokens whose policy-gradient term Clip-Cov removes (module docstring):
    a random draw (torch.randperm with `generator`, over the candidates in row-major order)
    among the loss tokens not clipped by the PPO clip with bounds[0] < cov < bounds[1]."""
    if not 0.0 < ratio <= 1.0 or not bounds[0] < bounds[1]:
        raise MinirlError(f"--cov-ratio {ratio} must lie in (0, 1] and --clip-cov-low < --clip-cov-high "
                          f"(got {bounds})")
    cov = cov_scores(logp, adv, mask)  # [B, T]
    r = torch.exp(torch.where(mask, logp.detach() - old_logp.detach(), 0.0))  # [B, T]
    clipped = ((adv < 0) & (r < 1 - eps_low)) | ((adv > 0) & (r > 1 + eps_high))
    candidates = torch.nonzero((mask & ~clipped & (cov > bounds[0]) & (cov < bounds[1])).flatten()).flatten()
    pick = torch.randperm(len(candidates), generator=generator)[:_select_count(mask, ratio)]
    chosen = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    chosen[candidates[pick.to(candidates.device)]] = True
    return chosen.view(mask.shape)


def kl_cov_select(logp, adv, mask, ratio=2e-4) -> torch.Tensor:
    """Bool [B, T]: the max(1, floor(ratio * #tokens)) loss tokens with the largest cov
    (torch.topk; module docstring), which KL-Cov penalises."""
    if not 0.0 < ratio <= 1.0:
        raise MinirlError(f"--cov-ratio {ratio} must lie in (0, 1]")
    cov = torch.where(mask, cov_scores(logp, adv, mask), -torch.inf).flatten()  # [B*T]
    chosen = torch.zeros_like(cov, dtype=torch.bool)
    chosen[torch.topk(cov, _select_count(mask, ratio)).indices] = True
    return chosen.view(mask.shape)


def gspo_log_ratio(logp, old_logp, mask) -> torch.Tensor:
    """log s_it [B, T] of GSPO's token form (module docstring): the sequence's mean log-ratio,
    detached, plus logp - sg[logp] (value 0, gradient that of logp). 0 off the mask."""
    delta = torch.where(mask, logp - old_logp.detach(), 0.0)  # [B, T]
    seq = delta.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    return torch.where(mask, seq.detach() + (logp - logp.detach()), 0.0)


def cispo_token_loss(logp, old_logp, adv, mask, eps_low, eps_high):
    """CISPO's per-token policy-gradient loss [B, T] (module docstring), its ratio and the
    clip code (1: weight clipped low, 2: clipped high; the gradient is kept)."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)  # [B, T]
    ratio = torch.exp(logp.detach() - torch.where(mask, old_logp.detach(), zero))
    weight = ratio.clamp(1 - eps_low, 1 + eps_high)  # detached: sg[clip(ratio)]
    adv = torch.where(mask, adv.detach(), zero)
    loss = torch.where(mask, -weight * adv * logp, zero)
    clipped = (ratio < 1 - eps_low).to(torch.int8) + 2 * (ratio > 1 + eps_high).to(torch.int8)
    return loss, ratio * mask, clipped * mask


@torch.no_grad()
def reset_reference(ref_model, model):
    """ProRL's reference reset: the reference model's weights become a copy of the policy's
    (converted to the reference's dtype and device)."""
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if name not in ref_params or ref_params[name].shape != p.shape:
            raise MinirlError(f"--ref-reset-every: the reference model has no parameter {name} "
                              f"of shape {tuple(p.shape)}")
        ref_params[name].copy_(p)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, num_sequences: int,
              num_tokens: int, norm_length: int = None) -> torch.Tensor:
    """A micro-batch's share of the (mini-)batch loss: per_token [B, T] (0 where masked),
    mask [B, T]; num_sequences / num_tokens are the whole mini-batch's G and sum |o_i|."""
    mask = mask.to(per_token.dtype)
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(1).clamp(min=1.0)  # [B]
        return ((per_token * mask).sum(1) / lengths).sum() / max(num_sequences, 1)
    if mode == "token-mean":
        return (per_token * mask).sum() / max(num_tokens, 1)
    if mode == "seq-mean-token-sum-norm":
        if not norm_length:
            raise MinirlError("seq-mean-token-sum-norm needs a constant normaliser (--max-new-tokens)")
        return (per_token * mask).sum() / (max(num_sequences, 1) * norm_length)
    raise MinirlError(f"--loss-aggregation: unknown mode {mode!r} (choose from {AGGREGATIONS})")


@dataclass
class Sample:
    """One completion in a rollout batch, as the policy update sees it."""
    prompt_ids: list
    completion_ids: list
    advantage: float
    loss_mask: bool = True  # False: excluded from the loss (e.g. truncated, with --truncated mask)
    old_logprobs: torch.Tensor = None  # [len(completion_ids)] the trainer's, rollout policy
    ref_logprobs: torch.Tensor = None  # [len(completion_ids)] the reference model's
    sampler_logprobs: torch.Tensor = None  # [len(completion_ids)] as the sampler drew them
    reward: float = None  # for the record (the update reads only the advantage)
    finish_reason: str = None


def batch_tensors(samples, pad_id: int, device):
    """Right-padded [B, T] ids of prompt+completion, and for the completion tokens: the
    positions whose hidden state predicts each of them, their ids, and a [B, Tc] mask.
    Right padding needs no attention mask: causal attention never looks ahead."""
    B = len(samples)
    T = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    Tc = max(max(len(s.completion_ids) for s in samples), 1)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, Tc, dtype=torch.bool)
    pred_pos = torch.zeros(B, Tc, dtype=torch.long)  # flat index b*T + t of the predicting state
    targets = torch.zeros(B, Tc, dtype=torch.long)
    for b, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        ids[b, :p + c] = torch.tensor(s.prompt_ids + s.completion_ids)
        mask[b, :c] = True
        pred_pos[b, :c] = b * T + torch.arange(p - 1, p + c - 1)
        targets[b, :c] = torch.tensor(s.completion_ids, dtype=torch.long)
    return ids.to(device), pred_pos.to(device), targets.to(device), mask.to(device)


def completion_logprobs(model, samples, pad_id: int, temperature: float = 1.0, return_entropy=False,
                        backend=None, entropy_grad=False):
    """Log-probs [B, Tc] (0 at padding) of each sample's completion tokens under `model`, with
    logits divided by `temperature` (the distribution the sampler drew from, as TRL does).
    Only the completion positions' hidden states reach the lm_head, through the fused
    kernel: no [B, T, V] logits are ever made. The entropies are detached unless
    entropy_grad (the kernel then back-propagates their exact gradient)."""
    ids, pred_pos, targets, mask = batch_tensors(samples, pad_id, next(model.parameters()).device)
    h = model(ids, return_hidden=True)  # [B, T, H]
    h = h.reshape(-1, h.shape[-1]).index_select(0, pred_pos[mask])  # [M, H] completion positions
    if temperature != 1.0:
        h = h / temperature  # (h / tau) W^T = logits / tau
    # The fused log-prob path without minirl.losses.linear_logprobs's input checks (and their
    # host sync): the targets are the model's own sampled tokens, in range by construction.
    out = ops.linear_logprobs(h.contiguous(), model.lm_head_weight, targets[mask], return_entropy,
                              None, backend)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)  # [B, Tc]
    if return_entropy:
        logp = logp.masked_scatter(mask, out[0])
        ent = torch.zeros_like(logp).masked_scatter(mask, out[1] if entropy_grad else out[1].detach())
        return logp, mask, ent
    return logp.masked_scatter(mask, out), mask


def pad_rows(rows, width, device):
    """List of 1-D tensors -> [B, width] fp32, zero padded."""
    out = torch.zeros(len(rows), width, dtype=torch.float32, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r.to(device)
    return out


def micro_batches(samples, max_tokens: int):
    """Split into micro-batches whose padded size (rows x longest row) stays within
    max_tokens; rows sorted by length so little is padding. Order does not change the
    accumulated gradient (the aggregation's denominators are global)."""
    order = sorted(range(len(samples)),
                   key=lambda i: len(samples[i].prompt_ids) + len(samples[i].completion_ids))
    batches, current, longest = [], [], 0
    for i in order:
        length = len(samples[i].prompt_ids) + len(samples[i].completion_ids)
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(samples[i])
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def policy_loss(model, samples, *, pad_id, temperature, eps_low, eps_high, beta, kl_estimator,
                aggregation, num_sequences, num_tokens, norm_length, on_policy,
                rollout_correction="none", correction_cap=2.0, backend=None,
                loss_type="clip", ratio_level="token", positive_weight=None, entropy_coef=0.0,
                top_entropy_quantile=None, cov_control="none", cov_ratio=2e-4, cov_bounds=(1.0, 5.0),
                kl_cov_coef=1.0, cov_generator=None):
    """The micro-batch's share of the loss (call .backward() on it) and its statistics.
    on_policy: old log-probs are the current ones, detached, so the ratio is exactly 1.
    With sampler log-probs on the samples, the statistics include the sampler/trainer
    mismatch (mismatch_stats) and, with a rollout correction, its weights.
    The methods of the module docstring (defaults: off, the plain objective): loss_type "cispo",
    ratio_level "sequence" (GSPO), positive_weight (lambda), entropy_coef (C),
    top_entropy_quantile (rho), cov_control "clip-cov" / "kl-cov" with cov_ratio, cov_bounds
    (Clip-Cov), kl_cov_coef (KL-Cov) and cov_generator (Clip-Cov's random draw)."""
    check_methods(loss_type, ratio_level, cov_control, entropy_coef, positive_weight, top_entropy_quantile)
    logp, mask, entropy = completion_logprobs(model, samples, pad_id, temperature, True, backend,
                                              entropy_grad=entropy_coef != 0)  # [B, Tc]
    device, width = logp.device, logp.shape[1]
    old = logp.detach() if on_policy else pad_rows([s.old_logprobs for s in samples], width, device)
    ref = pad_rows([s.ref_logprobs for s in samples], width, device) if beta > 0 else None
    loss_mask = mask & torch.tensor([s.loss_mask for s in samples], device=device)[:, None]  # [B, Tc]
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device)[:, None].expand(mask.shape)
    stats = {}
    if samples[0].sampler_logprobs is not None:
        sampler = pad_rows([s.sampler_logprobs for s in samples], width, device)
        stats.update(mismatch_stats(old, sampler, loss_mask))
        if rollout_correction != "none":
            w = rollout_weights(old, sampler, loss_mask, rollout_correction, correction_cap)  # [B, Tc]
            stats["correction_weight_sum"] = (w * loss_mask).sum()
            stats["correction_capped_sum"] = ((old - sampler).exp().gt(correction_cap) & loss_mask).sum().float()
            adv = adv * w
    if positive_weight is not None or top_entropy_quantile is not None or cov_control != "none" \
            or loss_type != "clip" or ratio_level != "token":
        per_token, ratio, kl, clipped = method_token_loss(
            logp, old, adv, loss_mask, entropy, stats, eps_low=eps_low, eps_high=eps_high, ref=ref, beta=beta,
            kl_estimator=kl_estimator, backend=backend, loss_type=loss_type, ratio_level=ratio_level,
            positive_weight=positive_weight, top_entropy_quantile=top_entropy_quantile, cov_control=cov_control,
            cov_ratio=cov_ratio, cov_bounds=cov_bounds, kl_cov_coef=kl_cov_coef, generator=cov_generator)
    else:
        per_token, ratio, kl, clipped = token_loss(logp, old, adv.contiguous(), loss_mask, eps_low, eps_high,
                                                   ref, beta, kl_estimator, backend)
    if entropy_coef != 0:  # the bonus, aggregated like the loss: its gradient flows through the kernel
        per_token = per_token - entropy_coef * torch.where(loss_mask, entropy, 0.0)
    loss = aggregate(per_token, loss_mask, aggregation, num_sequences, num_tokens, norm_length)
    stats.update(token_stats(loss_mask, ratio, kl, clipped))
    stats["entropy_sum"] = (entropy.detach() * mask).sum()
    stats["n_completion_tokens"] = mask.sum()
    return loss, stats


def check_methods(loss_type, ratio_level, cov_control, entropy_coef=0.0, positive_weight=None,
                  top_entropy_quantile=None):
    """The combinations policy_loss takes (MinirlError naming the flags otherwise)."""
    for flag, value, choices in (("--loss", loss_type, LOSSES), ("--ratio-level", ratio_level, RATIO_LEVELS),
                                 ("--cov-control", cov_control, COV_CONTROLS)):
        if value not in choices:
            raise MinirlError(f"{flag}: unknown value {value!r} (choose from {choices})")
    if loss_type == "cispo" and ratio_level != "token":
        raise MinirlError("--loss cispo and --ratio-level sequence do not combine (CISPO weights tokens)")
    if cov_control != "none" and (loss_type != "clip" or ratio_level != "token"):
        raise MinirlError(f"--cov-control {cov_control} needs --loss clip and --ratio-level token")
    if entropy_coef < 0 or (positive_weight is not None and positive_weight < 0):
        raise MinirlError(f"--entropy-coef ({entropy_coef}) and --positive-weight ({positive_weight}) must be >= 0")
    if top_entropy_quantile is not None and not 0.0 < top_entropy_quantile <= 1.0:
        raise MinirlError(f"--top-entropy-quantile {top_entropy_quantile} must lie in (0, 1]")


def method_token_loss(logp, old, adv, mask, entropy, stats, *, eps_low, eps_high, ref, beta, kl_estimator,
                      backend, loss_type, ratio_level, positive_weight, top_entropy_quantile, cov_control,
                      cov_ratio, cov_bounds, kl_cov_coef, generator):
    """token_loss's outputs with the methods of the module docstring on: the weights multiply
    A_t first (positive weight, top-entropy mask, Clip-Cov), then the per-token loss is the
    clipped one, KL-Cov's, GSPO's or CISPO's; the KL term is always token_loss's, on logp.
    Adds the count of tokens each selection kept or chose to stats (*_sum)."""
    seq_adv = adv  # [B, T] the covariance reads the advantage before any weight
    if positive_weight is not None:
        adv = adv * positive_weights(adv, positive_weight)
    if top_entropy_quantile is not None:
        keep = top_entropy_mask(entropy, mask, top_entropy_quantile)  # [B, T]
        stats["top_entropy_kept_sum"] = keep.sum().float()
        adv = adv * keep
    if cov_control == "clip-cov":
        chosen = clip_cov_select(logp, old, seq_adv, mask, eps_low, eps_high, cov_ratio, cov_bounds, generator)
        stats["cov_selected_sum"] = chosen.sum().float()
        adv = adv * ~chosen
    adv = adv.contiguous()
    if loss_type == "clip" and ratio_level == "token" and cov_control != "kl-cov":
        return token_loss(logp, old, adv, mask, eps_low, eps_high, ref, beta, kl_estimator, backend)
    # The KL term on logp alone (advantage 0), then the method's policy-gradient term.
    kl_part, ratio, kl, clipped = token_loss(logp, old, torch.zeros_like(adv), mask, eps_low, eps_high, ref, beta,
                                             kl_estimator, backend)
    if cov_control == "kl-cov":
        inf = float("inf")  # the unclipped surrogate -ratio A (Cui et al.), in plain PyTorch
        pg, _, _, clipped = token_loss(logp, old, adv, mask, inf, inf, None, 0.0, kl_estimator, "torch")
        chosen = kl_cov_select(logp, seq_adv, mask, cov_ratio)
        stats["cov_selected_sum"] = chosen.sum().float()
        pg = pg + kl_cov_coef * torch.where(chosen, (logp - old.detach()).abs(), 0.0)
    elif ratio_level == "sequence":
        log_s = gspo_log_ratio(logp, old, mask)  # [B, T]: token_loss's ratio exp(log_s - 0) is s_it
        pg, ratio, _, clipped = token_loss(log_s, torch.zeros_like(old), adv, mask, eps_low, eps_high, None, 0.0,
                                           kl_estimator, backend)
    else:
        pg, ratio, clipped = cispo_token_loss(logp, old, adv, mask, eps_low, eps_high)
    return torch.where(mask, pg + kl_part, 0.0), ratio, kl, clipped
