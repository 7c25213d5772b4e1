"""Do the flags reach the maths? train_grpo.py end to end on the bundled model with
non-default settings for every flag the GRPO objective reads, checked against one step
recomputed independently here.

The run writes its step-1 rollouts and the membership of each optimizer update with
`--dump-rollouts`; this file then redoes the step from those tokens with its own code:
advantages from the rewards, log-probs from the full logits one sequence at a time (no
padding, no micro-batches, no fused kernel), the clipped surrogate with eps_low/eps_high,
the KL estimators, the three aggregations with the mini-batch's denominators, grad-norm
clipping and torch's AdamW. Each update's loss and the final weights must agree with the
run. The three wiring bugs this was written against (micro-batch instead of mini-batch token
count, eps_high=eps_low, training log-probs at temperature 1) each fail these tests
(tests/mutate.py plants them).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minirl import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "assets", "tiny-arith")
LR = 1e-4  # small: the bundled model is peaked, one AdamW step of 1e-4 already moves ratios to ~6


def run_step(tmp_path, *flags, name="run", check=True):
    """One step of train_grpo.py on the bundled model; returns (metrics, dump, final weights)."""
    out, dump = tmp_path / name, tmp_path / f"{name}.jsonl"
    base = ["--steps", 1, "--prompts-per-step", 4, "--num-samples", 4, "--max-new-tokens", 24,
            "--task-levels", "1,2", "--eval-problems", 0, "--warmup-steps", 0, "--lr", LR,
            "--seed", 1, "--save-every", 0, "--out", out, "--dump-rollouts", dump]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), *map(str, base + list(flags))],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not check:
        return proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(ln) for ln in f if ln.strip()]
    with open(dump) as f:
        dumped = json.loads(f.readline())
    return metrics, dumped, load_file(str(out / "final" / "model.safetensors"))


def settings(flags):
    """The flags that matter here, with train_grpo.py's demo-preset defaults."""
    s = {"temperature": 1.0, "eps_low": 0.2, "eps_high": 0.2, "beta": 0.0, "kl_estimator": "k3",
         "loss_aggregation": "token-mean", "advantage_std": "group", "epochs_per_rollout": 1,
         "mini_batches": 1, "truncated": "keep", "truncation_penalty": -1.0, "max_new_tokens": 24,
         "grad_clip": 1.0, "num_samples": 4}
    for i, f in enumerate(flags):
        if isinstance(f, str) and f.startswith("--") and f[2:].replace("-", "_") in s:
            key = f[2:].replace("-", "_")
            s[key] = type(s[key])(flags[i + 1])
    return s


# ---------------------------------------------------------------- the independent step

def advantages(rewards, mode, n):
    """rewards [P*n] in group order -> advantages [P*n] (eps 1e-6, unbiased std)."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, n)
    centred = r - r.mean(1, keepdim=True)
    if mode == "none":
        return centred.flatten()
    std = r.std(1, keepdim=True) if mode == "group" else r.std()
    return (centred / (std + 1e-6)).flatten()


def sequence_logprobs(model, prompt, completion, temperature):
    """log pi(completion_t | prefix) [len(completion)] from the full logits of one sequence."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids)[0, len(prompt) - 1:len(prompt) + len(completion) - 1]  # [C, V]
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def recompute_step(s, dump):
    """(loss of each update, model after the step), from the dumped rollouts only."""
    samples = dump["samples"]
    T, el, eh, beta = s["temperature"], s["eps_low"], s["eps_high"], s["beta"]
    for x in samples:
        if s["truncated"] == "penalty" and x["finish_reason"] == "length":
            assert x["reward"] == s["truncation_penalty"]
    adv = advantages([x["reward"] for x in samples], s["advantage_std"], s["num_samples"])
    torch.testing.assert_close(adv.float(), torch.tensor([x["advantage"] for x in samples]),
                               rtol=1e-5, atol=1e-6)
    trained = [not (s["truncated"] == "mask" and x["finish_reason"] == "length") for x in samples]

    model = load_model(BUNDLED, device="cpu").train()
    initial = load_model(BUNDLED, device="cpu")
    with torch.no_grad():  # rollout policy = reference policy = the initial model here
        old = [sequence_logprobs(initial, x["prompt_ids"], x["completion_ids"], T) for x in samples]
    on_policy = s["epochs_per_rollout"] == 1 and s["mini_batches"] == 1
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8)
    losses = []
    for update in dump["updates"]:
        active = [i for i in update["samples"] if trained[i]]
        if not active:  # nothing to learn: no optimizer step
            losses.append(None)
            continue
        G = len(active)
        N = sum(len(samples[i]["completion_ids"]) for i in active)
        loss = torch.zeros((), dtype=torch.float64)
        for i in active:
            x = samples[i]
            logp = sequence_logprobs(model, x["prompt_ids"], x["completion_ids"], T)  # [C]
            ratio = torch.exp(logp - (logp.detach() if on_policy else old[i]))
            A = adv[i]
            per_token = -torch.minimum(ratio * A, ratio.clamp(1 - el, 1 + eh) * A)
            if beta > 0:
                d = old[i] - logp  # log(ref / policy)
                kl = {"k1": -d, "k2": d**2 / 2, "k3": torch.exp(d) - d - 1}[s["kl_estimator"]]
                per_token = per_token + beta * kl
            agg = s["loss_aggregation"]
            if agg == "seq-mean-token-mean":
                loss = loss + per_token.mean() / G
            elif agg == "token-mean":
                loss = loss + per_token.sum() / N
            else:
                loss = loss + per_token.sum() / (G * s["max_new_tokens"])
        losses.append(float(loss.detach()))
        opt.zero_grad()
        if active:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
            opt.step()
    return losses, model


def check_against_run(tmp_path, flags):
    s = settings(flags)
    metrics, dump, weights = run_step(tmp_path, *flags)
    n_samples = len(dump["samples"])
    # Every sample is trained on once per pass, and the mini-batches differ by at most one.
    for e in range(s["epochs_per_rollout"]):
        ups = [u for u in dump["updates"] if u["epoch"] == e]
        assert len(ups) == s["mini_batches"]
        assert sorted(i for u in ups for i in u["samples"]) == list(range(n_samples))
        sizes = [len(u["samples"]) for u in ups]
        assert max(sizes) - min(sizes) <= 1, sizes
    losses, model = recompute_step(s, dump)
    run_losses = [u["loss"] for u in dump["updates"]]
    assert [x is None for x in run_losses] == [x is None for x in losses]
    run_losses, losses = [x for x in run_losses if x is not None], [x for x in losses if x is not None]
    assert run_losses == pytest.approx(losses, rel=2e-3, abs=1e-5), (run_losses, losses)
    assert metrics[0]["loss"] == pytest.approx(sum(losses) / len(losses), rel=2e-3, abs=1e-5)
    # AdamW divides by sqrt(v): on its first steps a weight whose gradient is ~0 moves by up to
    # lr whatever the gradient's rounding, so compare the whole update, not each weight.
    initial = load_model(BUNDLED, device="cpu").state_dict()
    ours = model.state_dict()
    diff = sum(float(((weights[k] - ours[k]) ** 2).sum()) for k in weights)
    size = sum(float(((ours[k] - initial[k]) ** 2).sum()) for k in weights)
    assert size > 0 and (diff / size) ** 0.5 < 1e-2, (diff / size) ** 0.5  # measured ~1.5e-3
    return metrics, dump


# Every flag that reaches the objective, at a non-default value in at least one case.
CASES = {
    # the settings of issue 18: tiny micro-batches, clip-higher, temperature, two passes x two updates
    "clip-higher-microbatch": ["--micro-batch-tokens", 64, "--eps-high", 0.28, "--temperature", 0.7,
                               "--epochs-per-rollout", 2, "--mini-batches", 2],
    "k1-seqmean-batchstd-mask": ["--beta", 0.1, "--kl-estimator", "k1", "--loss-aggregation", "seq-mean-token-mean",
                                 "--advantage-std", "batch", "--truncated", "mask", "--max-new-tokens", 22,
                                 "--temperature", 1.3, "--top-k", 8, "--epochs-per-rollout", 2,
                                 "--micro-batch-tokens", 100],
    "k2-drgrpo-penalty-3mb": ["--beta", 0.05, "--kl-estimator", "k2", "--loss-aggregation",
                                  "seq-mean-token-sum-norm", "--advantage-std", "none", "--truncated", "penalty",
                                  "--truncation-penalty", -0.5, "--max-new-tokens", 23, "--temperature", 1.2,
                                  "--top-p", 0.9, "--mini-batches", 3, "--eps-low", 0.1],
    "k3-three-passes-dynamic": ["--beta", 0.2, "--kl-estimator", "k3", "--temperature", 0.8, "--epochs-per-rollout", 3,
                        "--eps-low", 0.15, "--eps-high", 0.3, "--grad-clip", 0.5, "--dynamic-sampling"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_matches_independent_computation(tmp_path, case):
    metrics, dump = check_against_run(tmp_path, CASES[case])
    adv = [x["advantage"] for x in dump["samples"]]
    assert any(a != 0 for a in adv), "no learning signal: the case tests nothing"
    if "--truncated" in CASES[case]:  # the truncation mode must meet both kinds of completion
        assert len({x["finish_reason"] for x in dump["samples"]}) == 2


def test_case_exercises_the_clip_and_truncation(tmp_path):
    """The cases above are only as strong as the situations they create: check that the
    clip-higher case really clips above 1 + eps_low and the mask case really masks."""
    flags = CASES["clip-higher-microbatch"]
    metrics, dump, _ = run_step(tmp_path, *flags)
    later = dump["updates"][1:]
    assert max(u["ratio_max"] for u in later) > 1.28 or metrics[0]["clip_high"] > 0


def test_micro_batch_budget_does_not_change_the_update(tmp_path):
    flags = ["--temperature", 0.6, "--loss-aggregation", "token-mean", "--epochs-per-rollout", 2,
             "--mini-batches", 2, "--beta", 0.05]
    m_small, d_small, w_small = run_step(tmp_path, *flags, "--micro-batch-tokens", 40, name="small")
    m_large, d_large, w_large = run_step(tmp_path, *flags, "--micro-batch-tokens", 100000, name="large")
    assert d_small["samples"] == d_large["samples"]
    assert [u["loss"] for u in d_small["updates"]] == pytest.approx([u["loss"] for u in d_large["updates"]],
                                                                     rel=1e-5, abs=1e-7)
    initial = load_model(BUNDLED, device="cpu").state_dict()
    diff = sum(float(((w_small[k] - w_large[k]) ** 2).sum()) for k in w_large)
    size = sum(float(((w_large[k] - initial[k]) ** 2).sum()) for k in w_large)
    assert (diff / size) ** 0.5 < 1e-2, (diff / size) ** 0.5


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_first_pass_ratio_is_one_at_any_temperature(tmp_path, temperature):
    """The first update of an off-policy step sees the rollout policy itself: ratio 1 up to
    rounding, whatever the temperature (the old and new log-probs use the same one)."""
    # --seed 6: rollouts where several groups have a non-zero advantage (something to learn)
    metrics, dump, _ = run_step(tmp_path, "--temperature", temperature, "--epochs-per-rollout", 2,
                                "--mini-batches", 2, "--micro-batch-tokens", 50, "--seed", 6)
    first = dump["updates"][0]
    assert abs(first["ratio_min"] - 1) < 1e-5 and abs(first["ratio_max"] - 1) < 1e-5, first
    assert max(abs(u["ratio_max"] - 1) for u in dump["updates"][1:]) > 1e-3  # later ones moved


# ---------------------------------------------------------------- regressions and new features

def test_every_sample_is_trained_with_one_group_and_four_mini_batches(tmp_path):
    """Mini-batch split: 1 prompt x 4 samples over 4 mini-batches is 4 updates of one sample
    (it once trained on 0 samples); 5 samples over 2 mini-batches use all 5."""
    for n, k in ((4, 4), (5, 2)):
        flags = ["--prompts-per-step", 1, "--num-samples", n, "--mini-batches", k, "--temperature", 1.5,
                 "--task-levels", "2"]
        metrics, dump, _ = run_step(tmp_path, *flags, name=f"split{n}x{k}")
        assert sorted(i for u in dump["updates"] for i in u["samples"]) == list(range(n))
        assert sorted(len(u["samples"]) for u in dump["updates"]) == sorted([n // k + (j < n % k) for j in range(k)])


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_skipping_zero_advantage_samples_gives_the_same_update(tmp_path, aggregation):
    """beta = 0: the samples of all-equal groups are skipped (no forward/backward) and the
    update is the same as computing them; checked on the gradient of one mini-batch
    (weights after a plain SGD step of lr 1), for every aggregation."""
    import argparse
    sys.path.insert(0, ROOT)
    import train_grpo
    from minirl import grpo, load_tokenizer

    metrics, dump, _ = run_step(tmp_path, "--temperature", 1.3, name="rollouts")
    samples = [grpo.Sample(x["prompt_ids"], x["completion_ids"], x["advantage"]) for x in dump["samples"]]
    assert any(s.advantage == 0 for s in samples) and any(s.advantage != 0 for s in samples)
    grads = {}
    for mode in ("skip", "train"):
        model = load_model(BUNDLED, device="cpu")
        args = argparse.Namespace(beta=0.0, zero_advantage=mode, temperature=1.3, eps_low=0.2, eps_high=0.28,
                                  kl_estimator="k3", loss_aggregation=aggregation, max_new_tokens=24,
                                  rollout_correction="none", rollout_correction_cap=2.0, dump_rollouts=None)
        S = train_grpo.Setup(args, torch.device("cpu"), None, load_tokenizer(BUNDLED), [], [], [], [],
                             model=model, micro_tokens=64)
        U = {"stats": {}, "train_tokens": 0}
        train_grpo.train_mini_batch(S, samples, True, U)
        with torch.no_grad():
            grads[mode] = {k: p - p.grad for k, p in model.named_parameters()}  # SGD, lr 1
        grads[mode + "_tokens"] = U["train_tokens"]
    assert grads["skip_tokens"] < grads["train_tokens"]  # less work
    for k in grads["train"]:
        torch.testing.assert_close(grads["skip"][k], grads["train"][k], rtol=0, atol=1e-7, msg=k)


def test_same_folder_rerun_is_refused_and_bad_flags_write_nothing(tmp_path):
    run_step(tmp_path, name="r")
    proc = run_step(tmp_path, name="r", check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and len(proc.stderr.splitlines()) == 1
    for flags, message in ((["--temperature", 0], "--temperature must be > 0"),
                           (["--lr", -1], "--lr must be > 0"), (["--top-p", 0], "--top-p"),
                           (["--eval-samples", 0], "--eval-samples must be >= 1"),
                           (["--out", "/proc/1/no/run"], "cannot write there")):
        proc = run_step(tmp_path, *flags, name="fresh", check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert not os.path.exists(tmp_path / "fresh") and not os.path.exists(tmp_path / "fresh.jsonl")


# ---------------------------------------------------------------- sampler vs trainer (rollout correction)

def test_sampler_log_probs_match_the_trainer_in_fp32(tmp_path):
    """Same model code on both sides: the sampler's log-probs equal the trainer's (old)
    log-probs within 1e-5, and tis (every weight ~1) changes the update by < 1e-6."""
    flags = ["--temperature", 0.8, "--epochs-per-rollout", 2, "--micro-batch-tokens", 64]
    m_none, d_none, w_none = run_step(tmp_path, *flags, name="none")
    # Rounding only (KV-cache decode and a full forward batch their matmuls differently):
    # mean |log-ratio| ~1e-7 and max ~1e-5 measured.
    assert m_none[0]["mismatch_abs_mean"] < 1e-5 and m_none[0]["mismatch_abs_max"] < 1e-4
    assert abs(m_none[0]["mismatch_k3"]) < 1e-9
    initial = load_model(BUNDLED, device="cpu")
    with torch.no_grad():  # and independently of the run's own trainer
        for x in d_none["samples"]:
            ours = sequence_logprobs(initial, x["prompt_ids"], x["completion_ids"], 0.8)
            torch.testing.assert_close(torch.tensor(x["sampler_logprobs"], dtype=torch.float64), ours,
                                       rtol=0, atol=5e-5)
    m_tis, d_tis, w_tis = run_step(tmp_path, *flags, "--rollout-correction", "tis", name="tis")
    assert m_tis[0]["correction_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m_tis[0]["correction_capped_frac"] == 0
    # AdamW normalises each weight's step, so rounding-level differences in near-zero
    # gradients show as up to lr per weight: compare the whole update (as above).
    start = initial.state_dict()
    diff = sum(float(((w_tis[k] - w_none[k]) ** 2).sum()) for k in w_none)
    size = sum(float(((w_none[k] - start[k]) ** 2).sum()) for k in w_none)
    assert (diff / size) ** 0.5 < 1e-2, (diff / size) ** 0.5  # measured ~1e-3
    # The gradient itself, from the dumped rollouts through grpo.policy_loss: every weight is
    # 1 within the mismatch (< 1e-5), so tis changes the gradient by < 1e-5 of its largest
    # entry (measured ~1e-6): an update of lr 1e-4 moves by < 1e-9 more or less.
    from minirl import grpo
    samples = [grpo.Sample(x["prompt_ids"], x["completion_ids"], x["advantage"],
                           sampler_logprobs=torch.tensor(x["sampler_logprobs"])) for x in d_none["samples"]]
    grads = {}
    for mode in ("none", "tis"):
        initial.zero_grad()
        loss, st = grpo.policy_loss(initial, samples, pad_id=0, temperature=0.8, eps_low=0.2, eps_high=0.2, beta=0.0,
                                    kl_estimator="k3", aggregation="token-mean", num_sequences=len(samples),
                                    num_tokens=sum(len(x.completion_ids) for x in samples), norm_length=24,
                                    on_policy=True, rollout_correction=mode)
        loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in initial.parameters()])
    assert float((grads["tis"] - grads["none"]).abs().max()) <= 1e-5 * float(grads["none"].abs().max())


def test_bf16_mismatch_is_logged_and_weights_match_an_independent_computation(tmp_path):
    metrics, dump, _ = run_step(tmp_path, "--dtype", "bf16", "--rollout-correction", "tis",
                                "--rollout-correction-cap", 1.01, "--epochs-per-rollout", 2)
    m = metrics[0]
    assert m["mismatch_abs_max"] > 0 and math.isfinite(m["mismatch_k3"])
    # The trainer's bf16 old log-probs, recomputed here from the full logits, give the weights.
    model = load_model(BUNDLED, device="cpu", dtype=torch.bfloat16)
    weights, capped, n = 0.0, 0, 0
    with torch.no_grad():
        for x in dump["samples"]:
            ids = torch.tensor([x["prompt_ids"] + x["completion_ids"]])
            p, c = len(x["prompt_ids"]), len(x["completion_ids"])
            logits = model(ids)[0, p - 1:p + c - 1].float()
            old = torch.log_softmax(logits, -1).gather(-1, torch.tensor(x["completion_ids"])[:, None])[:, 0]
            rho = torch.exp(old - torch.tensor(x["sampler_logprobs"]))
            weights += float(rho.clamp(max=1.01).sum())
            capped += int((rho > 1.01).sum())
            n += c
    assert m["correction_weight_mean"] == pytest.approx(weights / n, abs=2e-3)
    assert m["correction_capped_frac"] == pytest.approx(capped / n, abs=0.05)


def test_a_different_sampler_shows_up_and_tis_caps_it(tmp_path):
    """Sampling at a temperature the trainer does not use (top-k 3 truncation plays that
    part here: the sampler draws from a renormalised top-3, the trainer scores the full
    softmax) raises the mismatch, and tis caps the weights."""
    plain, _, _ = run_step(tmp_path, "--temperature", 1.5, name="plain")
    m, dump, _ = run_step(tmp_path, "--temperature", 1.5, "--top-k", 3, "--rollout-correction", "tis",
                          "--rollout-correction-cap", 0.9, name="topk")
    m = m[0]
    assert m["mismatch_k3"] > 1e-4 and m["mismatch_abs_max"] > 0.1 and m["mismatch_frac_gt_0.1"] > 0
    assert plain[0]["mismatch_abs_max"] < 1e-4
    assert 0 < m["correction_capped_frac"] <= 1 and m["correction_weight_mean"] <= 0.9
