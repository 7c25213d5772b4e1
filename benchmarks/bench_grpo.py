"""Benchmark: one GRPO step, measured phase by phase, with a naive log-prob path as the peer.

    python benchmarks/bench_grpo.py                     # GPU: random bf16 Qwen2.5-0.5B / 1.5B shapes; CPU: tiny-arith
    python benchmarks/bench_grpo.py --preset cpu --threads 1
    python benchmarks/bench_grpo.py --preset gpu --models qwen2.5-1.5b --steps 2

One step is what train_grpo.py does, through the same library calls:
  1. generation  minirl.generate: P prompts x n samples (KV cache; CUDA graphs on GPU),
                 then rewards and group advantages (grpo.group_advantages);
  2. log-probs   grpo.completion_logprobs under torch.no_grad over grpo.micro_batches: the
                 old log-probs (the policy) and, with --beta > 0, the reference log-probs
                 (a frozen copy of the initial policy);
  3. training    grpo.policy_loss over grpo.micro_batches (fused linear log-probs: no
                 [tokens, vocab] logits), backward, grad-norm clipping, MasterAdamW step.
Then the peer, in the same step on the same samples: the training phase again, with the
policy's log-probs computed the naive way (full [B, T, V] fp32 logits, log_softmax, gather;
entropy from the same tensor, detached) and everything else identical (grpo_token_loss,
aggregation, backward, clipping, optimizer step). The ratio naive / minirl training time is
printed. The peer's optimizer step also updates the model (the same work as the minirl one);
the model therefore takes two updates per benchmark step, which does not change the cost.
An OOM of either training path is caught and reported as such.

Measured per phase: wall seconds (median over the measured steps; --warmup steps first,
not counted; on CPU also the process CPU seconds), tokens/s (generation: generated tokens;
log-probs and training: prompt + completion tokens, as train_grpo.py counts them, once per
model pass: twice in the log-prob phase when there is a reference model), and peak memory:
  GPU: torch.cuda.max_memory_allocated over the phase (absolute: weights, optimizer state,
       the reference model and activations all count), step peak = the max over phases 1-3;
  CPU: the process peak RSS (resource.getrusage) during the phase minus the RSS before it;
       the peak is reset before each phase by writing 5 to /proc/self/clear_refs (Linux);
       step peak = the peak over phases 1-3 minus the RSS before the step.
On GPU also the training-phase MFU = 6 * params * training tokens / seconds / peak dense bf16
FLOP/s of the device (table below; "unknown" for other devices unless --peak-tflops). The
6 * params convention counts every parameter (embeddings included) and ignores attention's
quadratic term and the recomputation of gradient checkpointing.

Presets:
  gpu  random-weight bf16 models of Qwen2.5-0.5B and -1.5B shape; 8 prompts (random ids,
       --prompt-len tokens) x 8 samples x 2048 new tokens, length forced (no stop tokens);
       gradient checkpointing on; micro-batches of 16384 tokens (train_grpo.py's GPU
       default); Dr. GRPO loss (seq-mean-token-sum-norm, no std); random 0/1 rewards.
  cpu  the bundled tiny model (assets/tiny-arith, fp32) on arithmetic problems (levels 1-4),
       16 prompts x 8 samples x at most 64 new tokens with its real stop token; rewards from
       the task's verifier; train_grpo.py's demo settings (token-mean, group std, lr 2e-4);
       micro-batches of 4096 tokens; no gradient checkpointing.
Both: temperature 1.0, no top-k / top-p, eps 0.2 / 0.2, the old log-probs of the rollout
policy (off-policy form, as with several mini-batches), beta --beta with the k3 estimator.
Speed does not depend on the weights' values, except through completion lengths on CPU.
"""
import argparse
import copy
import gc
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import minirl  # noqa: E402
from minirl import grpo, tasks  # noqa: E402
from minirl.common import BUNDLED_MODEL, device_description, parse_dtype  # noqa: E402
from minirl.losses import grpo_token_loss  # noqa: E402
from minirl.model import ModelConfig, Transformer  # noqa: E402
from minirl.training import MasterAdamW, grad_norm_and_finite  # noqa: E402

QWEN_COMMON = dict(model_type="qwen2", vocab_size=151936, num_key_value_heads=2, rms_norm_eps=1e-6,
                   max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True)
MODELS = {  # config.json of the releases (model_type qwen2: bias on q/k/v)
    "qwen2.5-0.5b": dict(QWEN_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14),
    "qwen2.5-1.5b": dict(QWEN_COMMON, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12),
}
PRESETS = {
    "gpu": dict(models=["qwen2.5-0.5b", "qwen2.5-1.5b"], prompts=8, samples=8, max_new_tokens=2048,
                prompt_len=128, stop=False, gradient_checkpointing=True, micro_batch_tokens=16384,
                aggregation="seq-mean-token-sum-norm", advantage_std="none", lr=1e-6, steps=2, warmup=1),
    "cpu": dict(models=["tiny-arith"], prompts=16, samples=8, max_new_tokens=64, prompt_len=None,
                stop=True, gradient_checkpointing=False, micro_batch_tokens=4096,
                aggregation="token-mean", advantage_std="group", lr=2e-4, steps=5, warmup=1),
}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, by device name


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"gpu preset: which shapes ({', '.join(MODELS)}); default: the preset's")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: gpu 2, cpu 5)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: gpu 2048, cpu 64")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="default: gpu 16384, cpu 4096")
    p.add_argument("--beta", type=float, default=0.04,
                   help="KL weight; > 0 loads a reference model and adds its log-prob pass, 0 skips both")
    p.add_argument("--no-naive", action="store_true", help="skip the naive full-logits peer")
    p.add_argument("--dtype", default=None, help="bf16 | fp32: the bundled model's dtype (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, for MFU")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args()


# ----------------------------------------------------------------------------- measuring

def current_rss():
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak_rss():
    """Make the peak RSS (ru_maxrss) restart from the current RSS; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phase:
    """Times one phase (wall and process CPU seconds) and tracks its peak memory."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_was_reset = reset_peak_rss()
            self.rss_before = current_rss()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_abs = torch.cuda.max_memory_allocated(self.device)
            self.peak = self.peak_abs
        else:
            self.peak_abs = peak_rss()
            self.peak = max(0, self.peak_abs - self.rss_before)  # RSS counters lag a few pages
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0
        return False


# ----------------------------------------------------------------------------- setup

def build_setup(name, preset, args, device):
    """(model, prompts [list of id lists], problems or None, tokenizer or None, stop ids, pad id)."""
    if name == "tiny-arith":
        model = minirl.load_model(BUNDLED_MODEL, device=device, dtype=parse_dtype(args.dtype) or torch.float32)
        tok = minirl.load_tokenizer(BUNDLED_MODEL)
        problems = tasks.make_problems("arithmetic", preset["prompts"] * (args.warmup + args.steps),
                                       seed=0, levels=[1, 2, 3, 4])
        prompts = [tok.encode(p.question) for p in problems]
        return model, prompts, problems, tok, tok.eos_token_ids, tok.pad_token_id
    cfg = ModelConfig.from_hf(MODELS[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model.init_weights(0.02)
    model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    n = preset["prompts"] * (args.warmup + args.steps)
    prompts = torch.randint(3, cfg.vocab_size, (n, preset["prompt_len"]), generator=g).tolist()
    return model, prompts, None, None, None, 0


# ----------------------------------------------------------------------------- the step's parts

def rollout(model, prompts, problems, tok, stop_ids, preset, args, step):
    """Generate, reward, and return the samples with their advantages (phase 1)."""
    model.eval()
    with torch.no_grad():
        groups = minirl.generate(model, prompts, n=preset["samples"], max_new_tokens=args.max_new_tokens,
                                 temperature=1.0, stop_token_ids=stop_ids if preset["stop"] else None,
                                 seed=1000 + step, return_logprobs=True)
    if problems is not None:
        rewards = [[tasks.verify(p, tok.decode(c.token_ids)) for c in grp] for p, grp in zip(problems, groups)]
        rewards = torch.tensor(rewards)  # [P, n]
    else:  # random weights: no verifier; random 0/1 rewards give non-zero advantages
        rewards = torch.randint(0, 2, (len(prompts), preset["samples"]),
                                generator=torch.Generator().manual_seed(step)).float()
    adv = grpo.group_advantages(rewards, preset["advantage_std"])
    samples = [grpo.Sample(list(p), list(c.token_ids), a, sampler_logprobs=torch.as_tensor(c.logprobs).float())
               for p, grp, row in zip(prompts, groups, adv.tolist()) for c, a in zip(grp, row)]
    return samples, float(rewards.mean())


def old_and_ref_logprobs(model, ref_model, samples, pad_id, micro_tokens):
    """Phase 2: the old (and reference) log-probs of every completion, under no_grad."""
    model.train()
    with torch.no_grad():
        for mb in grpo.micro_batches(samples, micro_tokens):
            lp, m = grpo.completion_logprobs(model, mb, pad_id)
            for s, row, mm in zip(mb, lp, m):
                s.old_logprobs = row[mm].float()
            if ref_model is not None:
                lp, m = grpo.completion_logprobs(ref_model, mb, pad_id)
                for s, row, mm in zip(mb, lp, m):
                    s.ref_logprobs = row[mm].float()


def sampler_trainer_mismatch(samples):
    """train_grpo.py's mismatch metrics: the sampler's log-probs against the trainer's old
    log-probs (temperature 1, no top-k/top-p here), over all completion tokens."""
    old = torch.cat([s.old_logprobs.cpu() for s in samples])
    sampler = torch.cat([s.sampler_logprobs.cpu() for s in samples])
    st = grpo.mismatch_stats(old, sampler, torch.ones_like(old, dtype=torch.bool))
    n = float(st["mismatch_tokens"])
    return {"k3": float(st["mismatch_k3_sum"]) / n, "abs_mean": float(st["mismatch_abs_sum"]) / n,
            "abs_max": float(st["mismatch_abs_max"]), "frac_gt_0.1": float(st["mismatch_big_sum"]) / n}


def naive_completion_logprobs(model, samples, pad_id, temperature=1.0):
    """grpo.completion_logprobs the naive way: full fp32 logits [B, T, V], log_softmax, gather."""
    ids, pred_pos, targets, mask = grpo.batch_tensors(samples, pad_id, next(model.parameters()).device)
    logits = model(ids)  # [B, T, V] fp32 (matmul in the weights' dtype, then .float())
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # [B, T, V]
    next_lp = logp_all[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # [B, T-1]: log p(ids[b, t+1])
    next_lp = torch.nn.functional.pad(next_lp, (0, 1))  # [B, T], so pred_pos (b*T + t) indexes it
    rows = pred_pos[mask]  # [M] flat positions predicting the completion tokens
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
    logp = logp.masked_scatter(mask, next_lp.reshape(-1).index_select(0, rows))  # [B, Tc]
    with torch.no_grad():
        sel = logp_all.reshape(-1, logp_all.shape[-1]).index_select(0, rows)  # [M, V]
        ent = torch.zeros_like(logp).masked_scatter(mask, -(sel.exp() * sel).sum(-1))
    return logp, mask, ent


def naive_policy_loss(model, samples, *, pad_id, temperature, eps_low, eps_high, beta, kl_estimator,
                      aggregation, num_sequences, num_tokens, norm_length, on_policy, backend=None):
    """grpo.policy_loss with naive_completion_logprobs; everything else is the same code."""
    logp, mask, entropy = naive_completion_logprobs(model, samples, pad_id, temperature)
    device, width = logp.device, logp.shape[1]
    old = logp.detach() if on_policy else grpo.pad_rows([s.old_logprobs for s in samples], width, device)
    ref = grpo.pad_rows([s.ref_logprobs for s in samples], width, device) if beta > 0 else None
    loss_mask = mask & torch.tensor([s.loss_mask for s in samples], device=device)[:, None]
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device)
    per_token, stats = grpo_token_loss(logp, old, adv, loss_mask, eps_low, eps_high, ref_logp=ref,
                                       beta=beta, kl_estimator=kl_estimator, backend=backend)
    loss = grpo.aggregate(per_token, loss_mask, aggregation, num_sequences, num_tokens, norm_length)
    stats["entropy_sum"] = (entropy * mask).sum()
    stats["n_completion_tokens"] = mask.sum()
    return loss, stats


def train(model, optimizer, samples, loss_fn, pad_id, preset, args, skip_zero=True):
    """Phase 3: loss over micro-batches, backward, clipping, optimizer step. -> (tokens, loss).
    With beta = 0, samples whose advantage is 0 are skipped as train_grpo.py does (same
    denominators, same update) unless skip_zero is False."""
    model.train()
    num_seq, num_tok = len(samples), sum(len(s.completion_ids) for s in samples)
    if args.beta == 0 and skip_zero:
        samples = [s for s in samples if s.advantage != 0]
    tokens, loss_sum = 0, 0.0
    optimizer.zero_grad()
    for mb in grpo.micro_batches(samples, args.micro_batch_tokens):
        loss, _ = loss_fn(model, mb, pad_id=pad_id, temperature=1.0, eps_low=0.2, eps_high=0.2,
                          beta=args.beta, kl_estimator="k3", aggregation=preset["aggregation"],
                          num_sequences=num_seq, num_tokens=num_tok, norm_length=args.max_new_tokens,
                          on_policy=False)
        loss.backward()
        loss_sum += loss.item()  # one sync per micro-batch, as train_grpo.py
        tokens += sum(len(s.prompt_ids) + len(s.completion_ids) for s in mb)
    grad_norm_and_finite(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return tokens, loss_sum


def check_naive_matches(model, samples, pad_id):
    """Largest |log-prob difference| between the fused and the naive path, on one micro-batch."""
    mb = min(grpo.micro_batches(samples, 4096), key=len)[:4]
    model.train()
    with torch.no_grad():
        a, mask = grpo.completion_logprobs(model, mb, pad_id)
        b, _, _ = naive_completion_logprobs(model, mb, pad_id)
    return float((a - b)[mask].abs().max())


# ----------------------------------------------------------------------------- one model

def bench_model(name, preset, args, device):
    model, prompts, problems, tok, stop_ids, pad_id = build_setup(name, preset, args, device)
    model.gradient_checkpointing = preset["gradient_checkpointing"]
    ref_model = None
    if args.beta > 0:
        ref_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = MasterAdamW(model.parameters(), lr=preset["lr"], betas=(0.9, 0.999))
    params = sum(p.numel() for p in model.parameters())
    P = preset["prompts"]
    rec = {"model": name, "params": params, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
           "steps": []}
    for step in range(args.warmup + args.steps):
        step_prompts = prompts[step * P:(step + 1) * P]
        step_problems = problems[step * P:(step + 1) * P] if problems is not None else None
        rss_step = current_rss() if device.type == "cpu" else None
        s = {"measured": step >= args.warmup}
        with Phase(device) as ph:
            samples, reward = rollout(model, step_prompts, step_problems, tok, stop_ids, preset, args, step)
        gen_tokens = sum(len(x.completion_ids) for x in samples)
        train_tokens = sum(len(x.prompt_ids) + len(x.completion_ids) for x in samples)
        s["generation"] = phase_record(ph, gen_tokens)
        s.update(reward_mean=reward, completion_len_mean=gen_tokens / len(samples),
                 truncated_frac=sum(len(x.completion_ids) == args.max_new_tokens for x in samples) / len(samples))
        peaks = [s["generation"].pop("peak_abs")]
        with Phase(device) as ph:
            old_and_ref_logprobs(model, ref_model, samples, pad_id, args.micro_batch_tokens)
        s["logprobs"] = phase_record(ph, train_tokens * (2 if ref_model is not None else 1))
        s["mismatch"] = sampler_trainer_mismatch(samples)
        peaks.append(s["logprobs"].pop("peak_abs"))
        if step == 0 and not args.no_naive:
            try:
                s["naive_max_abs_logprob_diff"] = check_naive_matches(model, samples, pad_id)
            except torch.cuda.OutOfMemoryError:
                s["naive_max_abs_logprob_diff"] = "OOM"
                torch.cuda.empty_cache()
        s["training"] = timed_training(model, optimizer, samples, grpo.policy_loss, pad_id, preset, args, device)
        if "peak_abs" in s["training"]:
            peaks.append(s["training"].pop("peak_abs"))
        s["zero_adv_frac"] = sum(x.advantage == 0 for x in samples) / len(samples)
        if args.beta == 0:  # the same update without skipping the zero-advantage samples
            s["training_all_samples"] = timed_training(model, optimizer, samples, grpo.policy_loss, pad_id,
                                                       preset, args, device, skip_zero=False)
            s["training_all_samples"].pop("peak_abs", None)
        s["step_peak_mem"] = max(peaks) if device.type == "cuda" else max(0, max(peaks) - rss_step)
        if not args.no_naive:
            s["naive_training"] = timed_training(model, optimizer, samples, naive_policy_loss, pad_id,
                                                 preset, args, device)
            s["naive_training"].pop("peak_abs", None)
        rec["steps"].append(s)
        print(f"  {name} step {step + 1}/{args.warmup + args.steps}{'' if s['measured'] else ' (warm-up)'}: "
              f"gen {s['generation']['seconds']:.2f}s logprobs {s['logprobs']['seconds']:.2f}s "
              f"train {fmt_seconds(s['training'])} naive {fmt_seconds(s.get('naive_training'))} | "
              f"len {s['completion_len_mean']:.1f} reward {reward:.3f} zero-adv {s['zero_adv_frac']:.2f} | "
              f"mismatch k3 {s['mismatch']['k3']:.2e} max |log-ratio| {s['mismatch']['abs_max']:.2e} "
              f">0.1: {s['mismatch']['frac_gt_0.1']:.3f}"
              + (f" | train CPU s: skipping {s['training']['cpu_seconds']:.2f}, without skipping "
                 f"{s['training_all_samples']['cpu_seconds']:.2f}" if args.beta == 0 else ""),
              flush=True)
    del model, ref_model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def phase_record(ph, tokens):
    return {"seconds": ph.seconds, "cpu_seconds": ph.cpu_seconds, "tokens": tokens,
            "tokens_per_s": tokens / ph.seconds, "peak_mem": ph.peak, "peak_abs": ph.peak_abs}


def timed_training(model, optimizer, samples, loss_fn, pad_id, preset, args, device, skip_zero=True):
    try:
        with Phase(device) as ph:
            tokens, loss = train(model, optimizer, samples, loss_fn, pad_id, preset, args, skip_zero)
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad()
        gc.collect()
        torch.cuda.empty_cache()
        return {"oom": True}
    out = phase_record(ph, tokens)
    out["loss"] = loss
    return out


def fmt_seconds(r):
    if r is None:
        return "-"
    return "OOM" if r.get("oom") else f"{r['seconds']:.2f}s"


# ----------------------------------------------------------------------------- report

def median_of(steps, phase, key):
    vals = [s[phase][key] for s in steps if phase in s and not s[phase].get("oom")]
    return statistics.median(vals) if vals else None


def report(rec, device, dev_name, preset, args):
    steps = [s for s in rec["steps"] if s["measured"]]
    gpu = device.type == "cuda"
    unit = "GB" if gpu else "MB"
    scale = 1e9 if gpu else 1e6
    mem_name = "peak GPU mem allocated" if gpu else "peak RSS over the RSS before"
    print(f"\n{rec['model']}: {rec['params'] / 1e6:.2f}M params, {rec['dtype']}; {preset['prompts']} prompts x "
          f"{preset['samples']} samples, <= {args.max_new_tokens} new tokens "
          f"({'real stop tokens' if preset['stop'] else 'length forced, no stop tokens'}); "
          f"micro-batches of {args.micro_batch_tokens} tokens; gradient checkpointing "
          f"{'on' if preset['gradient_checkpointing'] else 'off'}; beta {args.beta}"
          f"{' (reference model + pass)' if args.beta > 0 else ''}; medians of {len(steps)} measured steps "
          f"after {args.warmup} warm-up")
    print(f"mean completion length {statistics.median(s['completion_len_mean'] for s in steps):.1f} tokens "
          f"(median over steps), truncated {statistics.median(s['truncated_frac'] for s in steps):.0%}")
    print(f"| phase | seconds | {'' if gpu else 'CPU seconds | '}tokens | tokens/s | {mem_name} ({unit}) |")
    print("|---|---|---|---|---|" + ("" if gpu else "---|"))
    rows = [("generation", "generation"), ("old/ref log-probs", "logprobs"), ("training (minirl, fused)", "training"),
            ("training (naive full logits, peer)", "naive_training")]
    for label, key in rows:
        if not any(key in s for s in steps):
            continue
        if median_of(steps, key, "seconds") is None:
            print(f"| {label} | OOM | {'' if gpu else '- | '}- | - | OOM |")
            continue
        cpu_col = "" if gpu else f"{median_of(steps, key, 'cpu_seconds'):.3f} | "
        print(f"| {label} | {median_of(steps, key, 'seconds'):.3f} | {cpu_col}{median_of(steps, key, 'tokens'):,.0f} | "
              f"{median_of(steps, key, 'tokens_per_s'):,.0f} | {median_of(steps, key, 'peak_mem') / scale:.2f} |")
    total = statistics.median(s["generation"]["seconds"] + s["logprobs"]["seconds"] + s["training"].get("seconds", float("nan"))
                              for s in steps)
    step_mem = statistics.median(s["step_peak_mem"] for s in steps)
    print(f"step (generation + log-probs + minirl training): {total:.3f} s; step peak memory "
          f"{step_mem / scale:.2f} {unit}")
    summary = {"model": rec["model"], "params": rec["params"], "step_seconds": total, "step_peak_mem_bytes": step_mem}
    for key in ("generation", "logprobs", "training", "naive_training"):
        summary[key] = {k: median_of(steps, key, k) for k in ("seconds", "cpu_seconds", "tokens", "tokens_per_s", "peak_mem")}
    t_train = median_of(steps, "training", "seconds")
    if gpu and t_train:
        peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
            (v for k, v in PEAK_FLOPS.items() if k in dev_name), None)
        flops = 6 * rec["params"] * median_of(steps, "training", "tokens") / t_train
        mfu = f"{flops / peak:.1%}" if peak else "unknown"
        summary["training_mfu"] = flops / peak if peak else None
        print(f"training-phase MFU (6 x params x tokens / s / peak bf16): {mfu} ({flops / 1e12:.0f} TFLOP/s)")
    if "naive_training" in steps[0]:
        t_naive = median_of(steps, "naive_training", "seconds")
        if t_naive is None:
            print("naive full-logits training: out of memory (torch.cuda.OutOfMemoryError)")
        elif t_train:
            m_fused, m_naive = median_of(steps, "training", "peak_mem"), median_of(steps, "naive_training", "peak_mem")
            print(f"naive / minirl training time: {t_naive / t_train:.2f}x; peak memory naive "
                  f"{m_naive / scale:.2f} {unit} vs minirl {m_fused / scale:.2f} {unit}")
        diff = rec["steps"][0].get("naive_max_abs_logprob_diff")
        if diff is not None:
            print(f"check (warm-up step, one micro-batch): max |log-prob fused - naive| = {diff}")
    return summary


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset_name = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[preset_name]
    device = torch.device("cuda" if preset_name == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--preset gpu needs CUDA")
    for flag in ("steps", "warmup", "max_new_tokens", "micro_batch_tokens"):
        if getattr(args, flag) is None:
            setattr(args, flag, preset[flag])
    models = args.models or preset["models"]
    if preset_name == "gpu" and any(m not in MODELS for m in models):
        sys.exit(f"--models: choose from {', '.join(MODELS)}")
    dev_name = device_description(device)
    print(f"device: {dev_name}; torch {torch.__version__}; preset {preset_name}", flush=True)
    if device.type == "cpu" and not reset_peak_rss():
        print("note: /proc/self/clear_refs not writable: CPU peaks are process-lifetime peaks", flush=True)
    results = []
    for name in models:
        rec = bench_model(name, preset, args, device)
        results.append({"summary": report(rec, device, dev_name, preset, args), "raw": rec})
    if device.type == "cpu":
        print(f"(1-minute load average at the end: {os.getloadavg()[0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "preset": preset_name, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
