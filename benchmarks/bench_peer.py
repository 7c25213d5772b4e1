"""Benchmark: minirl against TRL (GRPOTrainer, SFTTrainer) on the same training step, in one run.

    python benchmarks/bench_peer.py                      # CPU: SmolLM2-135M-Instruct, GRPO + SFT
    python benchmarks/bench_peer.py --only grpo --steps 2
    python benchmarks/bench_peer.py --gpu                # CUDA: random bf16 Qwen2.5-0.5B shape

TRL is a benchmark-only dependency (never a test or core one): install it where it cannot
replace your torch, e.g. `python -m venv --system-site-packages ENV && ENV/bin/pip install trl`
and run this file with ENV/bin/python (minirl's side needs nothing extra).

What one step is, on both sides (same model folder, same prompts, same reward):
  GRPO  8 prompts x 8 samples, at most 64 new tokens (stop at EOS), temperature 1, no
        top-k/top-p; rewards from the arithmetic task's verifier (CPU) or random 0/1 (GPU);
        group-normalised advantages (std of the group); token-mean loss ("dapo" in TRL),
        beta 0 (no reference model), clip eps 0.2, one optimizer update per rollout,
        grad-norm clip 1.0, AdamW lr 1e-6; no gradient checkpointing on CPU (on for GPU,
        both sides). minirl: minirl.generate, grpo.policy_loss over micro-batches of 4096
        tokens (CPU) / 16384 (GPU), MasterAdamW, as train_grpo.py does it.
        TRL: GRPOTrainer with per_device_train_batch_size 64, num_generations 8.
  SFT   teacher solutions of the arithmetic task (levels 1-5) in the model's chat template,
        loss on the response tokens only. packed: rows of 512 tokens, 8 rows per step
        (minirl: minirl.sft.plan_epoch + segment-masked attention; TRL: packing=True, "bfd",
        padding-free). unpacked: 64 examples per step, one per row, right-padded (minirl:
        one micro-batch; TRL: per_device_train_batch_size 64). AdamW lr 1e-5.
Each (library, algorithm, layout) runs in its own fresh process with one torch thread on CPU
(OMP_NUM_THREADS=1, torch.set_num_threads(1)), so its peak memory is its own. Measured per
optimizer step: process CPU time (user + system of the whole process), wall time and the
process's peak resident memory during the step (VmHWM reset through /proc/self/clear_refs at
the start of the step; GPU: torch.cuda.max_memory_allocated). Model loading, the first
(warm-up) step and saving are not measured (TRL: save_strategy "no"); medians over the
measured steps are reported, with the ratio TRL / minirl (> 1: minirl is faster). For GRPO
also the generation part (minirl.generate vs TRL's _generate_and_score_completions, which
includes scoring) and the fraction of groups with zero reward variance.
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
sys.path.insert(0, ROOT)

SMOLLM2 = os.path.join(os.environ.get("MINIRL_TEST_CACHE", os.path.expanduser("~/.cache/minirl-tests")),
                       "smollm2-135m-instruct")
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                  rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1000000.0,
                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=2, pad_token_id=0)
PROMPTS, SAMPLES, NEW_TOKENS = 8, 8, 64
SFT_ROW_LEN, SFT_PACKED_ROWS, SFT_UNPACKED_EXAMPLES = 512, 8, 64
RUNS = [("grpo", "minirl"), ("grpo", "trl"), ("sft-packed", "minirl"), ("sft-packed", "trl"),
        ("sft-unpacked", "minirl"), ("sft-unpacked", "trl")]


# ------------------------------------------------------------------ measuring one step

def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class StepMeter:
    """CPU time, wall time and peak memory of each step; the first `warmup` are dropped."""

    def __init__(self, device):
        self.cuda = device == "cuda"
        self.steps = []

    def begin(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        self.t_cpu, self.t_wall = time.process_time(), time.perf_counter()

    def end(self, **extra):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = _status_kb("VmHWM") / 2**20
        self.steps.append(dict(cpu_s=time.process_time() - self.t_cpu,
                               wall_s=time.perf_counter() - self.t_wall, peak_gib=peak, **extra))
        print(json.dumps({"step": len(self.steps), **self.steps[-1]}), flush=True)


# ------------------------------------------------------------------ the shared data

def grpo_problems(steps):
    from minirl.tasks import make_problems
    return make_problems("arithmetic", PROMPTS * steps, seed=7, levels=[1, 2, 3])


def sft_pairs(n):
    """(question, teacher response) pairs of the arithmetic task, levels 1-5."""
    from minirl.tasks import make_problems, teacher_solution
    return [(p.question, teacher_solution(p)) for p in make_problems("arithmetic", n, seed=11)]


def chat_prompt(tok, question):
    from minirl.data import format_prompt
    return format_prompt(question, "chat", tok)


def make_reward(args):
    """reward(problem index, sample index, problem, text) -> float: the task's verifier on CPU;
    random 0/1 on GPU (a random model answers nothing right, and every group would have zero
    variance). With --zero-var-frac F the rewards are set instead of graded, the same on both
    sides: groups g with (g % 20) < 20 F get 0 for every sample (zero variance, no gradient),
    the others alternate 0/1 over their samples."""
    import random

    from minirl.tasks import verify
    if args.zero_var_frac is not None:
        constant = round(20 * args.zero_var_frac)
        return lambda g, j, problem, text: 0.0 if g % 20 < constant else float(j % 2)
    if args.device == "cuda":
        rng = random.Random(0)
        return lambda g, j, problem, text: float(rng.random() < 0.5)
    return lambda g, j, problem, text: float(verify(problem, text))


# ------------------------------------------------------------------ minirl

def minirl_grpo(args, meter):
    import torch

    import minirl
    from minirl import grpo
    from minirl.training import MasterAdamW, grad_norm_and_finite
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = minirl.load_model(args.model, device=args.device, dtype=dtype)
    model.gradient_checkpointing = args.device == "cuda"
    tok = minirl.load_tokenizer(args.model)
    opt = MasterAdamW(model.parameters(), lr=1e-6)
    reward = make_reward(args)
    problems = grpo_problems(args.steps + 1)
    micro = 16384 if args.device == "cuda" else 4096
    for k in range(args.steps + 1):
        batch = problems[k * PROMPTS:(k + 1) * PROMPTS]
        prompt_ids = [tok.encode(chat_prompt(tok, p.question)) for p in batch]
        meter.begin()
        t0 = time.process_time()
        model.eval()
        with torch.no_grad():
            groups = minirl.generate(model, prompt_ids, n=SAMPLES, max_new_tokens=NEW_TOKENS,
                                     temperature=1.0, stop_token_ids=tok.eos_token_ids, seed=k)
        rewards = torch.tensor([[reward(k * PROMPTS + i, j, p, tok.decode(c.token_ids)) for j, c in enumerate(g)]
                                for i, (p, g) in enumerate(zip(batch, groups))])
        gen_cpu = time.process_time() - t0
        adv = grpo.group_advantages(rewards, "group")  # [P, n]
        samples = [grpo.Sample(ids, list(c.token_ids), a) for ids, g, row in zip(prompt_ids, groups, adv.tolist())
                   for c, a in zip(g, row)]
        model.train()
        opt.zero_grad()
        num_tok, num_seq = sum(len(s.completion_ids) for s in samples), len(samples)
        # As train_grpo.py does with beta = 0: a sample with advantage 0 adds nothing to the
        # gradient, so it is not run at all (the denominators stay those of the whole batch).
        trained = [s for s in samples if s.advantage != 0]
        for mb in grpo.micro_batches(trained, micro):
            loss, _ = grpo.policy_loss(model, mb, pad_id=tok.pad_token_id, temperature=1.0, eps_low=0.2,
                                       eps_high=0.2, beta=0.0, kl_estimator="k3", aggregation="token-mean",
                                       num_sequences=num_seq, num_tokens=num_tok,
                                       norm_length=NEW_TOKENS, on_policy=True)
            loss.backward()
        _, finite = grad_norm_and_finite(model.parameters(), 1.0)
        if finite:
            opt.step()
        opt.zero_grad()
        zero_var = float((rewards.max(1).values == rewards.min(1).values).float().mean())
        meter.end(gen_cpu_s=gen_cpu, zero_var_frac=zero_var, completion_tokens=num_tok)


def minirl_sft(args, meter, packed):
    import torch

    import minirl
    from minirl.sft import collate, encode_pair, micro_batches, plan_epoch, response_logprobs
    from minirl.training import MasterAdamW, grad_norm_and_finite
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = minirl.load_model(args.model, device=args.device, dtype=dtype)
    model.gradient_checkpointing = args.device == "cuda"
    model.train()
    tok = minirl.load_tokenizer(args.model)
    eos = tok.eos_token_ids[0]
    seqs = [encode_pair(tok, chat_prompt(tok, q), r, eos, str(i), "bench", add_special_tokens=False)
            for i, (q, r) in enumerate(sft_pairs(SFT_UNPACKED_EXAMPLES * (args.steps + 1) * 2))]
    lengths = [len(s) for s in seqs]
    if packed:
        steps = plan_epoch(lengths, 0, 0, SFT_ROW_LEN, SFT_PACKED_ROWS)
    else:
        ex = list(range(len(seqs)))
        steps = [[[i] for i in ex[k:k + SFT_UNPACKED_EXAMPLES]] for k in range(0, len(ex), SFT_UNPACKED_EXAMPLES)]
    opt = MasterAdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
    for k in range(args.steps + 1):
        rows = steps[k]
        n_t = sum(seqs[i].num_targets for row in rows for i in row)
        meter.begin()
        for mb in micro_batches(rows, lengths, packed, SFT_ROW_LEN if packed else max(lengths), 1 << 20):
            batch = collate(seqs, mb, tok.pad_token_id, args.device)
            loss = -response_logprobs(model, batch).sum() / n_t
            loss.backward()
        _, finite = grad_norm_and_finite(model.parameters(), 1.0)
        if finite:
            opt.step()
        opt.zero_grad()
        meter.end(tokens=sum(lengths[i] for row in rows for i in row), examples=sum(len(r) for r in rows))


# ------------------------------------------------------------------ TRL

def _trl_common(args, out_dir):
    return dict(output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1,
                max_steps=args.steps + 1, use_cpu=args.device == "cpu", bf16=args.device == "cuda",
                gradient_checkpointing=args.device == "cuda", dataloader_num_workers=0,
                lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, seed=0,
                disable_tqdm=True)


def _meter_callback(meter, extra_fn):
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            meter.begin()

        def on_step_end(self, *a, **kw):
            meter.end(**extra_fn())
    return Meter()


def trl_grpo(args, meter):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    import minirl
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(args.model)
    mtok = minirl.load_tokenizer(args.model)
    problems = grpo_problems(args.steps + 1)
    reward = make_reward(args)
    data = Dataset.from_dict({"prompt": [chat_prompt(mtok, p.question) for p in problems],
                              "pid": list(range(len(problems)))})
    step_info = {}

    def reward_fn(prompts, completions, pid, **kw):
        # Completions come grouped: SAMPLES consecutive ones per prompt.
        r = [reward(i, k % SAMPLES, problems[i], c) for k, (i, c) in enumerate(zip(pid, completions))]
        groups = [r[i:i + SAMPLES] for i in range(0, len(r), SAMPLES)]
        step_info["zero_var_frac"] = sum(max(g) == min(g) for g in groups) / len(groups)
        return r

    cfg = GRPOConfig(**_trl_common(args, tempfile.mkdtemp()), learning_rate=1e-6,
                     per_device_train_batch_size=PROMPTS * SAMPLES, num_generations=SAMPLES,
                     max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, beta=0.0,
                     loss_type="dapo", scale_rewards="group", epsilon=0.2, num_iterations=1,
                     shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg, train_dataset=data,
                          processing_class=tok)
    inner = trainer._generate_and_score_completions

    def timed(*a, **kw):
        t0 = time.process_time()
        out = inner(*a, **kw)
        step_info["gen_cpu_s"] = time.process_time() - t0
        step_info["completion_tokens"] = int(out["completion_mask"].sum())
        return out
    trainer._generate_and_score_completions = timed
    trainer.add_callback(_meter_callback(meter, lambda: dict(step_info)))
    trainer.train()


def trl_sft(args, meter, packed):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import minirl
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(args.model)
    mtok = minirl.load_tokenizer(args.model)
    pairs = sft_pairs(SFT_UNPACKED_EXAMPLES * (args.steps + 1) * 2)
    data = Dataset.from_dict({"prompt": [chat_prompt(mtok, q) for q, _ in pairs],
                              "completion": [r for _, r in pairs]})
    cfg = SFTConfig(**_trl_common(args, tempfile.mkdtemp()), learning_rate=1e-5, adam_beta2=0.95,
                    packing=packed, max_length=SFT_ROW_LEN,
                    per_device_train_batch_size=SFT_PACKED_ROWS if packed else SFT_UNPACKED_EXAMPLES,
                    completion_only_loss=True, dataset_num_proc=None, shuffle_dataset=False,
                    include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    seen = [0]

    def extra():
        now = int(trainer.state.num_input_tokens_seen)
        tokens, seen[0] = now - seen[0], now
        return {"tokens": tokens}
    trainer.add_callback(_meter_callback(meter, extra))
    trainer.train()


# ------------------------------------------------------------------ driver

def child(args):
    import torch
    if args.device == "cpu":
        torch.set_num_threads(1)
    meter = StepMeter(args.device)
    algo, lib = args.child.split(":")
    if algo == "grpo":
        (minirl_grpo if lib == "minirl" else trl_grpo)(args, meter)
    else:
        packed = algo == "sft-packed"
        (minirl_sft if lib == "minirl" else trl_sft)(args, meter, packed)


def build_random_qwen(folder):
    """A random bf16 Qwen2.5-0.5B-shaped folder (speed does not depend on the weights) with
    gpu_check.py's synthetic tokenizer: characters plus filler tokens up to 151,936, so every
    id the model samples decodes on both sides."""
    import torch

    import minirl
    from minirl.model import ModelConfig, Transformer
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_check import synthetic_tokenizer
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    with torch.device("cuda"):
        model = Transformer(ModelConfig.from_hf(QWEN25_05B)).to(torch.bfloat16)
    model.init_weights(0.02, generator=torch.Generator(device="cuda").manual_seed(0))
    minirl.save_model(model, folder, tokenizer=synthetic_tokenizer(QWEN25_05B["vocab_size"]))
    return folder


def run_child(args, algo, lib):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{algo}:{lib}", "--model", args.model,
           "--steps", str(args.steps), "--device", args.device]
    if args.zero_var_frac is not None:
        cmd += ["--zero-var-frac", str(args.zero_var_frac)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    steps = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"step"')]
    if proc.returncode != 0 or len(steps) < 2:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
    return {"steps": steps[1:]}  # the first step is the warm-up


def med(res, key):
    vals = [s[key] for s in res.get("steps", []) if key in s]
    return statistics.median(vals) if vals else float("nan")


def report(results, args):
    print(f"\nmedians over {args.steps} measured steps (after 1 warm-up step); ratio = TRL / minirl", flush=True)
    print(f"{'step':14s} {'library':7s} {'CPU s':>8s} {'wall s':>8s} {'peak GiB':>9s} {'gen CPU s':>10s} "
          f"{'zero-var':>9s} {'tokens':>7s}")
    lines = []
    for algo in dict.fromkeys(a for a, _ in RUNS):
        for lib in ("minirl", "trl"):
            r = results.get((algo, lib))
            if r is None:
                continue
            if "error" in r:
                print(f"{algo:14s} {lib:7s} failed: {r['error'][0][:100]}")
                continue
            tok_key = "completion_tokens" if algo == "grpo" else "tokens"
            print(f"{algo:14s} {lib:7s} {med(r, 'cpu_s'):8.2f} {med(r, 'wall_s'):8.2f} "
                  f"{med(r, 'peak_gib'):9.2f} {med(r, 'gen_cpu_s'):10.2f} {med(r, 'zero_var_frac'):9.2f} "
                  f"{med(r, tok_key):7.0f}")
        a, b = results.get((algo, "minirl"), {}), results.get((algo, "trl"), {})
        if "steps" in a and "steps" in b:
            goal = 2.0 if algo == "grpo" else 1.5
            ratio = med(b, "cpu_s") / med(a, "cpu_s")
            lines.append(f"{algo}: CPU-time ratio TRL/minirl {ratio:.2f}x (wall {med(b, 'wall_s') / med(a, 'wall_s'):.2f}x)"
                         + (f"; goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'}" if args.device == "cpu" else ""))
    print("\n".join(lines), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder (CPU default: the SmolLM2-135M-Instruct test fixture)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per run (after one warm-up)")
    p.add_argument("--only", choices=["grpo", "sft"], default=None)
    p.add_argument("--gpu", action="store_true", help="CUDA, random bf16 Qwen2.5-0.5B shape")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--json", default=None, help="append each run's measured steps to this file")
    p.add_argument("--zero-var-frac", type=float, default=None,
                   help="GRPO: set rewards so this fraction of groups has zero variance (default: graded)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    import torch
    from minirl.common import device_description
    args.device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available")
    if args.model is None:
        args.model = (build_random_qwen(os.path.join(tempfile.gettempdir(), "minirl-bench-qwen2.5-0.5b"))
                      if args.gpu else SMOLLM2)
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        raise SystemExit("TRL is not installed in this Python (see the module docstring)")
    import transformers
    print(f"device: {device_description(torch.device(args.device))}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl_version}; model {args.model}; "
          f"one thread per process on CPU; load average before: {os.getloadavg()[0]:.2f}")
    results = {}
    for algo, lib in RUNS:
        if args.only and not algo.startswith(args.only):
            continue
        print(f"running {algo} / {lib} ...", flush=True)
        results[(algo, lib)] = r = run_child(args, algo, lib)
        # Each run's steps as soon as it ends (a long benchmark keeps what it measured).
        print(json.dumps({"run": f"{algo}:{lib}", "load_avg": os.getloadavg()[0], **r}), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps({"run": f"{algo}:{lib}", **r}) + "\n")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    report(results, args)


if __name__ == "__main__":
    main()
