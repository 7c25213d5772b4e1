"""The GRPO family: group advantages, per-token policy loss aggregation, and the log-probs
of completions under the policy — exactly these variants:

Advantages (rewards r [P, n], one group of n samples per prompt):
    std_mode="group":  A = (r - mean_group(r)) / (std_group(r) + eps)      GRPO (DeepSeekMath)
    std_mode="batch":  A = (r - mean_group(r)) / (std_batch(r) + eps)      (REINFORCE++-style)
    std_mode="none":   A =  r - mean_group(r)                              Dr. GRPO
    std is the unbiased (n - 1) standard deviation, as in TRL.

Per-token loss (minirl.losses.grpo_token_loss): with ratio = exp(logp - old_logp),
    l_t = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta * KL_t(k1 | k2 | k3)

Aggregation over the tokens t of sequences i (|o_i| = completion length, G = #sequences):
    "seq-mean-token-mean":  (1/G) sum_i (1/|o_i|) sum_t l_it      GRPO
    "token-mean":           (1 / sum_i |o_i|) sum_i sum_t l_it    DAPO
    "seq-mean-token-sum-norm": (1/(G L)) sum_i sum_t l_it         Dr. GRPO, L = a constant
                                                                  (max completion length)
The denominators G, sum |o_i| are those of the whole optimisation (mini-)batch, so splitting
it into micro-batches for memory (gradient accumulation) gives the same gradient.
"""
from dataclasses import dataclass

import torch

from minirl.common import MinirlError
from minirl.losses import grpo_token_loss, linear_logprobs

STD_MODES = ("group", "batch", "none")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


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
    old_logprobs: torch.Tensor = None  # [len(completion_ids)] from the rollout policy
    ref_logprobs: torch.Tensor = None


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
    out = linear_logprobs(h, model.lm_head_weight, targets[mask], return_entropy=return_entropy,
                          backend=backend)
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
                aggregation, num_sequences, num_tokens, norm_length, on_policy, backend=None):
    """The micro-batch's share of the loss (call .backward() on it) and its statistics.
    on_policy: old log-probs are the current ones, detached, so the ratio is exactly 1."""
    logp, mask, entropy = completion_logprobs(model, samples, pad_id, temperature, True, backend)
    device, width = logp.device, logp.shape[1]
    old = logp.detach() if on_policy else pad_rows([s.old_logprobs for s in samples], width, device)
    ref = pad_rows([s.ref_logprobs for s in samples], width, device) if beta > 0 else None
    loss_mask = mask & torch.tensor([s.loss_mask for s in samples], device=device)[:, None]
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device)
    per_token, stats = grpo_token_loss(logp, old, adv, loss_mask, eps_low, eps_high, ref_logp=ref,
                                       beta=beta, kl_estimator=kl_estimator, backend=backend)
    loss = aggregate(per_token, loss_mask, aggregation, num_sequences, num_tokens, norm_length)
    stats["entropy_sum"] = (entropy * mask).sum()
    stats["n_completion_tokens"] = mask.sum()
    return loss, stats
