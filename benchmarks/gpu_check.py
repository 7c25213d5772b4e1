"""Everything GPU in minirl, checked in one command that fits a short GPU window (<= 8 minutes
on one H100/H200):

    python benchmarks/gpu_check.py                          # SmolLM2 from the test cache
    python benchmarks/gpu_check.py --smollm2 PATH/smollm2-135m-instruct --out runs/gpu-check

Stages, in this order (each in its own process, so a crash, an out-of-memory or a hang in one
is reported and the rest still run):
  gpu-tests        pytest -m gpu tests/            (tests/test_gpu.py: bf16 forward, graphs,
                                                    checkpointing, GRPO/SFT steps, peak memory)
  kernel-tests     pytest tests/test_kernels.py tests/test_losses.py   (their CUDA paths)
  decode-smollm2   minirl.generate with CUDA graphs vs eager, greedy, on SmolLM2-135M-Instruct
                   (bf16 and fp32): token-identical rows, or divergence only at a near-tie
  decode-qwen1.5b  the same on a random bf16 Qwen2.5-1.5B-shaped model
  grpo-bundled, sft-bundled        train_grpo.py / train_sft.py, 3 steps, --dtype bf16 on CUDA,
  grpo-qwen0.5b, sft-qwen0.5b      on the bundled model and on a random Qwen2.5-0.5B-shaped
                   model (vocab 151,936): finite losses, a checkpoint written, reloaded, and
                   its bf16 weights equal to the fp32 master weights rounded
  bench-kernels, bench-sampler, bench-grpo   the GPU benchmarks with small arguments
Then one summary table (check, result, figure) is printed and written, with the same rows as
a Markdown block for BENCHMARKS.md, to OUT/gpu_check.md (and OUT/gpu_check.json); each
stage's full output is in OUT/logs/STAGE.log. Exit status 0 when no stage failed.

Without CUDA every stage is "skipped: no CUDA" and the command exits 0 at once.
The SmolLM2 folder (an HF folder, ~540 MB in fp32) is taken from --smollm2, else
$MINIRL_SMOLLM2, else shared/smollm2-135m-instruct in the repository, else the test cache
(~/.cache/minirl-tests/smollm2-135m-instruct, as tests/conftest.py builds it); a machine
without network cannot build it, so copy it to one of those places (see docs/gpu.md).
The random models are built once under --cache (default ~/.cache/minirl-gpu-check) and reused;
every run writes fresh stage folders under --out: running it twice in a row is safe.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUDGET_S = 470  # the whole command, with the last stage's wrap-up: under 8 minutes
QWEN_COMMON = dict(model_type="qwen2", vocab_size=151936, num_key_value_heads=2, rms_norm_eps=1e-6,
                   max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
                   bos_token_id=None, eos_token_id=2, pad_token_id=0)
QWEN = {"qwen2.5-0.5b": dict(QWEN_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, head_dim=64),
        "qwen2.5-1.5b": dict(QWEN_COMMON, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, head_dim=128)}

if os.environ.get("MINIRL_GPU_CHECK_TINY"):  # tests on CPU: the same vocabulary, tiny bodies
    for _cfg in QWEN.values():
        _cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    head_dim=16)

# (stage, check as the summary names it, cap in seconds)
STAGES = [
    ("gpu-tests", "GPU tests (pytest -m gpu)", 150),
    ("kernel-tests", "kernel/loss tests on CUDA", 60),
    ("decode-smollm2", "CUDA-graph vs eager decode, SmolLM2-135M", 60),
    ("decode-qwen1.5b", "CUDA-graph vs eager decode, random Qwen2.5-1.5B bf16", 75),
    ("grpo-bundled", "train_grpo.py 3 steps bf16, bundled model", 45),
    ("sft-bundled", "train_sft.py 3 steps bf16, bundled model", 45),
    ("grpo-qwen0.5b", "train_grpo.py 3 steps bf16, random Qwen2.5-0.5B", 75),
    ("sft-qwen0.5b", "train_sft.py 3 steps bf16, random Qwen2.5-0.5B", 60),
    ("bench-kernels", "bench_kernels.py (N=4096)", 60),
    ("bench-grpo", "bench_grpo.py (0.5B, 256 new tokens, 1 step)", 90),
    ("bench-sampler", "bench_sampler.py (64 rows, 128+128 tokens)", 90),
]


# ------------------------------------------------------------------ results and the summary

def result_row(check, result, figure=""):
    return {"check": check, "result": result, "figure": figure}


def summary_table(rows) -> str:
    """Plain-text table: check | result | figure (one line per row)."""
    rows = [{k: str(v).replace("\n", " ") for k, v in r.items()} for r in rows]
    w1 = max([len("check")] + [len(r["check"]) for r in rows])
    w2 = max([len("result")] + [len(r["result"]) for r in rows])
    lines = [f"{'check':{w1}s}  {'result':{w2}s}  figure", "-" * (w1 + w2 + 12)]
    lines += [f"{r['check']:{w1}s}  {r['result']:{w2}s}  {r['figure']}" for r in rows]
    return "\n".join(lines)


def markdown(rows, meta) -> str:
    """The same rows as a Markdown block ready for BENCHMARKS.md."""
    def cell(s):
        return str(s).replace("|", "\\|").replace("\n", " ")
    out = [f"### gpu_check.py, {meta['date']}", "",
           f"- Device: {meta['device']}; torch {meta['torch']}; commit {meta['commit']}",
           f"- Command: `{meta['command']}`; {meta['seconds']:.0f} s in all", "",
           "| check | result | figure |", "|---|---|---|"]
    out += [f"| {cell(r['check'])} | {cell(r['result'])} | {cell(r['figure'])} |" for r in rows]
    return "\n".join(out) + "\n"


def failed(rows):
    return [r["check"] for r in rows if not (r["result"] == "pass" or r["result"].startswith("skipped"))]


# ------------------------------------------------------------------ running one stage

def run_stage(cmd, timeout, log_path, env=None):
    """Run one stage's command; returns (result, figure). The command's last stdout line that
    parses as {"result": ..., "figure": ...} gives both; a non-zero exit or a timeout is a
    failure whose figure is the last line of output. Never raises for the stage's faults."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc = None
    with open(log_path, "w", encoding="utf-8") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n{out}\n--- stderr ---\n{err}")
    reported = None
    for line in reversed(out.splitlines()):
        if line.startswith("{") and '"result"' in line:
            try:
                reported = json.loads(line)
                break
            except ValueError:
                pass
    def last_line(text):
        return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")[:120]
    if rc is None:
        return f"FAIL: timeout after {timeout:.0f} s", last_line(out)
    if reported is not None and (rc == 0 or reported["result"] != "pass"):
        return reported["result"], reported.get("figure", "")
    if rc != 0:  # a crash: the traceback's last line says what
        return f"FAIL: exit {rc}", last_line(err) or last_line(out)
    return "pass", last_line(out)


def report(result, figure=""):
    """What a stage child prints last (read by run_stage)."""
    print(json.dumps({"result": result, "figure": figure}), flush=True)


# ------------------------------------------------------------------ stage bodies (children)

def smollm2_folder(arg=None):
    """The SmolLM2-135M-Instruct folder, or None (see the module docstring)."""
    cache = os.environ.get("MINIRL_TEST_CACHE", os.path.expanduser("~/.cache/minirl-tests"))
    for path in (arg, os.environ.get("MINIRL_SMOLLM2"), os.path.join(ROOT, "shared", "smollm2-135m-instruct"),
                 os.path.join(cache, "smollm2-135m-instruct")):
        if path and os.path.exists(os.path.join(path, "config.json")):
            return path
    return None


def synthetic_tokenizer(vocab_size):
    """A tokenizer for a random model of any vocabulary: the bundled model's characters (so
    the arithmetic tasks encode as for the bundled model) plus filler tokens <f123> up to
    vocab_size, so every id the random model can sample decodes."""
    import string

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from minirl.tokenizer import CHAR_SPECIAL_TOKENS, Tokenizer
    chars = sorted(set(string.digits + string.ascii_letters + string.punctuation + " \n"))
    tokens = list(CHAR_SPECIAL_TOKENS) + chars
    tokens += [f"<f{i}>" for i in range(vocab_size - len(tokens))]
    tk = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(list(CHAR_SPECIAL_TOKENS))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return Tokenizer(tk, config, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})


def random_model_folder(name, cache, std=0.02, device="cuda"):
    """A random bf16 model of the named shape, saved once under `cache` and reused."""
    import torch

    import minirl
    from minirl.model import ModelConfig, Transformer
    tiny = "-tiny" if os.environ.get("MINIRL_GPU_CHECK_TINY") else ""
    folder = os.path.join(cache, f"{name}{tiny}-random-std{std}-bf16")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    with torch.device(device):  # initialise on the GPU: a 1.5B model on CPU takes minutes
        model = Transformer(ModelConfig.from_hf(QWEN[name])).to(torch.bfloat16)
    model.init_weights(std, generator=torch.Generator(device=device).manual_seed(0))
    minirl.save_model(model, folder, tokenizer=synthetic_tokenizer(model.config.vocab_size))  # atomic
    return folder


def near_tie(model, prompt, prefix, frac):
    """Is the top-2 logit gap after prompt + prefix within `frac` of the largest logit?"""
    import torch
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([prompt + prefix], device=device))[0, -1].float()  # [V]
    top2 = logits.topk(2).values
    return float(top2[0] - top2[1]) <= frac * float(logits.abs().max())


def compare_decodes(model, prompts, new_tokens, tie_frac):
    """Greedy decode with and without CUDA graphs: (identical rows, rows, near-tie
    divergences, other divergences, graph tok/s, eager tok/s)."""
    import torch

    import minirl
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    kw = dict(n=1, max_new_tokens=new_tokens, temperature=0.0)
    out, speed = {}, {}
    # Each generate call captures its own graphs: the graph speed includes the captures.
    # Run each mode twice and keep the second (cuBLAS, allocator and kernels warm). On a CPU
    # (the tests) static_shapes=True runs the graph path's bookkeeping eagerly.
    for graph in (True, False, True, False):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out[graph] = [g[0].token_ids for g in minirl.generate(model, prompts, use_cuda_graph=graph, static_shapes=graph, **kw)]
        sync()
        speed[graph] = sum(len(r) for r in out[graph]) / (time.perf_counter() - t0)
    same = ties = other = 0
    for p, a, b in zip(prompts, out[True], out[False]):
        if a == b:
            same += 1
            continue
        k = next((t for t in range(min(len(a), len(b))) if a[t] != b[t]), min(len(a), len(b)))
        if near_tie(model, p, b[:k], tie_frac):
            ties += 1
        else:
            other += 1
    return same, len(prompts), ties, other, speed[True], speed[False]


def stage_decode(args, which):
    import torch

    import minirl
    g = torch.Generator().manual_seed(0)
    parts, bad = [], False
    if which == "smollm2":
        path = smollm2_folder(args.smollm2)
        if path is None:
            return report("skipped: SmolLM2 folder not found (--smollm2, see docs/gpu.md)")
        tok = minirl.load_tokenizer(path)
        questions = [f"What is {a} + {b}? Explain briefly." for a, b in torch.randint(10, 999, (16, 2), generator=g).tolist()]
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
                   for q in questions]
        runs = [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)]
    else:
        path = random_model_folder("qwen2.5-1.5b", args.cache, std=0.1, device=args.device)  # peaked logits
        prompts = [torch.randint(3, 151936, (int(n),), generator=g).tolist()
                   for n in torch.randint(16, 200, (32,), generator=g)]
        runs = [(torch.bfloat16, 2e-2)]
    for dtype, tie_frac in runs:
        model = minirl.load_model(path, device=args.device, dtype=dtype)
        same, rows, ties, other, tg, te = compare_decodes(model, prompts, args.decode_tokens, tie_frac)
        name = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
        parts.append(f"{name}: {same}/{rows} rows identical"
                     + (f", {ties} diverge at a near-tie" if ties else "")
                     + (f", {other} DIVERGE" if other else "")
                     + f"; graph (incl. capture) {tg:.0f} vs eager {te:.0f} tok/s ({tg / te:.1f}x)")
        bad = bad or other > 0
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    report("FAIL: rows differ beyond a near-tie" if bad else "pass", "; ".join(parts))


GRPO_REWARD = '''
def spread(response, problem):
    return float(len(response) % 5) + 0.1 * response.count("1")
'''


def check_checkpoint(ckpt, device, dtype_name="bfloat16"):
    """Reload a checkpoint: finite fp32 master weights, saved weights = master rounded."""
    import torch
    from safetensors.torch import load_file

    import minirl
    from minirl.checkpoint import weight_files
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=True)
    master = state["optimizer"]["master"]
    saved = {}
    for f in weight_files(os.path.join(ckpt, "model")):
        saved.update(load_file(f))
    model = minirl.load_model(os.path.join(ckpt, "model"), device=device)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == len(master), (len(names), len(master))
    for n, m in zip(names, master):
        assert m.dtype == torch.float32 and torch.isfinite(m).all(), n
        assert saved[n].dtype == getattr(torch, dtype_name), n
        assert torch.equal(saved[n], m.to(saved[n].dtype)), f"{n}: saved weights != rounded master"


def stage_train(args, script, which):
    import math
    out = os.path.join(args.out, "runs", f"{script}-{which}")
    shutil.rmtree(out, ignore_errors=True)  # a second run starts fresh
    os.makedirs(os.path.dirname(out), exist_ok=True)
    model = None if which == "bundled" else random_model_folder("qwen2.5-0.5b", args.cache, device=args.device)
    flags = ["--device", args.device, "--dtype", "bf16", "--out", out, "--seed", "1"]
    flags += ["--model", model] if model else []
    if script == "grpo":
        reward = os.path.join(args.out, "runs", "reward_spread.py")
        with open(reward, "w") as f:
            f.write(GRPO_REWARD)
        size = ["2", "4", "16"] if os.environ.get("MINIRL_GPU_CHECK_TINY") else ["8", "8", "64"]
        flags += ["--steps", "3", "--prompts-per-step", size[0], "--num-samples", size[1],
                  "--max-new-tokens", size[2], "--train-problems", "64", "--eval-problems", "0", "--eval-every", "0",
                  "--reward", f"{reward}:spread", "--save-every", "3", "--template", "raw"]
        if model:
            flags += ["--lr", "1e-6"]
    else:
        size = ["128", "512"] if os.environ.get("MINIRL_GPU_CHECK_TINY") else ["256", "4096"]
        flags += ["--max-steps", "3", "--train-problems", "256", "--max-len", size[0], "--batch-tokens", size[1],
                  "--eval-every", "0", "--save-every", "3", "--warmup-steps", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"train_{script}.py"), *flags],
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    print(proc.stdout[-4000:])
    print(proc.stderr[-4000:], file=sys.stderr)
    if proc.returncode != 0:
        return report(f"FAIL: exit {proc.returncode}", (proc.stderr.strip().splitlines() or [""])[-1][:120])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    losses = [r["loss"] for r in recs if "loss" in r]
    if len(losses) != 3 or not all(math.isfinite(x) for x in losses):
        return report("FAIL: losses", f"losses {losses}")
    if script == "grpo" and any(r.get("skipped_updates") for r in recs):
        return report("FAIL: skipped updates", "")
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    check_checkpoint(os.path.join(out, "checkpoints", ckpts[-1]), args.device)
    report("pass", f"losses {', '.join(f'{x:.4g}' for x in losses)}; {seconds:.0f} s incl. load; "
                   f"checkpoint reloaded, bf16 = rounded fp32 master")


def stage_command(args, name):
    """A test run or a benchmark with small arguments; the figure is read off its output."""
    import re
    py = sys.executable
    cmds = {
        "gpu-tests": [py, "-m", "pytest", "-q", "-m", "gpu", "tests/", "-p", "no:cacheprovider"],
        "kernel-tests": [py, "-m", "pytest", "-q", "tests/test_kernels.py", "tests/test_losses.py",
                         "-p", "no:cacheprovider"],
        "bench-kernels": [py, "benchmarks/bench_kernels.py", "--gpu-n", "4096", "--repeats", "3"],
        "bench-grpo": [py, "benchmarks/bench_grpo.py", "--preset", "gpu", "--models", "qwen2.5-0.5b",
                       "--steps", "1", "--warmup", "1", "--max-new-tokens", "256", "--beta", "0"],
        "bench-sampler": [py, "benchmarks/bench_sampler.py", "--gpu", "--gpu-batches", "64",
                          "--gpu-prompt-len", "128", "--gpu-new-tokens", "128", "--repeats", "1"],
    }
    env = dict(os.environ)
    path = smollm2_folder(args.smollm2)
    if path:  # tests/test_gpu.py reads it
        env.setdefault("MINIRL_SMOLLM2", path)
    proc = subprocess.run(cmds[name], capture_output=True, text=True, cwd=ROOT, env=env)
    print(proc.stdout[-20000:])
    print(proc.stderr[-4000:], file=sys.stderr)
    text = proc.stdout
    if name.endswith("tests"):
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)(?: in [\d.]+s.*)?=*$", text, re.M)
        figure = m[-1].strip() if m else (text.strip().splitlines() or [""])[-1]
        ok = proc.returncode == 0 and "passed" in figure
        return report("pass" if ok else f"FAIL: exit {proc.returncode}", figure[:120])
    patterns = {"bench-kernels": r"^(goal at N=.*)$",
                "bench-grpo": r"^(step \(generation.*)$",
                "bench-sampler": r"^(.*identical sequences.*)$"}
    found = re.findall(patterns[name], text, re.M)
    figure = found[-1] if found else ((text.strip().splitlines() or [""])[-1])
    report("pass" if proc.returncode == 0 else f"FAIL: exit {proc.returncode}", figure.strip()[:160])


def child(args):
    """Run one stage in this process (called by the parent with --stage)."""
    name = args.stage
    if name.startswith("decode-"):
        return stage_decode(args, "smollm2" if name == "decode-smollm2" else "qwen")
    if name.startswith(("grpo-", "sft-")):
        script, which = name.split("-", 1)
        return stage_train(args, script, "bundled" if which == "bundled" else "qwen")
    return stage_command(args, name)


# ------------------------------------------------------------------ the parent

def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def run_all(args, cuda: bool, stages=STAGES):
    """Every stage in order within the time budget; a list of result rows."""
    t_start = time.perf_counter()
    rows = []
    for name, check, cap in stages:
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.perf_counter() - t_start)
        if not cuda:
            rows.append(result_row(check, "skipped: no CUDA"))
        elif left < 15:
            rows.append(result_row(check, "skipped: time budget used up"))
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--stage", name, "--out", args.out,
                   "--cache", args.cache, "--decode-tokens", str(args.decode_tokens)]
            cmd += ["--smollm2", args.smollm2] if args.smollm2 else []
            print(f"[{time.perf_counter() - t_start:5.0f} s] {name} ...", flush=True)
            result, figure = run_stage(cmd, min(cap, left - 5), os.path.join(args.out, "logs", f"{name}.log"))
            rows.append(result_row(check, result, figure))
            print(f"        {result}  {figure}", flush=True)
    return rows, time.perf_counter() - t_start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct HF folder (see the docstring)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu-check"), help="logs, runs and the summary")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/minirl-gpu-check"),
                   help="where the random models are built once and reused")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all stages together")
    p.add_argument("--only", nargs="+", default=None, choices=[s for s, _, _ in STAGES],
                   help="run only these stages")
    p.add_argument("--decode-tokens", type=int, default=128, help="new tokens per row in the decode checks")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests run stages on CPU
    args = p.parse_args(argv)
    args.out, args.cache = os.path.abspath(args.out), os.path.abspath(args.cache)
    if args.stage:
        return child(args)

    import torch
    from minirl.common import device_description
    cuda = torch.cuda.is_available()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    rows, seconds = run_all(args, cuda)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_description("cuda" if cuda else "cpu"), "torch": torch.__version__,
            "commit": git_commit(), "seconds": seconds,
            "command": "python benchmarks/gpu_check.py" + (" " + " ".join(argv) if argv else
                                                          " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")}
    print()
    print(summary_table(rows))
    md = markdown(rows, meta)
    write_atomic(os.path.join(args.out, "gpu_check.md"), md)
    write_atomic(os.path.join(args.out, "gpu_check.json"), json.dumps({"meta": meta, "rows": rows}, indent=2))
    bad = failed(rows)
    print(f"\n{len(rows) - len(bad)}/{len(rows)} checks passed or skipped"
          + (f"; FAILED: {', '.join(bad)}" if bad else "") + f" ({seconds:.0f} s)")
    print(f"Markdown for BENCHMARKS.md: {os.path.join(args.out, 'gpu_check.md')}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
