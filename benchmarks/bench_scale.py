"""More than one process: one training step (forward, backward, AdamW) of the FSDP2 path
(minirl.distributed) at N = 1, 2, ... ranks against N = 1 in the same run, and each rank's
memory for parameters + gradients + optimizer state, counted from its local shards.

    python benchmarks/bench_scale.py                 # CPU (gloo): N = 1, 2 on a small Qwen2-shaped model
    python benchmarks/bench_scale.py --gpu           # CUDA (NCCL): N = 1, 2, 4, 8 on Qwen2.5-1.5B shapes

Each N is one `torchrun --standalone --nproc_per_node N` of this file in --worker mode. The
work per step is fixed (--rows rows of --seq tokens, split over the ranks as train_sft.py
splits packed rows), so the ideal is a step time of 1/N and memory of 1/N per rank. Step
time: the median over --steps steps after one warm-up, the slowest rank's wall time (on
CPU also its process CPU time). Memory: bytes of the rank's parameter, gradient and AdamW
(exp_avg, exp_avg_sq) shards, from the tensors themselves (not the allocator).

On a CPU the ranks share the machine's cores (each gets OMP_NUM_THREADS=1), so wall time
measures the split of the work, not a speed-up on hardware that has the cores. Not yet run on
a GPU: the --gpu figures (tokens/s scaling 1 -> 8 GPUs, Qwen2.5-1.5B shapes) are listed as such
until someone with GPUs runs it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    # A Qwen2-shaped model small enough for a CPU step in about a second.
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, qkv_bias=True,
                  tie_word_embeddings=True, model_type="qwen2"),
    # Qwen2.5-1.5B (config.json of Qwen/Qwen2.5-1.5B).
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, head_dim=128, qkv_bias=True,
                         tie_word_embeddings=True, model_type="qwen2", rope_theta=1e6,
                         max_position_embeddings=32768),
}


def worker(args):
    """One rank: build the model, shard it, time --steps steps, write rank 0's figures."""
    import torch

    sys.path.insert(0, ROOT)
    from minirl import distributed
    from minirl.model import ModelConfig, Transformer
    from minirl.training import MasterAdamW
    if not args.gpu:
        torch.set_num_threads(1)
    dist = distributed.init("cuda" if args.gpu else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[args.shape])
    model = Transformer(cfg)
    model.init_weights(0.02, generator=torch.Generator().manual_seed(0))
    n_params = sum(p.numel() for p in model.parameters())
    model.to(dist.device)
    compute = torch.bfloat16 if args.gpu else torch.float32
    model = distributed.shard(model, dist, compute) if dist.on else model.to(compute)
    model.train()
    model.gradient_checkpointing = args.gpu
    optimizer = MasterAdamW(model.parameters(), lr=1e-5)
    rows = torch.randint(0, cfg.vocab_size, (args.rows, args.seq + 1), generator=torch.Generator().manual_seed(1))
    mine = distributed.split(list(range(args.rows)), dist)
    n_targets = args.rows * args.seq  # the global denominator

    memory = {}

    def step():
        for i in range(0, len(mine), args.micro_rows):
            ids = rows[mine[i:i + args.micro_rows]].to(dist.device)  # [b, seq + 1]
            logits = model(ids[:, :-1])  # [b, seq, V] fp32
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            (loss / n_targets).backward()
        if optimizer.opt.state:  # after the first step: parameters, gradients and AdamW state all exist
            memory.update(training_state_bytes(model, optimizer))
        optimizer.step()
        optimizer.zero_grad()

    times, cpu_times = [], []
    for k in range(args.steps + 1):
        distributed.barrier(dist)
        if args.gpu:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if args.gpu:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if k > 0:  # the first step warms up (allocations, optimizer state)
            times.append(distributed.gather(wall, dist))
            cpu_times.append(distributed.gather(cpu, dist))
    memory = distributed.gather(memory, dist)
    if dist.main:
        with open(args.result, "w") as f:
            json.dump({"world": dist.world, "step_s": statistics.median(max(t) for t in times),
                       "cpu_s": statistics.median(max(t) for t in cpu_times), "bytes_per_rank": memory,
                       "params": n_params, "tokens": args.rows * args.seq}, f)
    distributed.close(dist)


def training_state_bytes(model, optimizer) -> dict:
    """This rank's bytes of parameters, gradients and AdamW state (its local shards)."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    params = list(model.parameters())
    state = optimizer.opt.state.values()
    out = {"params": sum(local(p) for p in params),
           "grads": sum(local(p.grad) for p in params if p.grad is not None),
           "optimizer": sum(local(v) for s in state for v in s.values() if hasattr(v, "numel") and v.dim() > 0)}
    if optimizer.needs_master:
        out["optimizer"] += sum(local(m) for m in optimizer.master)
    return out


def launch(n, args, tmp):
    result = os.path.join(tmp, f"n{n}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "--",
           os.path.abspath(__file__), "--worker", "--result", result, "--shape", args.shape, "--rows", str(args.rows),
           "--seq", str(args.seq), "--micro-rows", str(args.micro_rows), "--steps", str(args.steps)]
    if args.gpu:
        cmd.append("--gpu")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"N={n} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    with open(result) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA + NCCL, Qwen2.5-1.5B shapes, N = 1, 2, 4, 8 (as many as there are)")
    p.add_argument("--ranks", default=None, help="comma-separated N to run (default: 1,2 on CPU; 1,2,4,8 on GPU)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: small on CPU, qwen2.5-1.5b on GPU")
    p.add_argument("--rows", type=int, default=None, help="rows per step, split over the ranks (default 8 CPU, 64 GPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 256 CPU, 2048 GPU)")
    p.add_argument("--micro-rows", type=int, default=None, help="rows per forward/backward (default 2 CPU, 4 GPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.shape = args.shape or ("qwen2.5-1.5b" if args.gpu else "small")
    args.rows = args.rows or (64 if args.gpu else 8)
    args.seq = args.seq or (2048 if args.gpu else 256)
    args.micro_rows = args.micro_rows or (4 if args.gpu else 2)
    if args.worker:
        return worker(args)

    import torch
    sys.path.insert(0, ROOT)
    from minirl.common import device_description
    ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else ([1, 2, 4, 8] if args.gpu else [1, 2])
    if args.gpu:
        have = torch.cuda.device_count()
        ranks = [n for n in ranks if n <= have]
        if not ranks:
            sys.exit("--gpu: no CUDA device here")
    device = device_description("cuda" if args.gpu else "cpu")
    print(f"device: {device} | torch {torch.__version__} | shape {args.shape} | {args.rows} rows x {args.seq} "
          f"tokens per step, {args.micro_rows} rows per micro-batch | median of {args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        results = [launch(n, args, tmp) for n in ranks]
    base = results[0]
    mib = 2 ** 20
    print(f"model: {base['params'] / 1e6:.1f}M parameters; N=1 is the plain single-process path (no FSDP)")
    print(f"{'N':>3} {'step s':>8} {'cpu s':>8} {'tok/s':>9} {'x N=1':>6} {'params MiB':>11} {'grads MiB':>10} "
          f"{'optim MiB':>10} {'total/rank MiB':>15} {'/ N=1':>6}")
    for r in results:
        worst = max(r["bytes_per_rank"], key=lambda b: sum(b.values()))
        total = sum(worst.values())
        base_total = sum(max(base["bytes_per_rank"], key=lambda b: sum(b.values())).values())
        print(f"{r['world']:>3} {r['step_s']:>8.3f} {r['cpu_s']:>8.3f} {r['tokens'] / r['step_s']:>9.0f} "
              f"{base['step_s'] / r['step_s']:>6.2f} {worst['params'] / mib:>11.1f} {worst['grads'] / mib:>10.1f} "
              f"{worst['optimizer'] / mib:>10.1f} {total / mib:>15.1f} {total / base_total:>6.3f}")
    if not args.gpu:
        print("GPU (--gpu: NCCL, Qwen2.5-1.5B shapes, tokens/s at N = 1, 2, 4, 8): not yet run on a GPU")


if __name__ == "__main__":
    main()
