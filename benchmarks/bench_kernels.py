"""Peak memory and forward+backward time of token log-probs through an LM head, naive vs
minirl's chunked paths, in one run, with ratios against naive.

    python benchmarks/bench_kernels.py            # GPU when CUDA is available, else CPU
    python benchmarks/bench_kernels.py --cpu      # the CPU measurement only

What one "step" is: logprob = log_softmax(hidden @ weight.T)[targets] for N tokens, then
backward with a random upstream gradient, giving grads for hidden and weight.

    naive      logits = hidden @ W.T; logits.float().log_softmax(-1).gather(...)  (what most
               trainers write; full [N, V] logits, an fp32 copy, and its gradient)
    compile    torch.compile of naive (GPU only)
    chunked    minirl.losses.linear_logprobs(backend="torch"): chunks of tokens, torch maths
    triton     minirl.losses.linear_logprobs(backend="triton"): chunks + Triton kernel 1 (GPU)

GPU (Qwen2.5-1.5B head: H=1536, V=151,936, bf16, N = 4096 and 16384): peak memory is
torch.cuda.max_memory_allocated() minus what was allocated before the step (inputs);
time is the median of CUDA-event timings after warm-up. Goals (issue 4): at N=16k, peak at
most 1/8 of naive, time no worse than naive eager or torch.compile. Also times kernel 1
alone on bf16 logits and the GRPO loss kernel against its torch reference.

CPU (N=4096, H=576, V=49,152 fp32, SmolLM2-135M's head): each method runs in a fresh
subprocess; peak memory is the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs after a warm-up step) minus its resident set before the measured step:
real bytes touched, including allocator and library overheads. Goal: chunked <= 1/8 naive.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from minirl.losses import grpo_token_loss, linear_logprobs, token_logprobs  # noqa: E402


def naive_logprobs(hidden, weight, targets):
    logits = hidden @ weight.t()  # [N, V] model dtype
    logp_all = logits.float().log_softmax(-1)  # [N, V] fp32
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]


def make_inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, device=device, dtype=dtype) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g, device=device)
    upstream = torch.randn(N, generator=g, device=device)
    return hidden, weight, targets, upstream


def step_fn(method):
    if method in ("naive", "compile"):
        fn = naive_logprobs if method == "naive" else torch.compile(naive_logprobs)
    else:
        backend = {"chunked": "torch", "triton": "triton"}[method]

        def fn(h, w, t):
            return linear_logprobs(h, w, t, backend=backend)

    def step(hidden, weight, targets, upstream):
        hidden.grad = weight.grad = None
        (fn(hidden, weight, targets) * upstream).sum().backward()

    return step


# --------------------------------------------------------------------------------------
# CPU: one subprocess per method, peak resident memory
# --------------------------------------------------------------------------------------

def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def cpu_child(method, N, H, V, repeats):
    """Runs in a fresh process; prints one JSON line."""
    torch.manual_seed(0)
    inputs = make_inputs(N, H, V, torch.float32, "cpu")
    step = step_fn(method)
    step(*inputs)  # warm-up: thread pools, allocator, lazy init
    inputs[0].grad = inputs[1].grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set (Linux >= 4.0)
    before = _status_kb("VmRSS")
    step(*inputs)
    peak = _status_kb("VmHWM") - before
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"method": method, "peak_mb": peak / 1024, "time_s": statistics.median(times),
                      "times_s": times}))


def run_cpu(args):
    N, H, V = 4096, 576, 49152
    from minirl.kernels.linear_logprobs import default_chunk_size
    print(f"device: CPU ({os.cpu_count()} logical cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"shape: N={N} H={H} V={V} fp32; chunk_size={default_chunk_size(N, V, 'cpu')}; "
          f"time = median of {args.repeats} fwd+bwd steps after one warm-up")
    results = {}
    for method in ("naive", "chunked"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method,
                              "--repeats", str(args.repeats)], capture_output=True, text=True,
                             cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    naive = results["naive"]
    print(f"{'method':10s} {'peak MB':>10s} {'vs naive':>9s} {'time s':>9s} {'vs naive':>9s}")
    for method, r in results.items():
        print(f"{method:10s} {r['peak_mb']:10.1f} {r['peak_mb'] / naive['peak_mb']:9.3f} "
              f"{r['time_s']:9.3f} {r['time_s'] / naive['time_s']:9.2f}")
    ratio = results["chunked"]["peak_mb"] / naive["peak_mb"]
    ok = ratio <= 1 / 8
    print(f"chunked peak / naive peak = {ratio:.3f} (1/{1 / ratio:.1f}): "
          f"{'PASS' if ok else 'FAIL'} (goal <= 1/8)")
    return ok


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------

def cuda_measure(fn, warmup, repeats):
    """(peak extra bytes of one call, median ms over `repeats` calls) for fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return peak, statistics.median(times)


def run_gpu(args):
    H, V = 1536, 151936
    dtype = torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}, "
          f"triton {__import__('triton').__version__})")
    print(f"head: H={H} V={V} bf16; time = median of {args.repeats} fwd+bwd after warm-up")
    ok = True
    for N in args.gpu_n:
        inputs = make_inputs(N, H, V, dtype, "cuda")
        rows = {}
        for method in ("naive", "compile", "chunked", "triton"):
            step = step_fn(method)
            try:
                peak, ms = cuda_measure(lambda: step(*inputs), 3 if method == "compile" else 1,
                                        args.repeats)
            except torch.cuda.OutOfMemoryError:
                print(f"N={N} {method}: out of memory")
                continue
            finally:
                inputs[0].grad = inputs[1].grad = None
            rows[method] = (peak, ms)
        base_peak, base_ms = rows.get("naive", (float("nan"), float("nan")))
        print(f"\nN={N}")
        print(f"{'method':10s} {'peak GB':>9s} {'vs naive':>9s} {'ms':>9s} {'vs naive':>9s}")
        for method, (peak, ms) in rows.items():
            print(f"{method:10s} {peak / 2**30:9.2f} {peak / base_peak:9.3f} {ms:9.2f} "
                  f"{ms / base_ms:9.2f}")
        if N == max(args.gpu_n) and "triton" in rows and "naive" in rows:
            mem_ok = rows["triton"][0] <= base_peak / 8
            time_ok = rows["triton"][1] <= min(base_ms, rows.get("compile", rows["naive"])[1])
            print(f"goal at N={N}: triton peak <= naive/8: {'PASS' if mem_ok else 'FAIL'}; "
                  f"time <= naive and compile: {'PASS' if time_ok else 'FAIL'}")
            ok = ok and mem_ok
        del inputs
        torch.cuda.empty_cache()

    # Kernel 1 alone: bf16 logits [N, V] -> logprob, fwd+bwd.
    N = 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(N, V, generator=g, device="cuda", dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g, device="cuda")

    def k1(backend):
        def run():
            logits.grad = None
            if backend == "naive":
                lp = logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
            else:
                lp = token_logprobs(logits, targets, backend="triton")
            lp.sum().backward()
        return run

    print(f"\nkernel 1 alone: logits [{N}, {V}] bf16 -> logprob, fwd+bwd")
    for name in ("naive", "triton"):
        peak, ms = cuda_measure(k1(name), 1, args.repeats)
        print(f"{name:10s} peak {peak / 2**30:6.2f} GB  {ms:8.2f} ms")
    del logits
    torch.cuda.empty_cache()

    # GRPO loss: torch reference vs Triton kernel 3, [256, 4096] tokens, k3 KL.
    n, T = 256, 4096
    logp = (torch.randn(n, T, generator=g, device="cuda") - 2).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(n, T, generator=g, device="cuda")
    ref = logp.detach() + 0.1 * torch.randn(n, T, generator=g, device="cuda")
    adv = torch.randn(n, generator=g, device="cuda")
    mask = torch.rand(n, T, generator=g, device="cuda") > 0.2

    def grpo(backend):
        def run():
            logp.grad = None
            loss, _ = grpo_token_loss(logp, old, adv, mask, 0.2, 0.28, ref_logp=ref, beta=0.04,
                                      backend=backend)
            loss.sum().backward()
        return run

    print(f"\nGRPO loss [{n}, {T}] fwd+bwd (+stats)")
    for name in ("torch", "triton"):
        peak, ms = cuda_measure(grpo(name), 2, args.repeats)
        print(f"{name:10s} peak {peak / 2**20:7.1f} MB  {ms:8.3f} ms")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the CPU measurement even with CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return cpu_child(args.child, 4096, 576, 49152, args.repeats)
    ok = run_gpu(args) if torch.cuda.is_available() and not args.cpu else run_cpu(args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
