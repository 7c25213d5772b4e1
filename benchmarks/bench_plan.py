"""Plan vs measured: the peak memory minirl.plan predicts for a GRPO update on this CPU
against the peak of the same update really run.

    python benchmarks/bench_plan.py --model assets/tiny-arith --rows 8 --prompt-len 24 --new-tokens 488
    python benchmarks/bench_plan.py --model DIR --json out.json

Measured: in a fresh process, a model built from the folder's config.json (fp32, random
weights: sizes are what matter), MasterAdamW, and two GRPO updates as train_grpo.py runs them
(two micro-batches each: grpo.policy_loss, backward, clip, optimizer step, zero_grad). The
second update is measured, so the AdamW states exist, as in every update after the first.
Peak = the process's resident-set high-water mark during that update (VmHWM, reset through
/proc/self/clear_refs before it) minus its resident set before the model was built. glibc is
told to serve every allocation of 64 KiB or more with its own mapping
(MALLOC_MMAP_THRESHOLD_=65536), so freed tensors leave the resident set at once instead of
staying in the heap.
Planned: `python -m minirl.plan --device cpu --dtype fp32` with the same rows, prompt and
completion lengths (its training peak: the larger of micro-batch and optimizer-step peaks).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measured_child(model, rows, prompt_len, new_tokens):
    """Runs in a fresh process; prints one JSON line."""
    import torch

    from minirl import grpo
    from minirl.model import Transformer
    from minirl.plan import read_model_config
    from minirl.training import MasterAdamW
    torch.manual_seed(0)
    cfg = read_model_config(model)

    def update(m, opt):
        samples = [grpo.Sample(prompt_ids=[1] * prompt_len, completion_ids=[1] * new_tokens, advantage=1.0,
                               sampler_logprobs=torch.zeros(new_tokens)) for _ in range(2 * rows)]
        for mb in grpo.micro_batches(samples, rows * (prompt_len + new_tokens)):
            loss, _ = grpo.policy_loss(m, mb, pad_id=0, temperature=1.0, eps_low=0.2, eps_high=0.2, beta=0.0,
                                       kl_estimator="k3", aggregation="token-mean", num_sequences=2 * rows,
                                       num_tokens=2 * rows * new_tokens, norm_length=new_tokens, on_policy=True)
            loss.backward()
            del loss
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    warm = Transformer(cfg.__class__(**{**cfg.__dict__, "num_hidden_layers": 1}))  # thread pools, lazy init
    update(warm, MasterAdamW(warm.parameters(), lr=1e-6))
    del warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    m = Transformer(cfg)
    m.init_weights(generator=torch.Generator().manual_seed(0))
    m.train()
    opt = MasterAdamW(m.parameters(), lr=1e-6, weight_decay=0.1)
    update(m, opt)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the resident set now
    t0 = time.time()
    update(m, opt)
    peak = (_status_kb("VmHWM") - before) * 1024
    print(json.dumps({"measured_peak": peak, "seconds": time.time() - t0}))


def measure(model, rows, prompt_len, new_tokens) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--rows", str(rows),
                          "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def planned(model, rows, prompt_len, new_tokens) -> dict:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "plan.json")
        cmd = [sys.executable, "-m", "minirl.plan", "--model", model, "--device", "cpu", "--dtype", "fp32",
               "--gradient-checkpointing", "off", "--prompt-len", str(prompt_len), "--max-new-tokens", str(new_tokens),
               "--micro-batch-tokens", str(rows * (prompt_len + new_tokens)), "--prompts-per-step", str(rows),
               "--num-samples", "2", "--json", path]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        with open(path) as f:
            plan = json.load(f)
    return {"planned_peak": plan["training peak"], "plan_seconds": plan["plan seconds"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.path.join(ROOT, "assets", "tiny-arith"))
    p.add_argument("--rows", type=int, default=8, help="rows per micro-batch (two micro-batches per update)")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=488)
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return measured_child(args.model, args.rows, args.prompt_len, args.new_tokens)
    r = {**planned(args.model, args.rows, args.prompt_len, args.new_tokens),
         **measure(args.model, args.rows, args.prompt_len, args.new_tokens)}
    r["ratio"] = r["planned_peak"] / r["measured_peak"]
    print(f"{args.model}: {args.rows} rows x {args.prompt_len + args.new_tokens} tokens per micro-batch | "
          f"planned {r['planned_peak'] / 2**20:.1f} MiB, measured {r['measured_peak'] / 2**20:.1f} MiB, "
          f"planned / measured = {r['ratio']:.3f} (plan took {r['plan_seconds']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f)


if __name__ == "__main__":
    main()
