"""The sampler: cached greedy decoding against full recomputation and against transformers,
the sampling distribution against its definition (chi-square), seeds, bans, stops, waves,
log-probs, and the errors a caller can cause."""
import itertools
import math

import numpy as np
import pytest
import torch

from minirl import MinirlError, load_model, load_tokenizer
from minirl import sampler as sampler_mod
from minirl.sampler import Completion, generate, sample_next, sampling_logprobs

transformers = pytest.importorskip("transformers")

VOCAB = 211
# Each chi-square test below fails by chance with probability P_FAIL when the sampler is right
# (the seeds are fixed, so a given run is deterministic; this is the rate over seeds).
P_FAIL = 1e-4


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): scipy if installed, else Wilson-Hilferty."""
    try:
        from scipy.stats import chi2
        return float(chi2.sf(stat, df))
    except ImportError:
        z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
        return 0.5 * math.erfc(z / math.sqrt(2))


def assert_matches(counts: np.ndarray, probs: np.ndarray):
    """Counts over categories against expected probabilities: zero where the probability is
    zero, and a chi-square p-value above P_FAIL on the others."""
    total = counts.sum()
    zero = probs == 0
    assert counts[zero].sum() == 0, f"sampled excluded tokens {np.nonzero(zero & (counts > 0))[0]}"
    exp = probs[~zero] * total
    stat = float(((counts[~zero] - exp) ** 2 / exp).sum())
    df = int((~zero).sum()) - 1
    if df == 0:
        return
    p = chi2_sf(stat, df)
    assert p > P_FAIL, f"chi-square {stat:.1f} with {df} dof: p = {p:.2e}"


def expected_probs(logits, temperature, top_k=0, top_p=1.0, banned=()):
    """The sampling distribution computed independently, in float64 numpy."""
    x = np.asarray(logits, dtype=np.float64).copy()
    x[list(banned)] = -np.inf
    x = x / temperature
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        keep = order[before < top_p]
        p_min = p[keep].min()
        p = np.where(p >= p_min, p, 0.0)
        p /= p.sum()
    return p


# ----------------------------------------------------------------------------- a tiny model

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: one thread avoids paying an idle-thread wake-up per op, which
    dominates on a loaded 2-core machine. Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Qwen2-family model (q/k/v biases) with weight matrices scaled up, so that its
    next-token distributions are peaked and greedy outputs vary from step to step."""
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if p.dim() == 2:
                p.mul_(8.0)
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return load_model(path, device="cpu", dtype=torch.float32)


def make_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (L,), generator=g).tolist() for L in lengths]


def naive_greedy(model, prompt, steps):
    """Full recomputation at every step: the slow definition of greedy decoding."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def truncate_at_stop(tokens, stop):
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1], "stop"
    return tokens, "length"


# ----------------------------------------------------------------------------- greedy

def test_greedy_with_cache_equals_full_recompute(tiny, monkeypatch):
    prompts = make_prompts([5, 11, 1, 8, 3])
    T = 24
    refs = [naive_greedy(tiny, p, T) for p in prompts]
    # Stop tokens taken from the reference outputs, so rows end at different steps.
    stop = {refs[0][2], refs[2][9], refs[3][15]}
    expected = [truncate_at_stop(r, stop) for r in refs]
    assert len({len(e[0]) for e in expected}) >= 3 and any(e[1] == "length" for e in expected)

    moves = []
    real_compact = sampler_mod._compact
    monkeypatch.setattr(sampler_mod, "_compact", lambda rows, m: (moves.append(m), real_compact(rows, m)))
    out = generate(tiny, prompts, n=3, max_new_tokens=T, temperature=0, stop_token_ids=sorted(stop),
                   return_logprobs=True)
    assert moves, "finished rows were never compacted away"
    assert len(out) == len(prompts) and all(len(cs) == 3 for cs in out)
    for cs, (toks, reason) in zip(out, expected):
        for c in cs:
            assert isinstance(c, Completion)
            assert c.token_ids == toks and c.finish_reason == reason
            assert len(c.logprobs) == len(toks)
    # Without stops every row runs to the length.
    out = generate(tiny, prompts, max_new_tokens=T, temperature=0)
    assert [cs[0].token_ids for cs in out] == refs
    assert all(cs[0].finish_reason == "length" for cs in out)


def test_memory_budget_splits_into_waves_with_the_same_result(tiny, monkeypatch):
    prompts = make_prompts([7, 2, 12, 5, 9, 1], seed=1)
    waves = []
    real_run = sampler_mod._run_wave
    monkeypatch.setattr(sampler_mod, "_run_wave", lambda *a, **k: (waves.append(len(a[2])), real_run(*a, **k))[1])
    kw = dict(n=2, max_new_tokens=16, stop_token_ids=[5, 17])
    one = generate(tiny, prompts, temperature=0, **kw)
    assert waves == [12]
    waves.clear()
    # Three rows of (12 + 16) columns per wave at most: several waves, a group split over two.
    many = generate(tiny, prompts, temperature=0, max_batch_tokens=3 * 28, **kw)
    assert len(waves) >= 4 and sum(waves) == 12
    assert [[c.token_ids for c in cs] for cs in many] == [[c.token_ids for c in cs] for cs in one]
    # Sampling too: each row's random stream is its own, so waves do not change the draws
    # (only float rounding of batch-shape-dependent matmuls could, with negligible odds).
    a = generate(tiny, prompts, temperature=1.0, top_k=40, seed=3, return_logprobs=True, **kw)
    b = generate(tiny, prompts, temperature=1.0, top_k=40, seed=3, return_logprobs=True,
                 max_batch_tokens=3 * 28, **kw)
    assert [[c.token_ids for c in cs] for cs in a] == [[c.token_ids for c in cs] for cs in b]
    for ca, cb in zip(sum(a, []), sum(b, [])):
        np.testing.assert_allclose(ca.logprobs, cb.logprobs, rtol=0, atol=1e-4)


def test_static_cuda_graph_bookkeeping_gives_the_same_result(tiny, monkeypatch):
    """The CUDA path (batch padded to power-of-two buckets with stale rows, cache width padded
    to GRAPH_WIDTH_STEP, stops read every CUDA_SYNC_EVERY steps, whole-vocabulary sampling)
    run eagerly on CPU with static_shapes=True: the same completions as the plain eager path.
    Only the graph capture itself needs a GPU."""
    prompts = make_prompts([5, 11, 1, 8, 3], seed=2)
    T = 40
    refs = [naive_greedy(tiny, p, T) for p in prompts]
    stop = sorted({refs[0][1], refs[1][2], refs[2][3]} - set(refs[3]) - set(refs[4]))
    kw = dict(n=3, max_new_tokens=T, stop_token_ids=stop, return_logprobs=True)
    runs = []
    for sample in (dict(temperature=0), dict(temperature=1.0, top_k=40, seed=1)):
        eager = generate(tiny, prompts, **sample, **kw)
        calls = []
        real_step = sampler_mod._decode_step
        monkeypatch.setattr(sampler_mod, "_decode_step",
                            lambda model, rows, B, width, *a: (calls.append((B, width)),
                                                               real_step(model, rows, B, width, *a))[1])
        static = generate(tiny, prompts, static_shapes=True, **sample, **kw)
        monkeypatch.undo()
        assert ids_of(static) == ids_of(eager)
        for a, b in zip(sum(static, []), sum(eager, [])):
            assert a.finish_reason == b.finish_reason
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-4)
        assert {w for _, w in calls} <= {128, 11 + T}  # width: a multiple of 128, or the whole cache
        runs.append(sorted({r for r, _ in calls}))
    assert runs[0][0] < 15 and runs[0][-1] == 15  # the batch shrank to a smaller bucket
    assert [c.token_ids for c in eager[0]] != [refs[0]] * 3  # sampling, not greedy


# ----------------------------------------------------------------------------- real weights

def test_greedy_equals_transformers_on_smollm2(smollm2_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # compare every token, even past an end of turn
    mine = load_model(smollm2_dir, device="cpu", dtype=torch.float32)
    tok = load_tokenizer(smollm2_dir)
    questions = ["What is 17 * 23?", "Write a haiku about the sea.", "The capital of France is",
                 "List three prime numbers greater than 100 and explain briefly why each is prime."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: left padding used
    T = 16
    out = generate(mine, prompts, max_new_tokens=T, temperature=0)
    for p, cs in zip(prompts, out):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        assert cs[0].token_ids == ref[0, len(p):].tolist()


# ----------------------------------------------------------------------------- the distribution

FIXED_LOGITS = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -0.2, -0.5, -1.0, -1.1, -2.0, -3.0, 0.9])
DIST_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.7, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.8, top_k=7, top_p=0.75),
    dict(temperature=1.2, top_p=0.95, banned=(0, 11)),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=0.05),  # only the top token
]


@pytest.mark.parametrize("sync_free", [False, True], ids=["candidates", "whole-vocab"])
@pytest.mark.parametrize("case", DIST_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sample_next_matches_the_distribution(case, sync_free):
    case = dict(case)
    banned = case.pop("banned", ())
    V, N = FIXED_LOGITS.numel(), 40_000
    mask = torch.zeros(V, dtype=torch.bool)
    mask[list(banned)] = True
    expect = expected_probs(FIXED_LOGITS.numpy(), banned=banned, **case)
    g = torch.Generator().manual_seed(123)
    u = torch.rand(N, generator=g, dtype=torch.float64)
    tokens, logp = sample_next(FIXED_LOGITS.expand(N, V).clone(), u, banned_mask=mask if banned else None,
                               sync_free=sync_free, **case)
    counts = np.bincount(tokens.numpy(), minlength=V)
    assert_matches(counts, expect)
    np.testing.assert_allclose(logp.numpy(), np.log(expect[tokens.numpy()]), rtol=0, atol=1e-5)
    # The full processed distribution is the same one.
    lp = sampling_logprobs(FIXED_LOGITS[None], banned_mask=mask if banned else None, **case)[0]
    np.testing.assert_allclose(lp.exp().numpy(), expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", [dict(temperature=0.9, top_k=40), dict(temperature=1.1, top_p=0.7),
                                  dict(temperature=0.7, top_k=100, top_p=0.9)])
def test_candidate_and_whole_vocabulary_sampling_pick_the_same_tokens(case):
    """The fast CPU path (top-k candidates) and the graph-friendly one (whole vocabulary) read
    the same inverse CDF, in vocabulary order: same uniforms, same tokens."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 5000, generator=g) * 2.5  # [B, V]
    u = torch.rand(64, generator=g, dtype=torch.float64)
    a, la = sample_next(logits, u, **case)
    b, lb = sample_next(logits, u, sync_free=True, **case)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)


def test_top_k_and_top_p_keep_ties_at_the_boundary():
    x = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    lp = sampling_logprobs(x, 1.0, top_k=2)
    assert torch.isfinite(lp[0, :4]).all() and lp[0, 4] == -math.inf
    lp = sampling_logprobs(torch.tensor([[1.0, 1.0, 1.0, -5.0]]), 1.0, top_p=0.3)
    assert torch.isfinite(lp[0, :3]).all() and lp[0, 3] == -math.inf
    # With ties the candidate path falls back to the whole vocabulary: the tied tokens appear.
    u = torch.rand(3000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, _ = sample_next(x.expand(3000, 5), u, 1.0, top_k=2)
    assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_generate_distribution_end_to_end(tiny):
    """The first sampled token of many samples of one prompt, against the model's own
    next-token distribution processed by temperature, top-k and top-p."""
    prompt = make_prompts([6], seed=4)[0]
    kw = dict(temperature=0.8, top_k=12, top_p=0.9)
    out = generate(tiny, [prompt], n=6000, max_new_tokens=1, seed=11, **kw)
    with torch.no_grad():
        logits = tiny(torch.tensor([prompt]))[0, -1].double().numpy()
    counts = np.bincount([c.token_ids[0] for c in out[0]], minlength=VOCAB)
    assert_matches(counts, expected_probs(logits, **kw))


def test_logprobs_match_a_full_forward(tiny):
    prompts = make_prompts([4, 9, 2], seed=5)
    banned = [3, 4, 5]
    for kw in (dict(temperature=0.7, top_k=30, top_p=0.9), dict(temperature=1.0), dict(temperature=0.0)):
        out = generate(tiny, prompts, n=2, max_new_tokens=12, seed=2, return_logprobs=True,
                       banned_token_ids=banned, **kw)
        mask = torch.zeros(VOCAB, dtype=torch.bool)
        mask[banned] = True
        for p, cs in zip(prompts, out):
            for c in cs:
                ids = torch.tensor([p + c.token_ids])
                with torch.no_grad():
                    logits = tiny(ids)[0, len(p) - 1:-1]  # [T, V] the logits each token was drawn from
                lp = sampling_logprobs(logits, banned_mask=mask, **kw)
                ref = lp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
                np.testing.assert_allclose(c.logprobs, ref.numpy(), rtol=0, atol=1e-4)
                if kw["temperature"] == 0:  # greedy: log-softmax of the raw logits (bans removed)
                    raw = logits.masked_fill(mask, -math.inf).log_softmax(-1).max(-1).values
                    np.testing.assert_allclose(c.logprobs, raw.numpy(), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- seeds, bans, stops

def ids_of(out):
    return [[c.token_ids for c in cs] for cs in out]


def test_same_seed_same_output_and_different_seeds_differ(tiny):
    prompts = make_prompts([3, 8], seed=6)
    kw = dict(n=4, max_new_tokens=10, temperature=1.0, return_logprobs=True)
    a = generate(tiny, prompts, seed=7, **kw)
    b = generate(tiny, prompts, seed=7, **kw)
    assert a == b  # token ids and log-probs, bitwise
    assert ids_of(generate(tiny, prompts, seed=8, **kw)) != ids_of(a)
    # An explicit generator is the same as its seed; no seed follows torch.manual_seed.
    assert generate(tiny, prompts, generator=torch.Generator().manual_seed(7), **kw) == a
    torch.manual_seed(0)
    c = generate(tiny, prompts, **kw)
    torch.manual_seed(0)
    assert generate(tiny, prompts, **kw) == c


def test_samples_of_one_prompt_are_independent(tiny):
    out = generate(tiny, make_prompts([5], seed=9), n=8, max_new_tokens=12, temperature=1.0, seed=0)
    seqs = [tuple(c.token_ids) for c in out[0]]
    assert len(set(seqs)) == len(seqs)
    # Greedy samples of one prompt are all the same.
    out = generate(tiny, make_prompts([5], seed=9), n=3, max_new_tokens=12, temperature=0)
    assert len({tuple(c.token_ids) for c in out[0]}) == 1


def test_banned_tokens_never_appear(tiny):
    prompts = make_prompts([4, 7], seed=10)
    greedy = generate(tiny, prompts, max_new_tokens=12, temperature=0)
    banned = sorted({t for cs in greedy for t in cs[0].token_ids} | set(range(0, VOCAB, 3)))
    for kw in (dict(temperature=0), dict(temperature=3.0), dict(temperature=1.0, top_k=5, top_p=0.5)):
        out = generate(tiny, prompts, n=16, max_new_tokens=12, seed=1, banned_token_ids=banned, **kw)
        seen = {t for cs in out for c in cs for t in c.token_ids}
        assert seen and not seen & set(banned)


def test_stop_tokens_end_rows_and_are_reported(tiny):
    stop = list(range(0, VOCAB, 13))  # ~1 in 13 tokens stops
    out = generate(tiny, make_prompts([3, 6, 10], seed=12), n=8, max_new_tokens=20, temperature=1.5,
                   stop_token_ids=stop, seed=4, return_logprobs=True)
    reasons = set()
    for cs in out:
        for c in cs:
            reasons.add(c.finish_reason)
            assert len(c.logprobs) == len(c.token_ids)
            body = c.token_ids[:-1]
            assert not set(body) & set(stop)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in stop and len(c.token_ids) <= 20
            else:
                assert len(c.token_ids) == 20 and c.token_ids[-1] not in stop
    assert reasons == {"stop", "length"}


def test_empty_request(tiny):
    assert generate(tiny, [], max_new_tokens=4) == []


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "n must"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\].*empty"),
    (dict(prompts=[[1, VOCAB]]), r"prompts\[0\].*outside the vocabulary"),
    (dict(prompts=[[-1]]), r"prompts\[0\].*outside"),
    (dict(prompts=[[1.5, 2]]), r"prompts\[0\].*integer"),
    (dict(prompts="hello"), "prompts must"),
    (dict(prompts=[[1] * 250], max_new_tokens=10), r"prompts\[0\].*max_position_embeddings=256"),
    (dict(stop_token_ids=[VOCAB + 3]), "stop_token_ids"),
    (dict(banned_token_ids=list(range(VOCAB))), "banned_token_ids"),
    (dict(max_batch_tokens=5), "max_batch_tokens"),
    (dict(seed=1, generator=torch.Generator()), "seed or generator"),
    (dict(seed=1, seeds=[3]), "seed or generator or seeds"),
    (dict(seeds=[1, 2]), "one integer per prompt"),
    (dict(seeds=[1.0]), "one integer per prompt"),
    (dict(static_shapes=1), "static_shapes"),
    (dict(banned_words=["wait"]), "BannedWords"),
    (dict(seed=1.5), "seed must"),
])
def test_invalid_arguments_raise_before_any_work(tiny, monkeypatch, kwargs, match):
    def boom(*a, **k):
        raise AssertionError("the model ran before the arguments were checked")
    monkeypatch.setattr(tiny, "forward", boom)
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises(MinirlError, match=match):
        generate(tiny, prompts, **args)
    assert issubclass(MinirlError, ValueError)


# ----------------------------------------------------------------------------- per-prompt seeds

def test_per_prompt_seeds_do_not_depend_on_the_other_prompts(tiny):
    """With seeds=[one per prompt] a prompt's completions depend only on (prompt, its seed):
    the same alone, batched with others in any order, or split over waves; so a caller can
    derive the seed from (step, problem index) and split prompts over calls or processes."""
    from minirl.common import make_generator
    prompts = make_prompts([4, 9, 2, 6], seed=13)
    seeds = [make_generator(5, "rollout", 7, i).initial_seed() for i in range(4)]  # (seed, step, problem)
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, top_p=0.9, return_logprobs=True, stop_token_ids=[3])
    together = generate(tiny, prompts, seeds=seeds, **kw)
    order = [2, 0, 3, 1]
    shuffled = generate(tiny, [prompts[i] for i in order], seeds=[seeds[i] for i in order], **kw)
    in_waves = generate(tiny, prompts, seeds=seeds, max_batch_tokens=2 * 19, **kw)
    for i, p in enumerate(prompts):
        alone = generate(tiny, [p], seeds=[seeds[i]], **kw)[0]
        for other in (alone, shuffled[order.index(i)], in_waves[i]):
            assert [c.token_ids for c in other] == [c.token_ids for c in together[i]]
            for a, b in zip(other, together[i]):
                np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-4)
    # The same prompt twice with one seed: the same samples; another seed: others.
    twice = generate(tiny, [prompts[0], prompts[0]], seeds=[seeds[0], seeds[0]], **kw)
    assert ids_of(twice)[0] == ids_of(twice)[1] == ids_of(together)[0]
    assert ids_of(generate(tiny, [prompts[0]], seeds=[seeds[0] + 1], **kw))[0] != ids_of(together)[0]
    assert len({tuple(c.token_ids) for c in together[1]}) == 3  # the n samples still differ


# ----------------------------------------------------------------------------- properties against brute force
#
# The documented rule of the sampling distribution, written again by enumeration (no sorting
# tricks, no cumulative sums of the implementation), and a naive sampler built from the
# documented random streams: generate() must agree with both token for token.

def brute_kept(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The tokens the rule keeps, by enumeration. x: float64 tempered logits, -inf = banned.
    top-k: a token is kept when fewer than k tokens have a strictly larger logit (so every
    token tied with the k-th is kept). top-p, over the renormalised top-k distribution: among
    all sets S that are a prefix of the probability order (no token outside S more probable
    than one inside) and hold mass >= top_p, the smallest; then every token tied with its
    least probable one."""
    V = len(x)
    keep = np.isfinite(x)
    if 0 < top_k < V:
        keep &= np.array([(x > x[i]).sum() < top_k for i in range(V)])
    if top_p >= 1.0:
        return keep
    idx = np.nonzero(keep)[0]
    p = np.exp(x[idx] - x[idx].max())
    p /= p.sum()
    best = None
    for mask in itertools.product([False, True], repeat=len(idx)):
        s = np.array(mask)
        if not s.any() or (best is not None and s.sum() >= best.sum()):
            continue
        if s.all() or p[s].min() >= p[~s].max():
            if p[s].sum() >= top_p:
                best = s
    lowest = p[best].min()
    out = np.zeros(V, dtype=bool)
    out[idx[p >= lowest]] = True
    return out


def brute_probs(logits, temperature, top_k=0, top_p=1.0, banned=()) -> np.ndarray:
    """float64 sampling distribution: bans, temperature, the kept set above, renormalised."""
    x = np.asarray(logits, dtype=np.float64).copy()
    x[list(banned)] = -np.inf
    x = x / temperature
    kept = brute_kept(x, top_k, top_p)
    p = np.where(kept, np.exp(x - x[kept].max()), 0.0)
    return p / p.sum()


def inverse_cdf(p: np.ndarray, u: float) -> int:
    """The first token, in vocabulary order, whose cumulative probability exceeds u."""
    return int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"))


def safe_uniforms(p: np.ndarray, n: int, rng) -> np.ndarray:
    """n uniforms at least 1e-6 away from every CDF boundary (float rounding cannot flip them)."""
    cdf = np.cumsum(p)
    u = rng.random(4 * n)
    ok = np.abs(u[:, None] - cdf[None, :]).min(axis=1) > 1e-6
    return u[ok][:n]


def random_cases(count: int, seed: int):
    """Small vocabularies with many ties (logits on a half-integer grid), every kind of top-k
    (1, tied at the boundary, V - 1, V, > V) and top-p (tiny, at a tie, 1), bans, temperatures;
    top-p values kept 1e-4 away from a prefix mass, where rounding would decide."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        V = int(rng.integers(2, 10))
        logits = rng.integers(-4, 4, V) * 0.5 + (rng.random() < 0.3) * rng.normal(0, 1, V)
        banned = tuple(int(i) for i in np.nonzero(rng.random(V) < 0.15)[0])
        if len(banned) == V:
            continue
        temperature = float(rng.choice([0.3, 0.7, 1.0, 1.8]))
        top_k = int(rng.choice([0, 1, 2, 3, V - 1, V, V + 3]))
        top_p = float(rng.choice([1.0, rng.uniform(0.01, 1.0)]))
        if top_p < 1.0:
            x = np.asarray(logits, dtype=np.float64).copy()
            x[list(banned)] = -np.inf
            p = brute_probs(logits, temperature, top_k, 1.0, banned)
            masses = np.cumsum(np.sort(p)[::-1])
            if np.abs(masses - top_p).min() < 1e-4:
                continue
        out.append((np.asarray(logits, dtype=np.float32), temperature, top_k, top_p, banned))
    return out


def test_brute_force_rule_examples():
    """The enumeration itself, on hand-worked cases: ties at the top-k boundary kept, top-p's
    prefix reaching the mass, its ties, top_k >= V off."""
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert brute_kept(x, 0, 0.5).tolist() == [True, True, False, False]   # 0.4 < 0.5 <= 0.7
    assert brute_kept(x, 0, 0.35).tolist() == [True, False, False, False]
    assert brute_kept(x, 0, 0.95).tolist() == [True, True, True, True]
    assert brute_kept(x, 2, 0.5).tolist() == [True, False, False, False]  # 0.4 / 0.7 > 0.5
    y = np.array([2.0, 1.0, 1.0, 1.0, 0.0])
    assert brute_kept(y, 2, 1.0).tolist() == [True, True, True, True, False]
    assert brute_kept(y, 1, 1.0).tolist() == [True, False, False, False, False]
    assert brute_kept(y, 5, 1.0).all() and brute_kept(y, 9, 1.0).all()
    assert brute_kept(y, 0, 0.5).tolist() == [True, True, True, True, False]  # p0 < 0.5: the tie joins


@pytest.mark.parametrize("sync_free", [False, True], ids=["candidates", "whole-vocab"])
def test_distribution_equals_brute_force_on_tie_heavy_cases(sync_free):
    """sampling_logprobs is the brute-force distribution (same kept set, same values), and
    sample_next returns, for each uniform, the brute-force inverse-CDF token and its log-prob."""
    rng = np.random.default_rng(1)
    for logits, temperature, top_k, top_p, banned in random_cases(250, seed=0):
        V = len(logits)
        mask = torch.zeros(V, dtype=torch.bool)
        mask[list(banned)] = True
        expect = brute_probs(logits, temperature, top_k, top_p, banned)
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, banned_mask=mask)
        case = f"logits={logits.tolist()} {kw}"
        lp = sampling_logprobs(torch.from_numpy(logits)[None], **kw)[0].double().numpy()
        assert (np.isfinite(lp) == (expect > 0)).all(), case
        np.testing.assert_allclose(np.exp(lp), expect, rtol=0, atol=1e-6, err_msg=case)
        u = safe_uniforms(expect, 24, rng)
        tokens, logp = sample_next(torch.from_numpy(logits).expand(len(u), V).clone(), torch.from_numpy(u),
                                   sync_free=sync_free, **kw)
        assert tokens.tolist() == [inverse_cdf(expect, x) for x in u], case
        np.testing.assert_allclose(logp.numpy(), np.log(expect[tokens.numpy()]), rtol=0, atol=1e-5, err_msg=case)


def test_top_p_boundary_on_both_sides():
    """For every prefix of the probability order, top_p just below its mass keeps exactly that
    prefix and just above it one token more (neither one too few nor one too many)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randn(1, 9, generator=g) * 1.5  # [1, V] distinct values
        for temperature in (0.5, 1.0, 2.0):
            desc = torch.softmax(logits[0].double() / temperature, -1).sort(descending=True).values
            mass = desc.cumsum(0)
            for m in range(1, 9):
                # A step of a quarter of the neighbouring token's probability: far from rounding.
                for delta, n_kept in ((-desc[m - 1] / 4, m), (desc[m] / 4, m + 1)):
                    top_p = float(mass[m - 1] + delta)
                    if not 0 < top_p < 1 or abs(delta) < 1e-6:
                        continue
                    lp = sampling_logprobs(logits, temperature, top_p=top_p)
                    assert int(torch.isfinite(lp).sum()) == min(n_kept, 9), (m, delta, temperature)


def test_top_p_ties_beyond_the_candidates_fall_back_to_the_whole_vocabulary():
    """Top-p alone over a large vocabulary whose nucleus ends inside a run of 400 tied tokens:
    every tied token is kept, so the 256 candidates cannot hold the support; and a peaked one
    whose nucleus the candidates do hold. Both against brute force."""
    V = 700
    g = torch.Generator().manual_seed(4)
    perm = torch.randperm(V, generator=g)
    flat = torch.full((V,), -6.0)
    flat[perm[:10]] = 3.0
    flat[perm[10:410]] = 0.0
    peaked = torch.randn(V, generator=g) * 4
    rng = np.random.default_rng(5)
    for logits, top_p in ((flat, 0.8), (peaked, 0.9)):
        p = torch.softmax(logits.double(), -1).numpy()
        order = np.argsort(-p, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        lowest = p[order[before < top_p]].min()  # the rule by sorting: the enumeration is too big here
        expect = np.where(p >= lowest, p, 0.0)
        expect /= expect.sum()
        if logits is flat:
            assert (expect > 0).sum() == 410
        u = safe_uniforms(expect, 400, rng)
        tokens, logp = sample_next(logits.expand(len(u), V).clone(), torch.from_numpy(u), 1.0, top_p=top_p)
        assert tokens.tolist() == [inverse_cdf(expect, x) for x in u]
        np.testing.assert_allclose(logp.numpy(), np.log(expect[tokens.numpy()]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sync_free", [False, True], ids=["candidates", "whole-vocab"])
def test_a_token_of_probability_zero_is_never_chosen_even_at_the_ends_of_the_interval(sync_free):
    """u = 0 and u = the largest double below 1, with the first and the last token of the
    vocabulary excluded (banned, or outside top-k): the draw stays on the support."""
    u = torch.tensor([0.0, np.nextafter(1.0, 0.0)], dtype=torch.float64)
    ends = torch.tensor([True, False, False, False, True])
    for logits, kw, expect in ((torch.tensor([5.0, 0.1, 0.3, 0.2, 4.0]), dict(banned_mask=ends), [1, 3]),
                               (torch.tensor([5.0, 0.1, 0.3, 0.2, 4.0]), dict(banned_mask=ends, top_p=0.99), [1, 3]),
                               (torch.tensor([0.1, 5.0, 4.0, 0.3, 0.2]), dict(top_k=2), [1, 2])):
        tokens, logp = sample_next(logits.expand(2, 5).clone(), u, 1.0, sync_free=sync_free, **kw)
        assert tokens.tolist() == expect, kw
        assert torch.isfinite(logp).all()


def test_greedy_is_the_argmax_of_the_unbanned_logits():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(50, 30, generator=g)  # [B, V]
    banned = logits.argmax(-1)[:5]  # ban some rows' favourites
    mask = torch.zeros(30, dtype=torch.bool)
    mask[banned] = True
    tokens, logp = sample_next(logits, None, 0.0, top_k=3, top_p=0.5, banned_mask=mask)
    ref = logits.masked_fill(mask, -math.inf)
    assert torch.equal(tokens, ref.argmax(-1))
    torch.testing.assert_close(logp, ref.log_softmax(-1).max(-1).values, rtol=0, atol=1e-6)


def test_temperature_scales_the_logits_before_top_p():
    """The same logits and top_p keep fewer tokens when colder: top-p reads the tempered
    probabilities, and the kept values are softmax(logits / T) renormalised."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    kept = {T: int(torch.isfinite(sampling_logprobs(logits, T, top_p=0.8)).sum()) for T in (0.25, 1.0, 4.0)}
    assert kept[0.25] < kept[1.0] < kept[4.0]
    for T in (0.25, 0.6, 1.0, 1.7, 4.0):
        np.testing.assert_allclose(sampling_logprobs(logits, T)[0].exp().numpy(),
                                   brute_probs(logits[0].numpy(), T), rtol=0, atol=1e-6)

