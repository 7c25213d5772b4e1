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
                        backend=None):
    """Log-probs [B, Tc] (0 at padding) of each sample's completion tokens under `model`, with
    logits divided by `temperature` (the distribution the sampler drew from, as TRL does).
    Only the completion positions' hidden states reach the lm_head, through the fused
    kernel: no [B, T, V] logits are ever made."""
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
        ent = torch.zeros_like(logp).masked_scatter(mask, out[1].detach())
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
                rollout_correction="none", correction_cap=2.0, backend=None):
    """The micro-batch's share of the loss (call .backward() on it) and its statistics.
    on_policy: old log-probs are the current ones, detached, so the ratio is exactly 1.
    With sampler log-probs on the samples, the statistics include the sampler/trainer
    mismatch (mismatch_stats) and, with a rollout correction, its weights."""
    logp, mask, entropy = completion_logprobs(model, samples, pad_id, temperature, True, backend)  # [B, Tc]
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
    per_token, ratio, kl, clipped = token_loss(logp, old, adv.contiguous(), loss_mask, eps_low, eps_high,
                                               ref, beta, kl_estimator, backend)
    loss = aggregate(per_token, loss_mask, aggregation, num_sequences, num_tokens, norm_length)
    stats.update(token_stats(loss_mask, ratio, kl, clipped))
    stats["entropy_sum"] = (entropy * mask).sum()
    stats["n_completion_tokens"] = mask.sum()
    return loss, stats
