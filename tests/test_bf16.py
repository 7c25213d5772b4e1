"""The GPU dtype path (bf16 weights, fp32 master weights in the optimizer) run on the CPU.

What a GPU run does differently from the CPU default is mostly the dtype, and that part runs
here: train_grpo.py / train_sft.py with --dtype bf16 (finite, fp32 master, the saved bf16
weights equal to the master rounded to nearest, exact resume), the sampler in bf16 against
fp32, and MasterAdamW's fused update against torch's per-tensor AdamW.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import minirl
from minirl.common import BUNDLED_MODEL
from minirl.training import MasterAdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"t_gen", "t_train", "gen_tok_s", "train_tok_s", "tokens_per_s", "time_s"}

# A reward with spread in every group (the bundled model's answers at 24 tokens are
# mostly wrong, so a correctness reward would give zero advantages and no update at all).
REWARD_FILE = '''
def spread(response, problem):
    return float(len(response) % 5) + 0.1 * response.count("1")
'''


def run_script(script, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, flags)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    if proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def grpo_flags(tmp_path, out, steps, device="cpu"):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_FILE)
    return ["--dtype", "bf16", "--device", device, "--steps", steps, "--prompts-per-step", 4,
            "--num-samples", 4, "--max-new-tokens", 24, "--train-problems", 64, "--eval-problems", 0,
            "--reward", f"{reward}:spread", "--lr", 1e-4, "--warmup-steps", 0, "--save-every", 1,
            "--out", out, "--seed", 5]


def sft_flags(out, steps, device="cpu"):
    return ["--dtype", "bf16", "--device", device, "--max-steps", steps, "--train-problems", 64,
            "--max-len", 128, "--batch-tokens", 512, "--tokens-per-micro-batch", 256,
            "--lr", 1e-4, "--warmup-steps", 0, "--eval-every", 0, "--save-every", 1,
            "--out", out, "--seed", 5]


def last_checkpoint(out):
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    return os.path.join(out, "checkpoints", ckpts[-1])


def check_master_and_weights(ckpt):
    """The checkpoint's master weights are fp32, and its saved bf16 weights are exactly the
    master rounded to nearest bf16. Returns (names, master list)."""
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=True)
    master = state["optimizer"]["master"]
    saved = load_file(os.path.join(ckpt, "model", "model.safetensors"))
    model = minirl.load_model(os.path.join(ckpt, "model"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(master) == len(names)
    for name, m in zip(names, master):
        assert m.dtype == torch.float32, name
        assert saved[name].dtype == torch.bfloat16, name
        assert torch.isfinite(m).all(), name
        assert torch.equal(saved[name], m.to(torch.bfloat16)), name
    return names, master


def check_moved(names, master):
    """The update did something: the master differs from the initial (fp32) weights, and in
    places by less than bf16 can show (what the master exists for)."""
    init = load_file(os.path.join(BUNDLED_MODEL, "model.safetensors"))
    moved = sum(int((m != init[n].float()).sum()) for n, m in zip(names, master))
    assert moved > 0
    hidden = sum(int(((m != init[n].float()) & (m.to(torch.bfloat16) == init[n].to(torch.bfloat16))).sum())
                 for n, m in zip(names, master))
    assert hidden > 0


# ------------------------------------------------------------------- training scripts


def test_grpo_bf16_two_steps(tmp_path):
    out = tmp_path / "grpo"
    run_script("train_grpo.py", *grpo_flags(tmp_path, out, 2))
    recs = metrics(out)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["skipped_updates"] == 0 and r["zero_std_frac"] < 1
    names, master = check_master_and_weights(last_checkpoint(out))
    check_moved(names, master)
    final = load_file(os.path.join(out, "final", "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in final.values())


def test_sft_bf16_two_steps(tmp_path):
    out = tmp_path / "sft"
    run_script("train_sft.py", *sft_flags(out, 2))
    steps = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    names, master = check_master_and_weights(last_checkpoint(out))
    check_moved(names, master)


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


def _same_checkpoints(a, b):
    sa = torch.load(os.path.join(a, "trainer_state.pt"), map_location="cpu", weights_only=True)
    sb = torch.load(os.path.join(b, "trainer_state.pt"), map_location="cpu", weights_only=True)
    for x, y in zip(sa["optimizer"]["master"], sb["optimizer"]["master"]):
        assert torch.equal(x, y)
    for k, st in sa["optimizer"]["opt"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[name], sb["optimizer"]["opt"]["state"][k][name])
    wa = load_file(os.path.join(a, "model", "model.safetensors"))
    wb = load_file(os.path.join(b, "model", "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("script", ["train_grpo.py", "train_sft.py"])
def test_bf16_resume_is_exact(tmp_path, script):
    flags = (lambda out: grpo_flags(tmp_path, out, 3)) if script == "train_grpo.py" else \
        (lambda out: sft_flags(out, 3))
    run_script(script, *flags(tmp_path / "a"))
    run_script(script, *flags(tmp_path / "b"), "--stop-after", 1)
    run_script(script, *flags(tmp_path / "b"), "--resume")
    assert _strip(metrics(tmp_path / "a")) == _strip(metrics(tmp_path / "b"))
    _same_checkpoints(last_checkpoint(tmp_path / "a"), last_checkpoint(tmp_path / "b"))


# ------------------------------------------------------------------- sampler


def _prompts(tok, n=12):
    return [tok.encode(f"{a}+{b}=") for a, b in zip(range(3, 3 + n), range(40, 40 + 7 * n, 7))]


def _agreement(m32, prompts, rows_a, rows_b):
    """Tokens two greedy decodings share from the start of each row. Where a row diverges,
    fp32's top-2 logit gap there must be within bf16's rounding of the logits (2e-2 of the
    largest: a near-tie, where either token is a correct argmax). Returns (shared, total)."""
    shared = 0
    for p, a, b in zip(prompts, rows_a, rows_b):
        n = min(len(a), len(b))
        same = next((t for t in range(n) if a[t] != b[t]), n)
        shared += same
        if same < n:
            with torch.no_grad():
                logits = m32(torch.tensor([p + a[:same]]))[0, -1]  # [V]
            top2 = logits.topk(2).values
            assert float(top2[0] - top2[1]) <= 2e-2 * float(logits.abs().max()), (p, same)
    return shared, sum(len(a) for a in rows_a)


def test_sampler_bf16_greedy_matches_fp32():
    """Greedy decoding of the bundled model in bf16 against fp32: rows agree except after a
    near-tie, and the greedy log-probs of the shared tokens are within bf16's error of fp32's
    (bf16 logits carry ~2e-2 relative error of the largest logit; a log-prob is a difference
    of two such numbers)."""
    tok = minirl.load_tokenizer(BUNDLED_MODEL)
    m32 = minirl.load_model(BUNDLED_MODEL, dtype=torch.float32)
    m16 = minirl.load_model(BUNDLED_MODEL, dtype=torch.bfloat16)
    prompts = _prompts(tok)
    kw = dict(n=1, max_new_tokens=16, temperature=0.0, return_logprobs=True, use_cuda_graph=False)
    with torch.no_grad():
        r32 = [g[0] for g in minirl.generate(m32, prompts, **kw)]
        r16 = [g[0] for g in minirl.generate(m16, prompts, **kw)]
    shared, total = _agreement(m32, prompts, [c.token_ids for c in r32], [c.token_ids for c in r16])
    assert shared >= 0.5 * total
    for p, a, b in zip(prompts, r32, r16):
        same = next((t for t in range(len(a.token_ids)) if a.token_ids[t] != b.token_ids[t]), len(a.token_ids))
        if same:
            with torch.no_grad():
                biggest = float(m32(torch.tensor([p + a.token_ids[:same]])).abs().max())
            err = (torch.tensor(b.logprobs[:same]) - torch.tensor(a.logprobs[:same])).abs().max()
            assert float(err) <= 2 * 2e-2 * biggest, (p, float(err), biggest)


def test_sampler_bf16_static_path_matches_eager():
    """The CUDA-graph decode loop's bookkeeping (bucket padding, width buckets, on-device
    stops), run eagerly on CPU in bf16, against the plain loop: the same greedy tokens except
    after a near-tie (padding the batch and the cache width changes bf16 rounding)."""
    tok = minirl.load_tokenizer(BUNDLED_MODEL)
    m32 = minirl.load_model(BUNDLED_MODEL, dtype=torch.float32)
    model = minirl.load_model(BUNDLED_MODEL, dtype=torch.bfloat16)
    prompts = _prompts(tok, 6)
    kw = dict(n=3, max_new_tokens=20, temperature=0.0, stop_token_ids=tok.eos_token_ids)
    with torch.no_grad():
        eager = minirl.generate(model, prompts, use_cuda_graph=False, **kw)
        static = minirl.generate(model, prompts, static_shapes=True, **kw)
    rows_p = [p for p in prompts for _ in range(3)]
    shared, total = _agreement(m32, rows_p, [c.token_ids for g in eager for c in g],
                               [c.token_ids for g in static for c in g])
    assert shared >= 0.5 * total
    # The n samples of one prompt are the same greedy row: identical in each mode.
    for g in eager + static:
        assert all(c.token_ids == g[0].token_ids for c in g)


# ------------------------------------------------------------------- MasterAdamW


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 13), (13,), (3, 5, 2), (1,), (64, 33)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_master_adamw_fused_matches_per_tensor_adamw(dtype):
    """MasterAdamW (fused AdamW on fp32 masters) gives the weights torch's per-tensor AdamW
    (foreach=False, the previous path) gives on fp32 copies, within fp32 rounding, after 5
    steps with weight decay on matrices only; bf16 weights are the rounded masters."""
    params = _params(dtype)
    ref = [p.detach().float().clone().requires_grad_() for p in params]
    opt = MasterAdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert opt.fused and all(g["fused"] for g in opt.param_groups)
    ref_opt = torch.optim.AdamW([{"params": [r for r in ref if r.dim() >= 2], "weight_decay": 0.1},
                                 {"params": [r for r in ref if r.dim() < 2], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for step in range(5):
        for p, r, g in zip(params, ref, _grads(params, step)):
            p.grad, r.grad = g.clone(), g.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    for p, m, r in zip(params, opt.master, ref):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-6)
        assert torch.equal(p.detach(), m.detach().to(dtype))


def test_master_adamw_resumes_a_state_saved_unfused():
    """A state saved by the per-tensor optimizer (fused=None in its groups, as checkpoints
    written before the fused path) loads and continues as an uninterrupted run."""
    a, b = _params(torch.bfloat16), _params(torch.bfloat16)
    opt_a = MasterAdamW(a, lr=1e-2, weight_decay=0.1)
    old = MasterAdamW(b, lr=1e-2, weight_decay=0.1)
    old.opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                 for g in old.opt.param_groups], lr=1e-2, foreach=False)  # the old path
    for step in range(3):
        for p, g in zip(a, _grads(a, step)):
            p.grad = g
        for p, g in zip(b, _grads(b, step)):
            p.grad = g
        opt_a.step()
        if step < 2:
            old.step()
    state = old.state_dict()
    assert all(g["fused"] is None for g in state["opt"]["param_groups"])
    resumed = MasterAdamW(b, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(state)
    assert all(g["fused"] for g in resumed.param_groups)
    for p, g in zip(b, _grads(b, 2)):
        p.grad = g
    resumed.step()
    for x, y in zip(opt_a.master, resumed.master):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
