"""GRPO: advantage and aggregation variants against hand-computed numbers, the on-policy
gradient, and train_grpo.py end to end on a tiny model (learning, resume, errors)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minirl import grpo, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- advantages

def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # Group 0: mean 0.5, unbiased std sqrt(1/3) = 0.57735; group 1: all equal -> 0.
    g = grpo.group_advantages(r, "group", eps=0.0)
    torch.testing.assert_close(g[0], torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grpo.group_advantages(r, "group")[1], torch.zeros(4))
    # Dr. GRPO: r - mean only.
    torch.testing.assert_close(grpo.group_advantages(r, "none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # Batch std: std of all 8 rewards (six 1s, two 0s): sqrt((6*0.0625 + 2*0.5625)/7) = 0.46291.
    b = grpo.group_advantages(r, "batch", eps=0.0)
    torch.testing.assert_close(b[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / 0.462910, atol=1e-5, rtol=0)


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # GRPO: mean over sequences of per-sequence token means: (2 + 4) / 2 = 3.
    assert grpo.aggregate(per_token, mask, "seq-mean-token-mean", 2, 4).item() == pytest.approx(3.0)
    # DAPO: token mean over the batch: 10 / 4.
    assert grpo.aggregate(per_token, mask, "token-mean", 2, 4).item() == pytest.approx(2.5)
    # Dr. GRPO: token sum / (G * L) with L = 5: 10 / 10.
    assert grpo.aggregate(per_token, mask, "seq-mean-token-sum-norm", 2, 4, norm_length=5).item() == pytest.approx(1.0)
    # Micro-batches with global denominators add up to the whole.
    for mode in grpo.AGGREGATIONS:
        whole = grpo.aggregate(per_token, mask, mode, 2, 4, norm_length=5)
        parts = sum(grpo.aggregate(per_token[i:i + 1], mask[i:i + 1], mode, 2, 4, norm_length=5) for i in range(2))
        assert parts.item() == pytest.approx(whole.item())


def test_bad_modes_raise():
    with pytest.raises(ValueError, match="advantage-std"):
        grpo.group_advantages(torch.zeros(1, 2), "nope")
    with pytest.raises(ValueError, match="loss-aggregation"):
        grpo.aggregate(torch.zeros(1, 1), torch.ones(1, 1), "nope", 1, 1)


# ---------------------------------------------------------------- on-policy gradient

def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu").train()
    g = torch.Generator().manual_seed(0)
    samples = [grpo.Sample(torch.randint(3, 40, (int(lp),), generator=g).tolist(),
                           torch.randint(3, 40, (int(lc),), generator=g).tolist(), adv)
               for lp, lc, adv in ((3, 5, 0.7), (6, 2, -1.2), (2, 7, 0.4))]
    for mode in grpo.AGGREGATIONS:
        model.zero_grad()
        loss, stats = grpo.policy_loss(model, samples, pad_id=0, temperature=0.7, eps_low=0.2, eps_high=0.28,
                                       beta=0.0, kl_estimator="k3", aggregation=mode, num_sequences=3,
                                       num_tokens=14, norm_length=10, on_policy=True)
        assert stats["ratio_min"].item() == 1.0 and stats["ratio_max"].item() == 1.0
        assert stats["clip_frac"].item() == 0.0
        loss.backward()
        got = [p.grad.clone() for p in model.parameters()]
        # The plain policy gradient: -sum A * log pi, with the same aggregation.
        model.zero_grad()
        logp, mask = grpo.completion_logprobs(model, samples, 0, temperature=0.7)
        adv = torch.tensor([s.advantage for s in samples])[:, None]
        grpo.aggregate(-(adv * logp) * mask, mask, mode, 3, 14, norm_length=10).backward()
        for a, b in zip(got, (p.grad for p in model.parameters())):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_completion_logprobs_match_full_logits(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu")
    s = grpo.Sample([5, 6, 7], [8, 9, 10, 11], 1.0)
    with torch.no_grad():
        logp, mask = grpo.completion_logprobs(model, [s, grpo.Sample([5], [8], 0.0)], 0, temperature=2.0)
        full = torch.log_softmax(model(torch.tensor([[5, 6, 7, 8, 9, 10, 11]])) / 2.0, -1)[0]
    ref = full[2:6].gather(-1, torch.tensor([[8], [9], [10], [11]]))[:, 0]
    torch.testing.assert_close(logp[0], ref, rtol=1e-5, atol=1e-6)
    assert mask.tolist() == [[True] * 4, [True, False, False, False]]


# ---------------------------------------------------------------- train_grpo.py end to end

REWARD_FILE = '''
def has_a(response, problem):
    """1 when the letter a appears in the first four characters."""
    return 1.0 if "a" in response[:4] else 0.0
'''


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo_task")
    (d / "reward.py").write_text(REWARD_FILE)
    with open(d / "problems.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"{i}=?", "answer": "a"}) + "\n")
    return d


def run_grpo(*flags, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), *map(str, flags)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def common_flags(model, files, out, steps):
    return ["--model", model, "--data", files / "problems.jsonl", "--reward", f"{files / 'reward.py'}:has_a",
            "--template", "raw", "--steps", steps, "--prompts-per-step", 4, "--num-samples", 8,
            "--max-new-tokens", 6, "--lr", 3e-2, "--advantage-std", "group", "--loss-aggregation", "token-mean",
            "--eval-every", 0, "--save-every", 0, "--out", out, "--seed", 3]


@pytest.mark.parametrize("extra", [[], ["--beta", 0.05, "--kl-estimator", "k3"],
                                   ["--dynamic-sampling", "--epochs-per-rollout", 2, "--mini-batches", 2]],
                         ids=["plain", "kl", "dynamic-ppo"])
def test_tiny_model_learns(tiny_model_dir, task_files, tmp_path, extra):
    out = tmp_path / "run"
    run_grpo(*common_flags(tiny_model_dir, task_files, out, 30), *extra)
    rec = [m for m in metrics(out) if "reward_mean" in m]
    assert len(rec) == 30
    first, last = sum(m["reward_mean"] for m in rec[:5]) / 5, sum(m["reward_mean"] for m in rec[-5:]) / 5
    assert last > first + 0.3, (first, last)
    if "--beta" in extra:
        assert any(m["kl"] > 0 for m in rec)
    if "--dynamic-sampling" in extra:
        assert any(m["sampling_rounds"] > 1 or m["groups_kept"] < m["groups_sampled"] for m in rec)
        assert any(m["ratio_mean"] != 1.0 for m in rec)  # off-policy passes happened
    # The final folder loads in transformers with the same logits.
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    mine = load_model(out / "final", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(mine(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


TIMING_KEYS = {"t_gen", "t_train", "gen_tok_s", "train_tok_s"}


def test_resume_gives_the_same_metrics(tiny_model_dir, task_files, tmp_path):
    flags = ["--beta", 0.05, "--epochs-per-rollout", 2, "--rollout-correction", "tis", "--mini-batches", 3]
    run_grpo(*common_flags(tiny_model_dir, task_files, tmp_path / "a", 4), *flags)
    run_grpo(*common_flags(tiny_model_dir, task_files, tmp_path / "b", 4), *flags, "--stop-after", 2)
    assert [m["step"] for m in metrics(tmp_path / "b")] == [1, 2]
    run_grpo(*common_flags(tiny_model_dir, task_files, tmp_path / "b", 4), *flags, "--resume")
    straight = [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics(tmp_path / "a")]
    resumed = [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics(tmp_path / "b")]
    assert straight == resumed


@pytest.mark.parametrize("flags,message", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
    (["--temperature", 0], "--temperature must be > 0"),
    (["--top-p", 1.5], "--top-p must be in (0, 1]"),
    (["--lr", -1], "--lr must be > 0"),
    (["--eval-samples", 0], "--eval-samples must be >= 1"),
    (["--top-k", -2], "--top-k must be >= 0"),
    (["--num-samples", 0], "--num-samples must be >= 1"),
    (["--prompts-per-step", 100], "larger than the 40 training problems"),
    (["--ref-device", "cpu"], "--ref-device is set but --beta is 0"),
])
def test_bad_input_exits_2(tiny_model_dir, task_files, tmp_path, flags, message):
    proc = run_grpo(*common_flags(tiny_model_dir, task_files, tmp_path / "r", 2), *flags, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_empty_data_exits_2(tiny_model_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    proc = run_grpo("--model", tiny_model_dir, "--data", tmp_path / "empty.jsonl", "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "empty.jsonl" in proc.stderr


def test_non_finite_steps_are_skipped_then_stop(tiny_model_dir, task_files, tmp_path):
    (tmp_path / "nan_reward.py").write_text("def f(response, problem):\n    return float('nan')\n")
    out = tmp_path / "r"
    flags = common_flags(tiny_model_dir, task_files, out, 5)
    flags[flags.index("--reward") + 1] = f"{tmp_path / 'nan_reward.py'}:f"
    proc = run_grpo(*flags, "--max-bad-steps", 2, check=False)
    assert proc.returncode == 1 and "2 updates in a row with a non-finite" in proc.stderr
    rec = metrics(out)
    assert [m["skipped_updates"] for m in rec] == [1]  # step 1 logged and skipped; step 2 stops
    assert not os.path.exists(out / "final")


def test_progress_eta_ignores_one_slow_step(monkeypatch):
    """The ETA is the median of recent step times: a slow first step (warm-up) or one slow
    step (an evaluation) does not move it."""
    from minirl import training
    now = [0.0]
    monkeypatch.setattr(training.time, "time", lambda: now[0])
    p = training.Progress(100)
    assert p.eta(0).endswith("ETA ?")
    for step, seconds in enumerate([60.0] + [2.0] * 8 + [30.0], start=1):
        now[0] += seconds
        line = p.eta(step)
    assert line.endswith("ETA 3:00"), line  # 90 steps left x 2 s
