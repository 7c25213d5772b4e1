"""Benchmark: SFT training throughput and peak memory, packed vs padded batches.

    python benchmarks/bench_sft.py                 # GPU: Qwen2.5-1.5B shape, 8k-token rows; CPU: a tiny model
    python benchmarks/bench_sft.py --preset cpu    # force the CPU setting
    python benchmarks/bench_sft.py --layouts packed --steps 5 --gradient-checkpointing

Both layouts train on the same synthetic data with a realistic spread of lengths (prompt
and response lengths drawn from log-normal distributions, like reasoning traces: many
short, a long tail up to the row length), through exactly the code train_sft.py runs
(minirl.sft: plan_epoch, micro_batches, collate, response_logprobs; MasterAdamW). Each
layout runs in its own subprocess so its peak memory is its own. Reported per layout:
real tokens/s (padding not counted), the fraction of computed positions that are real
tokens, peak memory (CUDA: max allocated; CPU: peak RSS of the process) and, on GPU, MFU:
useful model FLOPs (minirl.sft.model_flops_per_token: matmuls, the lm head on the response
tokens only, causal attention inside each example) per second over the GPU's dense bf16
peak. Random weights: speed does not depend on their values. The first step is a warm-up
and is not timed.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from minirl.model import ModelConfig, Transformer  # noqa: E402
from minirl.sft import (Sequence, collate, mean_causal_context, micro_batches,  # noqa: E402
                        model_flops_per_token, plan_epoch, response_logprobs)
from minirl.training import MasterAdamW  # noqa: E402
from minirl.common import device_description  # noqa: E402

# Qwen2.5-1.5B (config.json of the release): the model size of Kim et al., arXiv 2505.14216.
QWEN25_15B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)
# A small Llama, the scale of the bundled tiny model.
TINY = dict(model_type="llama", vocab_size=64, hidden_size=256, intermediate_size=768,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)

PRESETS = {
    # Reasoning-trace lengths: prompt median ~150, response median ~1500 tokens, tail to 8k.
    "gpu": dict(config=QWEN25_15B, max_len=8192, tokens_per_micro_batch=8192, batch_tokens=65536,
                examples=2000, prompt_median=150, response_median=1500, sigma=0.9, steps=4),
    "cpu": dict(config=TINY, max_len=512, tokens_per_micro_batch=2048, batch_tokens=8192,
                examples=1000, prompt_median=20, response_median=90, sigma=0.8, steps=4),
}
# Dense bf16 peak (no sparsity) by device name; --peak-tflops overrides.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def synthetic_sequences(n, vocab, max_len, prompt_median, response_median, sigma, seed=0):
    """n examples whose prompt and response lengths are log-normal (clipped to fit max_len)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = int(np.clip(rng.lognormal(np.log(prompt_median), 0.5), 4, max_len // 4))
        r = int(np.clip(rng.lognormal(np.log(response_median), sigma), 2, max_len - p))
        ids = rng.integers(3, vocab, p + r).tolist()
        out.append(Sequence(ids, [0] * p + [1] * r, str(i), f"example {i}"))
    return out


def run_layout(args, preset):
    """One layout in this process; returns a dict of measurements."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.from_hf(preset["config"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model.init_weights(0.02)
    model.to(dtype).train()
    model.gradient_checkpointing = args.gradient_checkpointing
    opt = MasterAdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    max_len = preset["max_len"]
    seqs = synthetic_sequences(preset["examples"], cfg.vocab_size, max_len, preset["prompt_median"],
                               preset["response_median"], preset["sigma"])
    lengths = [len(s) for s in seqs]
    steps = plan_epoch(lengths, 0, 0, max_len, max(1, preset["batch_tokens"] // max_len))
    n_steps = min(args.steps or preset["steps"], len(steps) - 1)
    packing = args.layout == "packed"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    real = computed = targets = 0
    used_lengths = []
    t0 = None
    for k in range(n_steps + 1):  # step 0: warm-up, not timed
        if k == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        rows = steps[k]
        n_t = sum(seqs[i].num_targets for row in rows for i in row)
        for mb in micro_batches(rows, lengths, packing, max_len, preset["tokens_per_micro_batch"]):
            batch = collate(seqs, mb, 0, device)
            loss = -response_logprobs(model, batch).sum() / n_t
            loss.backward()
            if k >= 1:
                real += batch.num_tokens
                computed += batch.input_ids.numel()
                targets += batch.num_targets
        float(loss)  # sync, as train_sft.py does once per step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if k >= 1:
            used_lengths += [lengths[i] for row in rows for i in row]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    out = {"layout": args.layout, "device": device_description(device), "steps": n_steps,
           "seconds": round(dt, 3), "tokens": real, "tokens_per_s": real / dt,
           "real_fraction": real / computed, "response_fraction": targets / real,
           "params": sum(p.numel() for p in model.parameters()), "max_len": max_len,
           "tokens_per_micro_batch": preset["tokens_per_micro_batch"],
           "gradient_checkpointing": args.gradient_checkpointing}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        flops = model_flops_per_token(cfg, mean_causal_context(used_lengths), targets / real) * real
        peak = args.peak_tflops or next((v for k_, v in PEAK_TFLOPS.items() if k_ in out["device"]), None)
        out["model_tflops_per_s"] = flops / dt / 1e12
        out["mfu"] = flops / dt / (peak * 1e12) if peak else None
    else:
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB
        out["load_average_1min"] = os.getloadavg()[0]  # other processes on the machine, at the end
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--layouts", default="packed,padded", help="comma-separated: packed, padded")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: the preset's)")
    p.add_argument("--device", default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--layout", default=None, help=argparse.SUPPRESS)  # internal: one layout, JSON out
    args = p.parse_args()
    preset_name = args.preset or ("gpu" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    preset = PRESETS[preset_name]
    if args.layout:
        print(json.dumps(run_layout(args, preset)))
        return
    results = []
    for layout in args.layouts.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--preset", preset_name, "--layout", layout]
        for flag in ("steps", "device", "peak_tflops", "threads"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{layout}: failed\n{r.stderr[-3000:]}")
            continue
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    if not results:
        sys.exit(1)
    first = results[0]
    print(f"device: {first['device']}; preset {preset_name}: {first['params'] / 1e6:.1f}M params, "
          f"rows of {first['max_len']} tokens, {first['tokens_per_micro_batch']} tokens per micro-batch, "
          f"gradient checkpointing {'on' if first['gradient_checkpointing'] else 'off'}; "
          f"{first['steps']} timed steps; response tokens {first['response_fraction']:.0%} of tokens")
    mem_key = "peak_mem_gb" if "peak_mem_gb" in first else "peak_rss_gb"
    mem_name = "peak GPU mem (GB)" if mem_key == "peak_mem_gb" else "peak RSS (GB)"
    print(f"| layout | tokens/s | real/computed positions | {mem_name}"
          f"{' | model TFLOP/s | MFU' if 'mfu' in first else ''} |")
    print("|---|---|---|---|" + ("---|---|" if "mfu" in first else ""))
    for r in results:
        line = f"| {r['layout']} | {r['tokens_per_s']:,.0f} | {r['real_fraction']:.1%} | {r[mem_key]:.2f}"
        if "mfu" in r:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "? (pass --peak-tflops)"
            line += f" | {r['model_tflops_per_s']:.0f} | {mfu}"
        print(line + " |")
    if "load_average_1min" in first:
        print(f"(1-minute load average at the end of each run: "
              f"{', '.join(str(round(r['load_average_1min'], 1)) for r in results)})")
    if len(results) == 2:
        print(f"packed / padded tokens/s: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
