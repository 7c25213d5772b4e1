"""Real weights end to end, as a user runs them: the three entry scripts on SmolLM2-135M-Instruct
(the test fixture, a Llama with a ChatML Jinja template), each in a fresh process that must
never import transformers; then, in this process, what they wrote is checked against
transformers: `final/` loads there, and minirl's sampler (prefill + KV-cache decode, greedy)
gives the same tokens as transformers' generate and the same log-probs as a full transformers
forward over prompt + completion (fp32: max |difference| <= LOGPROB_TOL nats, so a small drift
such as a rotary position off by one in decode fails even where the tokens survive it).

Sizes are tiny (2 problems x 2 samples x 8 tokens, a few SFT steps) and each run is done once
per module and shared by the checks."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import minirl

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Measured here: <= 3.1e-5 on SmolLM2 (fp32, 24 tokens x 3 prompts); a decode position off by
# one gives 0.2-0.6.
LOGPROB_TOL = 2e-4

# Run a script as `python SCRIPT ARGS...` does (runpy, __main__, the repository as the script's
# folder on sys.path), then fail with status 97 if anything imported transformers.
CHILD = """
import os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    if "transformers" in sys.modules:
        sys.stderr.write("child check: transformers was imported\\n")
        sys.stderr.flush()
        os._exit(97)
"""

MATH = [("What is 7 + 5?", "12"), ("What is 9 * 3?", "27"), ("What is 20 - 8?", "12"), ("What is half of 14?", "7")]
SFT = [("What is 2 + 2?", "2 + 2 = 4. The answer is \\boxed{4}."),
       ("What is 3 * 5?", "3 * 5 = 15. The answer is \\boxed{15}."),
       ("Name a primary colour.", "Red is a primary colour."),
       ("What is 10 - 4?", "10 - 4 = 6. The answer is \\boxed{6}."),
       ("Say hello.", "Hello!"),
       ("What is 6 / 2?", "6 / 2 = 3. The answer is \\boxed{3}.")]
# A reward that varies within a group (the model never solves these in 8 tokens, and
# all-equal rewards would give zero advantages and no update to check).
REWARD = "def reward(response, problem):\n    return len(response) / 10.0\n"


def run_script(script, *args, timeout=240):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("MINIRL_BLOCK_TRANSFORMERS", None)
    r = subprocess.run([sys.executable, "-c", CHILD, script, *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    with open(d / "math.jsonl", "w") as f:
        for q, a in MATH:
            f.write(json.dumps({"problem": q, "answer": a}) + "\n")
    with open(d / "sft.jsonl", "w") as f:
        for q, a in SFT:
            f.write(json.dumps({"prompt": q, "response": a}) + "\n")
    (d / "reward.py").write_text(REWARD)
    return d


@pytest.fixture(scope="module")
def grpo_run(smollm2_dir, files):
    out = files / "grpo"
    stdout = run_script("train_grpo.py", "--model", smollm2_dir, "--template", "boxed",
                        "--data", files / "math.jsonl", "--reward", f"{files / 'reward.py'}:reward",
                        "--steps", 2, "--prompts-per-step", 2, "--num-samples", 2, "--max-new-tokens", 8,
                        "--lr", 1e-5, "--eval-every", 0, "--out", out)
    return out, stdout


@pytest.fixture(scope="module")
def sft_run(smollm2_dir, files):
    out = files / "sft"
    stdout = run_script("train_sft.py", "--model", smollm2_dir, "--template", "chat",
                        "--data", files / "sft.jsonl", "--max-steps", 3, "--max-len", 128,
                        "--batch-tokens", 256, "--tokens-per-micro-batch", 256, "--warmup-steps", 0,
                        "--lr", 1e-4, "--eval-every", 0, "--out", out)
    return out, stdout


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_finite(rec):
    for k, v in rec.items():
        if isinstance(v, float):
            assert math.isfinite(v), (k, v)


def chat_prompts(tok, questions):
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]


def compare_with_transformers(folder, questions, new_tokens):
    """minirl's greedy KV-cache decoding of `folder` (all prompts in one left-padded batch, no
    stop token) against transformers: same tokens as its generate, same log-probs as its full
    forward. Returns the largest log-prob difference."""
    tok = minirl.load_tokenizer(folder)
    prompts = chat_prompts(tok, questions)
    assert len(set(map(len, prompts))) > 1  # rows of different lengths share the batch
    mine = minirl.load_model(folder, device="cpu", dtype=torch.float32)
    out = minirl.generate(mine, prompts, n=1, max_new_tokens=new_tokens, temperature=0.0,
                          return_logprobs=True)
    del mine
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # compare every token, past an end of turn too
    worst = 0.0
    for p, (c,) in zip(prompts, out):
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id)[0, len(p):]
            logits = hf(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1]  # [T, V]
        assert c.token_ids == ref.tolist(), (tok.decode(c.token_ids), tok.decode(ref.tolist()))
        ref_lp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        diff = (torch.tensor(c.logprobs, dtype=torch.float64) - ref_lp).abs().max().item()
        assert diff <= LOGPROB_TOL, (questions, diff)
        worst = max(worst, diff)
    return worst


def test_kv_cache_decode_logprobs_equal_transformers(smollm2_dir):
    """The base model, 24 greedy tokens for 3 prompts of different lengths: tokens and
    log-probs of the sampler's prefill + KV-cache decode equal transformers'."""
    compare_with_transformers(smollm2_dir, ["What is 17 * 23?", "Write a haiku about the sea.",
                                            "The capital of France is"], 24)


def test_train_grpo_real_model(grpo_run, smollm2_dir):
    out, stdout = grpo_run
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert_finite(m)
        assert m["groups_kept"] == 2 and 0 < m["len_mean"] <= 8
    assert any(m["grad_norm"] > 0 for m in metrics)  # a real update happened
    assert "final model:" in stdout
    from safetensors.torch import load_file
    trained, base = load_file(out / "final" / "model.safetensors"), load_file(os.path.join(smollm2_dir, "model.safetensors"))
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    compare_with_transformers(out / "final", ["What is 12 + 30?", "Name three fruits."], 16)


def test_train_sft_real_model(sft_run):
    out, stdout = sft_run
    metrics = [m for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert_finite(m)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # 3 steps on 6 examples at lr 1e-4 learn them
    compare_with_transformers(out / "final", ["Say hello.", "What is 10 - 4?"], 16)


def test_evaluate_sample_and_report_real_model(smollm2_dir, files):
    samples, report = files / "samples.jsonl", files / "report"
    run_script("evaluate.py", "sample", "--model", smollm2_dir, "--template", "boxed",
               "--data", files / "math.jsonl", "--n", 2, "--max-new-tokens", 8, "--out", samples)
    rows = read_metrics(samples)
    assert len(rows) == 2 * len(MATH)
    for r in rows:  # each response graded as the grader grades it
        assert 0 < r["num_tokens"] <= 8
        assert r["correct"] == minirl.grade(r["response"], r["gold"]).correct
    run_script("evaluate.py", "report", samples, "--out", report, "--bootstrap", 50)
    with open(report / "report.json") as f:
        (model,) = json.load(f)["models"]
    assert model["num_problems"] == len(MATH) and model["n"] == 2
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert model["accuracy"]["mean"] == pytest.approx(mean([r["correct"] for r in rows]))
    assert model["truncation_rate"] == pytest.approx(mean([r["finish_reason"] == "length" for r in rows]))
    assert model["no_answer_rate"] == pytest.approx(mean([r["answer"] is None for r in rows]))
    assert (report / "report.md").exists()
