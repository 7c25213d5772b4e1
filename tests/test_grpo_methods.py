"""The capability / stability / length methods of minirl/grpo.py, each against an independent
recomputation (fp64, 1e-6 unless the model's fp32 forward is involved), the papers' worked
values where they give them, their gradients, and the edge cases (all-equal groups, K = N,
lambda = 0, an empty top-entropy set, a single-sample group)."""
import itertools

import numpy as np
import pytest
import torch

from minirl import grpo, load_model
from minirl.common import MinirlError

from conftest import rel_err


def binary_rewards(P, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(P, n, generator=g) < 0.5).double()


# ---------------------------------------------------------------- pass@k advantages

def passk_brute_force(row, k):
    """Chen et al.'s definition, by enumerating every K-subset: a subset's reward is its max;
    R is their mean; a sample's advantage is (mean reward of the subsets holding it - R) / sigma."""
    n = len(row)
    subsets = list(itertools.combinations(range(n), k))
    reward = {s: max(row[i] for i in s) for s in subsets}
    R = sum(reward.values()) / len(subsets)
    sigma = (R * (1 - R)) ** 0.5
    if sigma == 0:
        return [0.0] * n
    out = []
    for i in range(n):
        holding = [reward[s] for s in subsets if i in s]
        out.append((sum(holding) / len(holding) - R) / sigma)
    return out


@pytest.mark.parametrize("n,k", [(4, 1), (5, 2), (6, 3), (7, 4), (8, 8), (3, 3), (6, 5)])
def test_passk_matches_subset_enumeration(n, k):
    r = binary_rewards(9, n, seed=n * 10 + k)
    r[0] = 1.0  # all right
    r[1] = 0.0  # all wrong
    got = grpo.passk_advantages(r, k)
    want = torch.tensor([passk_brute_force(row.tolist(), k) for row in r], dtype=torch.float64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got[0].abs().max() == 0 and got[1].abs().max() == 0


def test_passk_with_k1_is_the_population_std_advantage():
    r = binary_rewards(20, 7, seed=1)
    r[3], r[7] = 1.0, 0.0
    mixed = (r.sum(1) > 0) & (r.sum(1) < 7)
    want = (r - r.mean(1, keepdim=True)) / r.std(1, unbiased=False, keepdim=True)
    got = grpo.passk_advantages(r, 1).double()
    torch.testing.assert_close(got[mixed], want[mixed], rtol=1e-6, atol=1e-6)
    assert got[~mixed].abs().max() == 0


def test_passk_k_equal_n_and_few_wrong_give_zero():
    # K = N: every group that holds a right sample has pass@N = 1, so sigma = 0.
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert grpo.passk_advantages(r, 4).abs().max() == 0
    # N_neg = 1 < K = 2: every pair holds a right sample.
    assert grpo.passk_advantages(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 2).abs().max() == 0
    # A worked value: N = 4, N_neg = 2, K = 2: R = 1 - 1/6 = 5/6, sigma = sqrt(5)/6,
    # A_pos = (1/6)/sigma = 1/sqrt(5), A_neg = (1/6 - 1/3)/sigma = -1/sqrt(5).
    got = grpo.passk_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), 2)
    torch.testing.assert_close(got, torch.tensor([[1, -1, 1, -1]]) / 5 ** 0.5, rtol=1e-6, atol=1e-7)


def test_passk_refuses_non_binary_rewards_and_bad_k():
    with pytest.raises(MinirlError, match="binary"):
        grpo.passk_advantages(torch.tensor([[1.0, -1.0]]), 1)
    with pytest.raises(MinirlError, match="pass-k"):
        grpo.passk_advantages(torch.tensor([[1.0, 0.0]]), 3)
    with pytest.raises(MinirlError, match="pass-k"):
        grpo.passk_advantages(torch.tensor([[1.0, 0.0]]), 0)


# ---------------------------------------------------------------- MaxRL, RLOO

def test_maxrl_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0] * 4, [1.0] * 4, [0.5, 2.0, 0.0, 1.5]], dtype=torch.float64)
    got = grpo.maxrl_advantages(r).double()
    # p = 1/4: the right sample gets (1 - 1/4) / (1/4) = 3, the wrong ones -1.
    torch.testing.assert_close(got[0], torch.tensor([3.0, -1, -1, -1], dtype=torch.float64))
    assert got[1].abs().max() == 0 and got[2].abs().max() == 0  # mean 0 -> 0; all right -> 0
    for row, want in zip(r[3:], got[3:]):
        m = sum(row.tolist()) / 4
        torch.testing.assert_close(want, torch.tensor([(x - m) / m for x in row.tolist()], dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(MinirlError, match="maxrl"):
        grpo.maxrl_advantages(torch.tensor([[1.0, -1.0]]))


def test_rloo_is_no_std_times_n_over_n_minus_1():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(6, 5, generator=g, dtype=torch.float64)
    n = r.shape[1]
    rloo = torch.stack([r[:, i] - (r.sum(1) - r[:, i]) / (n - 1) for i in range(n)], dim=1)
    torch.testing.assert_close(rloo, n / (n - 1) * grpo.group_advantages(r, "none").double(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- rewards: unlikeliness, overlong

def test_unlikeliness_rewards_rank_by_likelihood():
    g = torch.Generator().manual_seed(3)
    P, n, beta = 5, 6, 0.25
    correct = torch.rand(P, n, generator=g) < 0.6
    rewards = torch.where(correct, 1.0, -1.0).double()  # +1 / -1: wrong rewards must stay -1
    seq = torch.randn(P, n, generator=g, dtype=torch.float64)
    seq[0, 1] = seq[0, 4]  # a tie: the lower index ranks lower
    got = grpo.unlikeliness_rewards(rewards, seq, correct, beta)
    for p in range(P):
        order = sorted(range(n), key=lambda i: (seq[p, i].item(), i))  # least likely first
        for rank, i in enumerate(order):
            want = rewards[p, i].item() * (1 - beta * rank / n) if correct[p, i] else rewards[p, i].item()
            assert got[p, i].item() == pytest.approx(want, abs=1e-12)
    # The most likely correct sample gains least.
    p = 1
    idx = correct[p].nonzero().flatten()
    assert got[p, idx[seq[p, idx].argmax()]] == got[p, idx].min()
    # beta = 0 and a single-sample group change nothing.
    assert torch.equal(grpo.unlikeliness_rewards(rewards, seq, correct, 0.0), rewards)
    one = grpo.unlikeliness_rewards(torch.ones(3, 1), torch.randn(3, 1), torch.ones(3, 1, dtype=torch.bool), 0.9)
    assert torch.equal(one, torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(MinirlError, match="rank-penalty"):
        grpo.unlikeliness_rewards(rewards, seq, correct, 1.5)


def test_mean_logprobs():
    rows = [torch.tensor([-1.0, -2.0, -4.5]), torch.tensor([]), torch.tensor([-0.25])]
    torch.testing.assert_close(grpo.mean_logprobs(rows), torch.tensor([-7.5 / 3, 0.0, -0.25], dtype=torch.float64))


def test_overlong_penalty_dapo_values():
    # DAPO's setting: 20480 tokens at most, the last 4096 a soft punishment buffer.
    lengths = torch.tensor([0, 16384, 16385, 18432, 20479, 20480, 30000])
    got = grpo.overlong_penalty(lengths, 20480, 4096)
    want = torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -4095 / 4096, -1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert grpo.overlong_penalty(torch.tensor([3, 4]), 4, 4).tolist() == [-0.75, -1.0]
    for bad in (0, 5, 2.5):
        with pytest.raises(MinirlError, match="overlong-buffer"):
            grpo.overlong_penalty(lengths, 4, bad)


# ---------------------------------------------------------------- per-token pieces, fp64

def leaf_batch(B=4, T=7, seed=0, spread=0.3):
    """Random log-probs (a leaf), old log-probs, per-sequence advantages and a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logp, old, adv, mask


def test_top_entropy_mask_against_numpy_quantile():
    g = torch.Generator().manual_seed(4)
    ent = torch.rand(5, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 9, generator=g) < 0.7
    for rho in (0.2, 0.5, 0.83, 1.0):
        thr = np.quantile(ent[mask].numpy(), 1 - rho)  # linear interpolation
        want = mask & (ent >= torch.tensor(thr, dtype=torch.float64))
        got = grpo.top_entropy_mask(ent, mask, rho)
        assert torch.equal(got, want)
        assert int(got.sum()) >= int(np.ceil(rho * int(mask.sum()))) - 1
    assert torch.equal(grpo.top_entropy_mask(ent, mask, 1.0), mask)
    # Ties at the threshold are all kept; no loss token -> nothing kept.
    assert torch.equal(grpo.top_entropy_mask(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.1),
                       torch.ones(2, 3, dtype=torch.bool))
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert not grpo.top_entropy_mask(ent[:2, :3], empty, 0.2).any()
    with pytest.raises(MinirlError, match="top-entropy-quantile"):
        grpo.top_entropy_mask(ent, mask, 0.0)


def test_cov_scores_and_kl_cov_selection():
    logp, old, adv, mask = leaf_batch(seed=5)
    lp, a = logp.detach()[mask].numpy(), adv[mask].numpy()
    cov = (lp - lp.mean()) * (a - a.mean())
    got = grpo.cov_scores(logp, adv, mask)
    np.testing.assert_allclose(got[mask].numpy(), cov, rtol=1e-6, atol=1e-6)
    assert got[~mask].abs().max() == 0
    for ratio, count in ((2e-4, 1), (0.25, int(0.25 * mask.sum())), (1.0, int(mask.sum()))):
        chosen = grpo.kl_cov_select(logp, adv, mask, ratio)
        assert int(chosen.sum()) == count and not (chosen & ~mask).any()
        assert set(np.flatnonzero(chosen[mask].numpy())) == set(np.argsort(-cov, kind="stable")[:count])
    assert not grpo.kl_cov_select(logp, adv, torch.zeros_like(mask), 0.5).any()


def test_clip_cov_selection_draws_among_the_candidates():
    logp, old, adv, mask = leaf_batch(B=6, T=9, seed=6, spread=0.5)
    adv = adv * 8  # covariances of a few units: some fall in (1, 5)
    eps_low, eps_high, bounds = 0.2, 0.28, (1.0, 5.0)
    cov = grpo.cov_scores(logp, adv, mask)
    r = torch.exp(logp.detach() - old)
    ppo_clipped = ((adv < 0) & (r < 1 - eps_low)) | ((adv > 0) & (r > 1 + eps_high))
    cand = mask & ~ppo_clipped & (cov > bounds[0]) & (cov < bounds[1])
    assert 3 <= int(cand.sum()) < int(mask.sum())
    for ratio in (2e-4, 0.1, 1.0):
        count = min(max(1, int(ratio * int(mask.sum()))), int(cand.sum()))
        a = grpo.clip_cov_select(logp, old, adv, mask, eps_low, eps_high, ratio, bounds,
                                 torch.Generator().manual_seed(7))
        b = grpo.clip_cov_select(logp, old, adv, mask, eps_low, eps_high, ratio, bounds,
                                 torch.Generator().manual_seed(7))
        assert torch.equal(a, b) and int(a.sum()) == count and not (a & ~cand).any()
        # The draw: torch.randperm over the candidates in row-major order.
        idx = torch.nonzero(cand.flatten()).flatten()
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(7))[:count]
        assert set(idx[perm].tolist()) == set(torch.nonzero(a.flatten()).flatten().tolist())


def kwargs(**over):
    base = dict(eps_low=0.2, eps_high=0.28, ref=None, beta=0.0, kl_estimator="k3", backend="torch",
                loss_type="clip", ratio_level="token", positive_weight=None, top_entropy_quantile=None,
                cov_control="none", cov_ratio=2e-4, cov_bounds=(1.0, 5.0), kl_cov_coef=1.0, generator=None)
    base.update(over)
    return base


def test_gspo_token_form_has_the_sequence_objective_gradient():
    logp, old, adv, mask = leaf_batch(B=6, T=8, seed=10, spread=0.15)
    eps_low, eps_high = 0.03, 0.04  # some sequences clip, some do not
    ent = torch.zeros_like(old)
    per_token, ratio, _, clipped = grpo.method_token_loss(logp, old, adv, mask, ent, {},
                                                          **kwargs(ratio_level="sequence", eps_low=eps_low,
                                                                   eps_high=eps_high))
    G = mask.shape[0]
    loss = grpo.aggregate(per_token, mask, "seq-mean-token-mean", G, int(mask.sum()))
    (got,) = torch.autograd.grad(loss, logp)
    # Independently: s_i = exp(mean_t(logp - old)), J = (1/G) sum_i -min(s_i A_i, clip(s_i) A_i).
    lp = logp.detach().clone().requires_grad_()
    s = torch.exp(((lp - old) * mask).sum(1) / mask.sum(1))  # [B]
    A = adv[:, 0]
    J = -torch.minimum(s * A, s.clamp(1 - eps_low, 1 + eps_high) * A).sum() / G
    (want,) = torch.autograd.grad(J, lp)
    torch.testing.assert_close(loss, J, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    out_of_range = ((s < 1 - eps_low) & (A < 0)) | ((s > 1 + eps_high) & (A > 0))
    assert 0 < int(out_of_range.sum()) < G  # both cases are exercised
    torch.testing.assert_close(ratio[mask], s[:, None].expand_as(mask)[mask].detach())
    assert torch.equal(clipped.bool().any(1), out_of_range)


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    logp, old, adv, mask = leaf_batch(B=5, T=6, seed=9, spread=0.4)
    eps_low, eps_high = 0.2, 0.28
    per_token, ratio, _, clipped = grpo.method_token_loss(logp, old, adv, mask, torch.zeros_like(old), {},
                                                          **kwargs(loss_type="cispo"))
    n = int(mask.sum())
    (got,) = torch.autograd.grad(grpo.aggregate(per_token, mask, "token-mean", 5, n), logp)
    r = torch.exp(logp.detach() - old)
    w = r.clamp(1 - eps_low, 1 + eps_high)
    torch.testing.assert_close(got, torch.where(mask, -w * adv / n, 0.0), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(per_token, torch.where(mask, -w * adv * logp.detach(), 0.0), rtol=1e-6, atol=1e-12)
    out = mask & ((r < 1 - eps_low) | (r > 1 + eps_high))
    assert out.any() and (got[out] != 0).all()  # PPO's clip would zero some of these
    assert torch.equal(clipped != 0, out)
    # eps_low >= 1: no lower bound on the weight.
    per_token, *_ = grpo.method_token_loss(logp, old, adv, mask, torch.zeros_like(old), {},
                                           **kwargs(loss_type="cispo", eps_low=5.0))
    (g2,) = torch.autograd.grad(per_token.sum(), logp)
    torch.testing.assert_close(g2, torch.where(mask, -r.clamp(max=1 + eps_high) * adv, 0.0), rtol=1e-6, atol=1e-12)


def test_kl_cov_loss_and_gradient():
    logp, old, adv, mask = leaf_batch(B=5, T=8, seed=10, spread=0.3)
    g = torch.Generator().manual_seed(1)
    ref = logp.detach() + 0.1 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    coef, ratio_k, beta = 0.7, 0.2, 0.05
    stats = {}
    per_token, *_ = grpo.method_token_loss(logp, old, adv, mask, torch.zeros_like(old), stats,
                                           **kwargs(cov_control="kl-cov", kl_cov_coef=coef, cov_ratio=ratio_k,
                                                    ref=ref, beta=beta))
    (got,) = torch.autograd.grad(per_token.sum(), logp)
    lp = logp.detach().clone().requires_grad_()
    lp_m, a = lp.detach()[mask], adv[mask]
    cov = torch.zeros_like(old)
    cov[mask] = (lp_m - lp_m.mean()) * (a - a.mean())
    k = int(ratio_k * int(mask.sum()))
    top = torch.zeros(mask.numel(), dtype=torch.bool)
    top[torch.where(mask, cov, -torch.inf).flatten().argsort(descending=True)[:k]] = True
    top = top.view(mask.shape)
    log_ref = ref - lp
    want = -torch.exp(lp - old) * adv + coef * top * (lp - old).abs() + beta * (log_ref.exp() - log_ref - 1)
    want = torch.where(mask, want, 0.0)
    (want_g,) = torch.autograd.grad(want.sum(), lp)
    torch.testing.assert_close(per_token, want.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got, want_g, rtol=1e-6, atol=1e-12)
    assert stats["cov_selected_sum"].item() == k


def test_positive_weight_zero_is_negative_samples_only():
    logp, old, adv, mask = leaf_batch(B=6, T=5, seed=11, spread=0.02)  # nothing clips
    assert (adv[:, 0] > 0).any() and (adv[:, 0] < 0).any()
    for lam in (0.0, 0.1):
        per_token, *_ = grpo.method_token_loss(logp, old, adv, mask, torch.zeros_like(old), {},
                                               **kwargs(positive_weight=lam))
        plain, *_ = grpo.token_loss(logp, old, torch.where(adv > 0, lam * adv, adv), mask, 0.2, 0.28)
        torch.testing.assert_close(per_token, plain, rtol=0, atol=0)
        if lam == 0.0:
            (g,) = torch.autograd.grad(per_token.sum(), logp)
            assert g[adv[:, 0] > 0].abs().max() == 0 and g[(adv < 0) & mask].abs().min() > 0
    assert torch.equal(grpo.positive_weights(torch.tensor([1.0, -1.0, 0.0]), 0.1), torch.tensor([0.1, 1.0, 1.0]))


def test_clip_cov_removes_only_the_chosen_tokens_terms():
    logp, old, adv, mask = leaf_batch(B=6, T=9, seed=6, spread=0.5)
    adv = adv * 8
    stats = {}
    per_token, *_ = grpo.method_token_loss(logp, old, adv, mask, torch.zeros_like(old), stats,
                                           **kwargs(cov_control="clip-cov", cov_ratio=0.1,
                                                    generator=torch.Generator().manual_seed(7)))
    chosen = grpo.clip_cov_select(logp, old, adv, mask, 0.2, 0.28, 0.1, (1.0, 5.0), torch.Generator().manual_seed(7))
    assert chosen.any() and stats["cov_selected_sum"].item() == chosen.sum().item()
    plain, *_ = grpo.token_loss(logp, old, adv, mask, 0.2, 0.28)
    (g,) = torch.autograd.grad(per_token.sum(), logp)
    assert per_token[chosen].abs().max() == 0 and g[chosen].abs().max() == 0
    torch.testing.assert_close(per_token[~chosen], plain[~chosen], rtol=0, atol=0)


def test_reset_reference(tiny_model_dir):
    policy = load_model(tiny_model_dir, device="cpu")
    ref = load_model(tiny_model_dir, device="cpu")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    assert not all(torch.equal(a, b) for a, b in zip(policy.parameters(), ref.parameters()))
    grpo.reset_reference(ref, policy)
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), ref.parameters()))
    assert all(not a.data_ptr() == b.data_ptr() for a, b in zip(policy.parameters(), ref.parameters()))


# ---------------------------------------------------------------- through policy_loss, on the tiny model

def make_samples(seed, advs=(0.7, -1.2, 0.4, -0.3)):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for adv in advs:
        p, c = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(2, 8, (1,), generator=g))
        samples.append(grpo.Sample(torch.randint(3, 40, (p,), generator=g).tolist(),
                                   torch.randint(3, 40, (c,), generator=g).tolist(), adv))
    return samples


def call(model, samples, agg="token-mean", **methods):
    n_tok = sum(len(s.completion_ids) for s in samples)
    return grpo.policy_loss(model, samples, pad_id=0, temperature=0.7, eps_low=0.2, eps_high=0.28, beta=0.0,
                            kl_estimator="k3", aggregation=agg, num_sequences=len(samples), num_tokens=n_tok,
                            norm_length=10, on_policy=True, **methods)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def full_logits_terms(model, samples, temperature=0.7):
    """Per-sample completion log-probs and entropies from the full logits (fp64 softmax),
    written without completion_logprobs or the kernels."""
    out = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        logits = model(ids)[0].double() / temperature  # [T, V]
        p = len(s.prompt_ids)
        lsm = torch.log_softmax(logits[p - 1:p - 1 + len(s.completion_ids)], -1)  # [c, V]
        lp = lsm.gather(-1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        out.append((lp, -(lsm.exp() * lsm).sum(-1)))
    return out


def test_defaults_are_the_plain_objective_bitwise(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu").train()
    samples = make_samples(12)
    for agg in grpo.AGGREGATIONS:
        loss, st = call(model, samples, agg)
        got = grads(model, loss)
        # Today's objective from its building blocks.
        logp, mask, ent = grpo.completion_logprobs(model, samples, 0, 0.7, True, None)
        adv = torch.tensor([s.advantage for s in samples])[:, None].expand(mask.shape)
        per_token, *_ = grpo.token_loss(logp, logp.detach(), adv.contiguous(), mask, 0.2, 0.28, None, 0.0, "k3")
        n_tok = sum(len(s.completion_ids) for s in samples)
        want_loss = grpo.aggregate(per_token, mask, agg, len(samples), n_tok, 10)
        want = grads(model, want_loss)
        assert torch.equal(loss, want_loss) and all(torch.equal(a, b) for a, b in zip(got, want))
        assert set(st) == {"clip_low_frac", "clip_high_frac", "clip_frac", "ratio_mean", "ratio_min", "ratio_max",
                           "kl_mean", "n_tokens", "entropy_sum", "n_completion_tokens"}


def test_entropy_bonus_gradient_matches_full_logits(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu").train()
    samples = make_samples(13)
    C = 0.3
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, _ = call(model, samples, agg, entropy_coef=C)
        got = grads(model, loss)
        terms = full_logits_terms(model, samples)
        n_tok = sum(len(s.completion_ids) for s in samples)
        per_seq = [-(s.advantage * torch.exp(lp - lp.detach())) - C * h for s, (lp, h) in zip(samples, terms)]
        if agg == "token-mean":
            want_loss = sum(x.sum() for x in per_seq) / n_tok
        else:
            want_loss = sum(x.mean() for x in per_seq) / len(samples)
        want = grads(model, want_loss)
        assert rel_err(loss, want_loss) < 1e-5
        assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-4
    # Without the bonus the entropy has no gradient path.
    without = grads(model, call(model, samples, "token-mean")[0])
    assert max(rel_err(a, b) for a, b in zip(without, got)) > 1e-3


def test_top_entropy_quantile_through_policy_loss(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu").train()
    samples = make_samples(14)
    rho = 0.3
    loss, st = call(model, samples, "token-mean", top_entropy_quantile=rho)
    got = grads(model, loss)
    terms = full_logits_terms(model, samples)
    ent = torch.cat([h for _, h in terms]).detach()
    thr = np.quantile(ent.numpy(), 1 - rho)
    n_tok = len(ent)
    want_loss = sum((-(s.advantage * torch.exp(lp - lp.detach())) * (h.detach() >= thr)).sum()
                    for s, (lp, h) in zip(samples, terms)) / n_tok
    want = grads(model, want_loss)
    assert st["top_entropy_kept_sum"].item() == int((ent >= thr).sum())
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-4


@pytest.mark.parametrize("methods", [dict(positive_weight=0.1), dict(entropy_coef=0.2), dict(loss_type="cispo"),
                                     dict(ratio_level="sequence")])
def test_per_sample_methods_split_into_micro_batches(tiny_model_dir, methods):
    """Methods without batch statistics give the same gradient over micro-batches (global
    denominators) as in one call."""
    model = load_model(tiny_model_dir, device="cpu").train()
    samples = make_samples(15, advs=(0.9, -0.4, 0.2, -1.1, 0.5))
    agg = "seq-mean-token-mean"
    n_tok = sum(len(s.completion_ids) for s in samples)
    whole = grads(model, call(model, samples, agg, **methods)[0])
    model.zero_grad()
    for part in (samples[:2], samples[2:]):
        loss, _ = grpo.policy_loss(model, part, pad_id=0, temperature=0.7, eps_low=0.2, eps_high=0.28, beta=0.0,
                                   kl_estimator="k3", aggregation=agg, num_sequences=len(samples), num_tokens=n_tok,
                                   norm_length=10, on_policy=True, **methods)
        loss.backward()
    split = [p.grad.clone() for p in model.parameters()]
    assert max(rel_err(a, b) for a, b in zip(split, whole)) < 1e-5


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="ppo"), "--loss"), (dict(ratio_level="seq"), "--ratio-level"),
    (dict(cov_control="cov"), "--cov-control"), (dict(loss_type="cispo", ratio_level="sequence"), "do not combine"),
    (dict(cov_control="kl-cov", loss_type="cispo"), "needs --loss clip"),
    (dict(cov_control="clip-cov", ratio_level="sequence"), "needs --loss clip"),
    (dict(entropy_coef=-0.1), "entropy-coef"), (dict(positive_weight=-1.0), "positive-weight"),
    (dict(top_entropy_quantile=1.5), "top-entropy-quantile")])
def test_refused_combinations(bad, match):
    with pytest.raises(MinirlError, match=match):
        grpo.policy_loss(None, [], pad_id=0, temperature=1.0, eps_low=0.2, eps_high=0.2, beta=0.0,
                         kl_estimator="k3", aggregation="token-mean", num_sequences=1, num_tokens=1,
                         norm_length=None, on_policy=True, **bad)


@pytest.mark.parametrize("methods", [dict(entropy_coef=0.2), dict(ratio_level="sequence", eps_low=0.01, eps_high=0.01)])
def test_triton_backend_matches_torch(tiny_model_dir, methods):
    """The entropy bonus's gradient through the Triton log-prob kernel, and GSPO's ratio
    through the Triton loss kernel (interpreted on CPU), equal the PyTorch path."""
    model = load_model(tiny_model_dir, device="cpu").train()
    g = torch.Generator().manual_seed(16)
    samples = make_samples(16)
    for s in samples:  # off-policy, so the sequence ratios differ from 1 and some clip
        s.old_logprobs = -torch.rand(len(s.completion_ids), generator=g) * 3
    methods = dict(methods)
    eps = dict(eps_low=methods.pop("eps_low", 0.2), eps_high=methods.pop("eps_high", 0.28))
    out = {}
    for backend in ("torch", "triton"):
        loss, st = grpo.policy_loss(model, samples, pad_id=0, temperature=0.7, beta=0.0, kl_estimator="k3",
                                    aggregation="seq-mean-token-mean", num_sequences=4, num_tokens=20,
                                    norm_length=10, on_policy=False, backend=backend, **eps, **methods)
        out[backend] = (loss, grads(model, loss), st["clip_frac"])
    assert rel_err(out["triton"][0], out["torch"][0]) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(out["triton"][1], out["torch"][1])) < 1e-4
    assert out["triton"][2] == out["torch"][2]
    assert "ratio_level" not in methods or 0 < out["torch"][2] < 1  # GSPO: some sequences clip
