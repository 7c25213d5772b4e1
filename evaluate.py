"""evaluate.py — accuracy (pass@1) vs capability (pass@k): sample once, analyse as often as wanted.

    python evaluate.py                 # bundled base model vs the latest runs, n=64, report
    python evaluate.py sample --model DIR --data test.jsonl --n 256 --out runs/base.jsonl
    python evaluate.py report runs/base.jsonl runs/rl.jsonl --out runs/report

`sample`: n samples per problem from minirl's sampler, graded, written as a samples file
(jsonl, one line per sample; format in minirl/report.py) plus `<name>.settings.json`. The
problems are processed in fixed chunks, each with its own seed, and each chunk is written
whole, so an interrupted run continues where it stopped (--resume is automatic) and gives
the same file as an uninterrupted one. --banned-words restricts decoding (Hu et al.): the words
never appear as whole words, in any case or tokenization (minirl/banned.py).

`judge`: minirl.judge — labels each response for cognitive behaviours (verification,
backtracking, ...) with a keyword baseline, a local model or an OpenAI-compatible server;
judgments are cached beside the samples file (`<name>.judgments.jsonl`) and shown by
`report`. `judge --calibrate LABELS.jsonl` scores a judge against hand labels.

`report`: minirl.report.build_report — pass@k with bootstrap CIs, maj@k, difficulty bins of
the reference (first) model, per-bin change, transition matrix, answer entropy, lengths,
reflection phrases, token-frequency comparison; report.json, report.md and PNGs.

With no sub-command: samples the bundled base model (assets/tiny-arith) and the most recent
GRPO and SFT runs (runs/grpo-*/final, runs/sft-*/final) on held-out arithmetic problems and
writes the report comparing them — Kim et al.'s (arXiv 2505.14216) figures in miniature.
"""
import argparse
import glob
import json
import os
import sys
import time

from minirl.common import BUNDLED_MODEL as DEMO_MODEL

HELDOUT_SEED_OFFSET = 7_777_777  # the held-out synthetic problems of train_grpo.py


def add_sample_args(p):
    a = p.add_argument
    a("--model", default=DEMO_MODEL, help="HF folder (or hub id)")
    a("--data", default=None, help="problems jsonl/parquet; default: synthetic --task problems")
    a("--task", default="arithmetic", choices=["arithmetic", "countdown"])
    a("--task-levels", default=None, help="comma-separated levels (default: all)")
    a("--num-problems", type=int, default=300, help="synthetic problems (without --data)")
    a("--task-seed", type=int, default=HELDOUT_SEED_OFFSET,
      help="seed of the synthetic problems (default: train_grpo.py's held-out set for --seed 0)")
    a("--limit", type=int, default=None, help="use only the first k problems")
    a("--question-field", default=None)
    a("--answer-field", default=None)
    a("--template", default=None, help="boxed | r1-zero | raw | chat (default: raw for the bundled model, else boxed)")
    a("--n", type=int, default=64, help="samples per problem")
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    a("--top-k", type=int, default=0)
    a("--max-new-tokens", type=int, default=None, help="default: 64 for the bundled model, else 3000")
    a("--seed", type=int, default=0)
    a("--banned-words", default=None, help='comma-separated words never produced, e.g. "wait,hmm,but"')
    a("--grader", default="minirl", choices=["minirl", "math_verify"])
    a("--chunk-problems", type=int, default=16, help="problems sampled together (and written together)")
    a("--device", default=None)
    a("--dtype", default=None)
    a("--label", default=None, help="the model's name in reports")
    a("--out", default=None, help="samples file (default runs/samples-<time>.jsonl)")


def add_report_args(p):
    a = p.add_argument
    a("samples", nargs="+", help="samples files; the first is the reference (base) model")
    a("--out", default=None, help="report folder (default: beside the first file)")
    a("--labels", default=None, help="comma-separated model names")
    a("--reference", type=int, default=0, help="index of the reference file")
    a("--ks", default=None, help="comma-separated k (default 1, 2, 4, ..., n)")
    a("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0 = none)")
    a("--seed", type=int, default=0)
    a("--no-plots", action="store_true")
    a("--answer-grouping", default="canonical", choices=["canonical", "string"],
      help="maj@k / answer entropy: group answers by mathematical value (grader.canonical_answer: "
           "1/2 = 0.5) or by normalised string")
    a("--tokenizer", default=None,
      help="tokenizer folder for the token-level frequencies (default: each file's settings 'model')")
    a("--judge-id", default=None, help="whose behaviour labels to show when a judgments file holds several")


def add_judge_args(p):
    a = p.add_argument
    a("samples", nargs="*", help="samples files to judge (judgments go beside each: <name>.judgments.jsonl)")
    a("--judge", default=None, choices=["keyword"], help="the keyword baseline judge (no model)")
    a("--judge-model", default=None, help="a local HF folder, run greedily by minirl's sampler")
    a("--judge-url", default=None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    a("--judge-name", default=None, help="the model name the server expects (with --judge-url)")
    a("--judge-key-env", default="OPENAI_API_KEY",
      help="environment variable holding the API key (sent only when set)")
    a("--behaviours", default=None, help="comma-separated behaviours (default: all in the file)")
    a("--behaviour-file", default=None, help="your own behaviours file (format: minirl/behaviours.json)")
    a("--per-problem", type=int, default=None, help="judge only the first M samples of each problem")
    a("--concurrency", type=int, default=8, help="parallel requests (--judge-url)")
    a("--timeout", type=float, default=60.0, help="seconds per request (--judge-url)")
    a("--retries", type=int, default=3, help="retries of a failed request (--judge-url)")
    a("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry")
    a("--max-tokens", type=int, default=16, help="longest judge answer")
    a("--batch-size", type=int, default=16, help="prompts per batch (--judge-model)")
    a("--device", default=None)
    a("--calibrate", default=None, help="hand-labelled jsonl: score the judge against it instead")
    a("--out", default=None, help="judgments file (one samples file only) or, with --calibrate, a JSON of scores")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command")
    add_sample_args(sub.add_parser("sample", help="sample and grade n completions per problem",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_report_args(sub.add_parser("report", help="analyse samples files",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_judge_args(sub.add_parser("judge", help="label responses for cognitive behaviours",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    demo = sub.add_parser("demo", help="the default: bundled model vs latest runs",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--n", type=int, default=64)
    demo.add_argument("--num-problems", type=int, default=300)
    demo.add_argument("--task-levels", default="1,2,3,4,5",
                      help="arithmetic levels: the base's (1-3), the next (4), the SFT demo's (4-5)")
    demo.add_argument("--runs", default="runs", help="folder holding grpo-*/ and sft-*/ runs")
    demo.add_argument("--out", default=None, help="default runs/eval-<time>")
    demo.add_argument("--device", default=None)
    return p


# ---------------------------------------------------------------- sample

def load_eval_problems(args):
    from minirl import tasks
    from minirl.data import load_problems
    if args.data:
        problems = load_problems(args.data, question_field=args.question_field, answer_field=args.answer_field)
    else:
        levels = [int(x) for x in args.task_levels.split(",")] if args.task_levels else None
        problems = tasks.make_problems(args.task, args.num_problems, seed=args.task_seed, levels=levels)
    return problems[:args.limit] if args.limit else problems


def check_sample_args(args):
    """Every flag of `sample`, checked before anything is loaded or written: a refused
    command leaves no file behind that would block the corrected one."""
    import math

    from minirl.common import MinirlError, check_writable_file, parse_dtype
    from minirl.data import TEMPLATES
    for flag, value in (("--n", args.n), ("--chunk-problems", args.chunk_problems),
                        ("--num-problems", args.num_problems), ("--limit", args.limit),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise MinirlError(f"{flag} must be >= 1 (got {value})")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise MinirlError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise MinirlError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise MinirlError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.template is not None and args.template not in TEMPLATES:
        raise MinirlError(f"--template {args.template!r}: choose one of {', '.join(TEMPLATES)}")
    if args.task_levels:
        try:
            [int(x) for x in args.task_levels.split(",")]
        except ValueError:
            raise MinirlError(f"--task-levels {args.task_levels!r}: expected comma-separated integers") from None
    try:
        parse_dtype(args.dtype)
    except MinirlError as e:
        raise MinirlError(f"--dtype: {e}") from None
    if args.device:
        import torch
        try:
            torch.device(args.device)
        except RuntimeError:
            raise MinirlError(f"--device {args.device!r}: not a device (e.g. cpu, cuda, cuda:1)") from None
    if not os.path.isdir(args.model) and (args.model.count("/") != 1 or args.model.startswith((".", "/", "~"))):
        raise MinirlError(f"--model {args.model}: folder not found")
    if args.data and not os.path.exists(args.data):
        raise MinirlError(f"--data {args.data}: file not found")
    if args.out:
        check_writable_file(args.out, "--out")


def read_settings(path):
    """The settings file of an earlier (maybe interrupted) run, or None."""
    from minirl.common import MinirlError
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise MinirlError(f"{path}: unreadable settings file ({e}); remove it together with its samples file") from None


def read_done_chunks(path, chunk_size, n, problem_ids):
    """Lines of the whole chunks already in `path` (an interrupted run): a partly written
    chunk, or a last line torn by a kill, is dropped and sampled again; a bad line before
    the last is an error naming the file and line."""
    from minirl.common import MinirlError, read_jsonl
    if not os.path.exists(path):
        return []
    lines = [obj for _, obj in read_jsonl(path, torn_tail=True)]
    whole = 0  # lines in the complete chunks (the last chunk may hold fewer problems)
    for start in range(0, len(problem_ids), chunk_size):
        size = min(chunk_size, len(problem_ids) - start) * n
        if whole + size > len(lines):
            break
        whole += size
    kept = lines[:whole]
    for k, obj in enumerate(kept):
        expected = problem_ids[k // n]
        if not isinstance(obj, dict) or obj.get("problem_id") != expected:
            got = obj.get("problem_id") if isinstance(obj, dict) else obj
            raise MinirlError(f"{path}: line {k + 1} is problem {got!r}, expected "
                              f"{expected!r}: the file belongs to other settings; use another --out")
    return kept


def cmd_sample(args):
    """Setup (every input checked, nothing written), then rounds of chunks."""
    import minirl
    from minirl import distributed
    from minirl.common import atomic_write_json, atomic_write_text, parse_dtype
    from minirl.training import Progress

    check_sample_args(args)
    job = plan_sampling(args)
    dist = distributed.init(args.device)  # torchrun: chunks split over ranks; without it, one process
    distributed.quiet_unless_main(dist)
    device = dist.device if args.device or dist.on else None
    model = minirl.load_model(args.model, device=device, dtype=parse_dtype(args.dtype))
    distributed.barrier(dist)  # every rank has read the files before rank 0 rewrites them
    if dist.main:
        atomic_write_json(job.settings_path, job.settings)  # the first file written: every input is known good
        atomic_write_text(job.out, "".join(json.dumps(o) + "\n" for o in job.done))  # drop a partial chunk
    n_problems, size = len(job.problems), args.chunk_problems
    start_problem = len(job.done) // args.n
    chunks = list(range(-(-start_problem // size), -(-n_problems // size)))
    progress = Progress(n_problems, start_problem)
    if start_problem:
        print(f"resuming {job.out}: {start_problem}/{n_problems} problems already sampled", flush=True)
    tokens_total, t0 = 0, time.time()
    # Rounds of one chunk per rank (one chunk per round on one process); rank 0 appends the
    # round's chunks in chunk order, so the file is the same for any number of ranks.
    for r in range(0, len(chunks), dist.world):
        round_chunks = chunks[r:r + dist.world]
        mine = sample_chunk(args, job, model, round_chunks[dist.rank]) if dist.rank < len(round_chunks) else []
        for c, lines in zip(round_chunks, distributed.gather(mine, dist)):
            if dist.main:
                with open(job.out, "a", encoding="utf-8") as f:  # one write per chunk: whole chunks only
                    f.write("".join(json.dumps(o) + "\n" for o in lines))
                    f.flush()
                    os.fsync(f.fileno())
            tokens_total += sum(o["num_tokens"] for o in lines)
            done_problems = min(n_problems, (c + 1) * size)
            print(f"sampled {done_problems}/{n_problems} problems | "
                  f"{tokens_total / max(time.time() - t0, 1e-9):.0f} tok/s | {progress.eta(done_problems)}", flush=True)
    distributed.close(dist)
    print(f"samples: {job.out}")
    return job.out


def plan_sampling(args):
    """Problems, encoded prompts, settings and the whole chunks already in --out, every input
    checked and nothing written yet."""
    from types import SimpleNamespace

    import minirl
    from minirl.banned import BannedWords
    from minirl.checkpoint import read_config, resolve_model_path
    from minirl.common import MinirlError
    from minirl.data import format_prompt, prompt_add_special_tokens

    bundled = os.path.normpath(args.model) == os.path.normpath(DEMO_MODEL)
    template = args.template or ("raw" if bundled else "boxed")
    max_new = args.max_new_tokens or (64 if bundled else 3000)
    out = args.out or os.path.join("runs", time.strftime("samples-%Y%m%d-%H%M%S.jsonl"))
    problems = load_eval_problems(args)
    if not problems:
        raise MinirlError("no problems to sample")
    tokenizer = minirl.load_tokenizer(args.model)
    add_special = prompt_add_special_tokens(template, tokenizer)  # a chat template writes its own BOS
    prompts = [tokenizer.encode(format_prompt(p.question, template, tokenizer), add_special_tokens=add_special)
               for p in problems]
    context = read_config(resolve_model_path(args.model)).max_position_embeddings
    longest = max(range(len(problems)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) + max_new > context:
        raise MinirlError(f"problem {problems[longest].id}: {len(prompts[longest])} prompt tokens + "
                          f"--max-new-tokens {max_new} exceed the model's context ({context})")
    settings = {"model": args.model, "label": args.label or label_of(args.model), "n": args.n,
                "template": template, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "max_new_tokens": max_new, "seed": args.seed,
                "data": args.data or f"{args.task}:{args.task_levels or 'all'}:{args.num_problems}:{args.task_seed}",
                "banned_words": args.banned_words, "grader": args.grader, "chunk_problems": args.chunk_problems,
                "num_problems": len(problems)}
    settings_path = os.path.splitext(out)[0] + ".settings.json"
    old = read_settings(settings_path)
    if old is not None:
        diff = [k for k in settings if k != "label" and old.get(k) != settings[k]]
        if diff:
            raise MinirlError(f"{out} exists with other settings ({', '.join(diff)}); use another --out")
    done = read_done_chunks(out, args.chunk_problems, args.n, [p.id for p in problems])  # refuses a foreign file
    banned = BannedWords(tokenizer, args.banned_words) if args.banned_words else None
    return SimpleNamespace(problems=problems, prompts=prompts, tokenizer=tokenizer, max_new=max_new, out=out,
                           settings=settings, settings_path=settings_path, done=done, banned=banned)


def sample_chunk(args, job, model, c):
    """The sample lines of chunk c. Its random stream depends only on (--seed, c): the same
    lines on any rank, in any run."""
    import minirl
    from minirl.common import make_generator
    from minirl.grader import extract_answer, grade

    size = args.chunk_problems
    chunk, prompts = job.problems[c * size:(c + 1) * size], job.prompts[c * size:(c + 1) * size]
    groups = minirl.generate(model, prompts, n=args.n, max_new_tokens=job.max_new, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, stop_token_ids=job.tokenizer.eos_token_ids,
                             banned_words=job.banned, generator=make_generator(args.seed, "evaluate-chunk", c))
    lines = []
    for p, group in zip(chunk, groups):
        for j, comp in enumerate(group):
            text = job.tokenizer.decode(comp.token_ids)
            g = grade(text, p.answer, backend=args.grader) if not is_task(p) else None
            correct = g.correct if g else task_verify(p, text)
            lines.append({"problem_id": p.id, "difficulty": p.difficulty, "gold": p.answer,
                          "question": p.question, "sample_index": j, "response": text,
                          "num_tokens": len(comp.token_ids), "finish_reason": comp.finish_reason,
                          "answer": g.answer if g else extract_answer(text), "correct": bool(correct)})
    return lines


def is_task(problem):
    return bool(problem.meta.get("task")) if problem.meta else False


def task_verify(problem, text):
    from minirl import tasks
    return tasks.verify(problem, text) > 0


def label_of(model_path):
    parts = os.path.normpath(model_path).split(os.sep)
    if parts[-1] == "final" and len(parts) > 1:
        return parts[-2]
    return parts[-1]


# ---------------------------------------------------------------- report

def parse_ks(text):
    """--ks "1,8,64" -> [1, 8, 64]; anything else is a one-line error."""
    from minirl.common import MinirlError
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise MinirlError(f"--ks: expected comma-separated whole numbers such as 1,8,64, got {text!r}") from None


def cmd_report(args):
    from minirl.common import check_writable_dir
    from minirl.report import build_report
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.samples[0])), "report")
    check_writable_dir(out, "--out")  # before any work
    ks = parse_ks(args.ks) if args.ks else None
    labels = args.labels.split(",") if args.labels else None
    report = build_report(args.samples, out, labels=labels, reference_index=args.reference, ks=ks,
                          bootstrap=args.bootstrap, seed=args.seed, plots=not args.no_plots,
                          answer_grouping=args.answer_grouping, tokenizer=args.tokenizer,
                          judge_id=args.judge_id)
    for m in report["models"]:
        print(summary_line(m))
    print(f"report: {os.path.join(out, 'report.md')}" +
          (f" (+{len(report['figures'])} figures)" if report["figures"] else ""))
    return report


def summary_line(model_section):
    """One line per model from report.json's model section."""
    m = model_section
    acc = m.get("accuracy", {})
    acc = acc.get("mean") if isinstance(acc, dict) else acc
    passk = m.get("pass_at_k", {})
    last_k = max(passk, key=lambda k: int(k)) if passk else None
    pk = passk[last_k] if last_k else None
    pk = pk.get("mean") if isinstance(pk, dict) else pk
    text = f"{m.get('label', '?')}: accuracy {acc * 100:.1f}%" if acc is not None else f"{m.get('label', '?')}:"
    if pk is not None:
        text += f", pass@{last_k} {pk * 100:.1f}%"
    return text


# ---------------------------------------------------------------- judge

def make_judge(args):
    """The judge the flags name (exactly one of --judge keyword, --judge-model, --judge-url)."""
    from minirl import judge as J
    from minirl.common import MinirlError
    given = [f for f, v in (("--judge", args.judge), ("--judge-model", args.judge_model),
                            ("--judge-url", args.judge_url)) if v]
    if len(given) != 1:
        raise MinirlError("judge: give exactly one of --judge keyword, --judge-model DIR, --judge-url URL"
                          + (f" (got {', '.join(given)})" if given else ""))
    for flag, value, low in (("--concurrency", args.concurrency, 1), ("--retries", args.retries, 0),
                             ("--max-tokens", args.max_tokens, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise MinirlError(f"{flag} must be >= {low} (got {value})")
    if args.timeout <= 0 or args.backoff < 0:
        raise MinirlError("--timeout must be > 0 and --backoff >= 0")
    if args.judge:
        return J.KeywordJudge()
    if args.judge_model:
        if not os.path.isdir(args.judge_model):
            raise MinirlError(f"--judge-model: {args.judge_model} is not a folder")
        return J.ModelJudge(args.judge_model, batch_size=args.batch_size, max_new_tokens=args.max_tokens,
                            device=args.device)
    if not args.judge_name:
        raise MinirlError("--judge-url needs --judge-name (the model name the server serves)")
    return J.HTTPJudge(args.judge_url, args.judge_name, api_key=os.environ.get(args.judge_key_env) or None,
                       key_env=args.judge_key_env, timeout=args.timeout, retries=args.retries,
                       backoff=args.backoff, concurrency=args.concurrency, max_tokens=args.max_tokens)


def judge_samples_of(path, per_problem):
    """The samples of a samples file to judge: dicts of problem_id, sample_index, question, response."""
    from minirl.common import MinirlError
    from minirl.report import read_samples
    if per_problem is not None and per_problem < 1:
        raise MinirlError(f"--per-problem must be >= 1 (got {per_problem})")
    s = read_samples(path)
    m = s.n if per_problem is None else min(per_problem, s.n)
    return [{"problem_id": pid, "sample_index": j, "question": q or "", "response": s.responses[p][j]}
            for p, (pid, q) in enumerate(zip(s.problem_ids, s.questions)) for j in range(m)]


class JudgeProgress:
    """A progress line at most every 10 seconds, and at the end."""

    def __init__(self, t0):
        self.t0, self.last = t0, time.time()

    def __call__(self, done, total):
        if done == total or time.time() - self.last >= 10:
            self.last = time.time()
            print(f"  {done}/{total} new judgments ({self.last - self.t0:.0f}s)", flush=True)


def cmd_judge(args):
    from minirl import judge as J
    from minirl.common import MinirlError
    names = [b.strip() for b in args.behaviours.split(",")] if args.behaviours else None
    behaviours = J.load_behaviours(args.behaviour_file, names)
    if args.calibrate:
        if args.samples:
            raise MinirlError("judge --calibrate takes the labels file instead of samples files")
        return cmd_calibrate(args, behaviours)
    if not args.samples:
        raise MinirlError("judge: give samples files (or --calibrate LABELS.jsonl)")
    if args.out and len(args.samples) > 1:
        raise MinirlError("--out: give one samples file with --out (judgments go beside each file otherwise)")
    work = [(path, judge_samples_of(path, args.per_problem)) for path in args.samples]  # all checked first
    judge = make_judge(args)
    t0 = time.time()
    for path, samples in work:
        out = args.out or J.judgments_path(path)
        cache = J.JudgmentCache(out)
        print(f"judging {len(samples)} responses x {len(behaviours)} behaviours of {path} with {judge.id}", flush=True)
        stats = J.run_judge(samples, behaviours, judge, cache, progress=JudgeProgress(t0))
        print(f"judgments: {out}: {stats.judged} new, {stats.cached} cached, {stats.unparseable} unparseable"
              + (f", {stats.failed} failed" if stats.failed else ""), flush=True)
        if getattr(judge, "truncated", 0):
            print(f"note: {judge.truncated} prompts were longer than the judge's context and kept only their end")
        if stats.failed:
            raise MinirlError(f"judge: {stats.failed} request(s) failed after {args.retries} retries "
                              f"(last: {stats.last_error}); the {stats.judged} others are cached: re-run to retry")


def cmd_calibrate(args, behaviours):
    """Score the judge against a hand-labelled file: accuracy and Cohen's kappa per behaviour."""
    import tempfile

    from minirl import judge as J
    from minirl.common import MinirlError, atomic_write_json, read_jsonl
    rows = []
    for lineno, obj in read_jsonl(args.calibrate):
        if not (isinstance(obj, dict) and isinstance(obj.get("response"), str) and isinstance(obj.get("labels"), dict)):
            raise MinirlError(f"{args.calibrate}:{lineno}: needs 'response' (text) and 'labels' ({{behaviour: bool}})")
        missing = [b.name for b in behaviours if not isinstance(obj["labels"].get(b.name), bool)]
        if missing:
            raise MinirlError(f"{args.calibrate}:{lineno}: no true/false label for {', '.join(missing)}")
        rows.append(obj)
    if not rows:
        raise MinirlError(f"{args.calibrate}: no labelled responses")
    samples = [{"problem_id": str(r.get("id", i)), "sample_index": 0, "question": r.get("question", ""),
                "response": r["response"]} for i, r in enumerate(rows)]
    judge = make_judge(args)
    with tempfile.TemporaryDirectory() as tmp:
        cache = J.JudgmentCache(os.path.join(tmp, "calibration.judgments.jsonl"))
        stats = J.run_judge(samples, behaviours, judge, cache, progress=JudgeProgress(time.time()))
        predicted = {b.name: [cache.get(J.judgment_key(s["problem_id"], 0, s["response"], b, judge.id))
                              for s in samples] for b in behaviours}
    predicted = {k: [None if r is None else r["label"] for r in v] for k, v in predicted.items()}
    gold = {b.name: [r["labels"][b.name] for r in rows] for b in behaviours}
    scores = J.calibration_scores(gold, predicted)
    print(f"{judge.id} vs {args.calibrate} ({len(rows)} responses; presence of each behaviour)")
    print(f"{'behaviour':<20} {'positives':>9} {'accuracy':>9} {'kappa':>7} {'unparseable':>12}")
    for name, sc in scores.items():
        print(f"{name:<20} {sc['positives']:>9} {sc['accuracy']:>9.3f} {sc['kappa']:>7.3f} {sc['unparseable']:>12}")
    if stats.failed:
        print(f"note: {stats.failed} request(s) failed (last: {stats.last_error}); they count as unparseable")
    if args.out:
        atomic_write_json(args.out, {"judge": judge.id, "labels": args.calibrate, "scores": scores})
    return scores


# ---------------------------------------------------------------- demo (no arguments)

def latest(pattern):
    found = [p for p in glob.glob(pattern) if os.path.exists(os.path.join(p, "config.json"))]
    return max(found, key=os.path.getmtime) if found else None


def cmd_demo(args):
    from minirl.common import MinirlError, check_writable_dir
    runs = [("base", DEMO_MODEL), ("grpo", latest(os.path.join(args.runs, "grpo-*", "final"))),
            ("sft", latest(os.path.join(args.runs, "sft-*", "final")))]
    runs = [(name, path) for name, path in runs if path]
    if not os.path.exists(os.path.join(DEMO_MODEL, "config.json")):
        raise MinirlError(f"{DEMO_MODEL}: the bundled model is missing (see README: rebuilding it)")
    if len(runs) == 1:
        print("no runs/grpo-*/final or runs/sft-*/final yet: reporting the bundled model alone "
              "(run `python train_grpo.py` first to compare)")
    out = args.out or os.path.join("runs", time.strftime("eval-%Y%m%d-%H%M%S"))
    check_writable_dir(out, "--out")  # before any work
    files = []
    for name, path in runs:
        print(f"== sampling {name}: {path}", flush=True)
        sample_args = build_parser().parse_args(["sample"])
        sample_args.model, sample_args.n, sample_args.num_problems = path, args.n, args.num_problems
        sample_args.template, sample_args.max_new_tokens, sample_args.label = "raw", 64, name
        sample_args.device = args.device
        sample_args.task_levels = args.task_levels
        sample_args.out = os.path.join(out, f"samples_{name}.jsonl")
        files.append(cmd_sample(sample_args))
    report_args = build_parser().parse_args(["report", *files, "--out", os.path.join(out, "report")])
    cmd_report(report_args)


def main():
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo"] + argv
    args = build_parser().parse_args(argv)
    {"sample": cmd_sample, "report": cmd_report, "judge": cmd_judge, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    from minirl.training import run_main
    run_main(main)
