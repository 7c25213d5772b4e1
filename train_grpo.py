"""train_grpo.py — RL from verifiable rewards with the GRPO family, on one GPU (or a CPU).

    python train_grpo.py                          # the bundled tiny model on the arithmetic task
    python train_grpo.py --model DIR --data math_train.jsonl      # Dr. GRPO defaults
    python train_grpo.py --model DIR --data train.jsonl --preset kim-trl

Exactly what one step does (minirl/grpo.py has the formulas):
 1. Take P problems (in a seeded per-epoch order) and sample n completions for each with
    minirl's sampler (temperature, top_p, top_k, max new tokens; stop at eos).
 2. Reward each completion: the synthetic task's verifier, the math grader against the
    gold answer, or a user function (--reward file.py:function). Truncated completions are
    kept, masked from the loss, or given a penalty reward (--truncated).
 3. Dynamic sampling (--dynamic-sampling, DAPO): drop groups whose rewards are all equal and
    sample more problems until P groups are kept or --max-sampling-rounds is reached.
 4. Advantages per group: (r - mean) / std (std of the group or the batch), or r - mean.
 5. For --epochs-per-rollout passes over the batch, split into --mini-batches optimizer
    steps: per-token clipped surrogate with eps_low / eps_high (clip-higher) plus beta * KL
    (k1 | k2 | k3) to the initial model, aggregated as GRPO, DAPO or Dr. GRPO; micro-batches
    by a token budget with gradient accumulation. With one pass and one mini-batch the
    update is exactly on-policy (ratio = 1, the plain policy gradient); otherwise the old
    log-probs are the rollout policy's, computed before the first update.
 6. Grad-norm clipping, AdamW with fp32 master weights, LR warmup + schedule; a step with
    non-finite loss or gradients is skipped (the run stops after --max-bad-steps in a row).
Presets: "drgrpo" (the default with --model: Dr. GRPO / Oat-Zero, the seed paper's RL model:
lr 1e-6, beta 0, temperature 1.0, 8 samples, no std, constant normaliser), "kim-trl" (the seed
paper's own TRL run, RESEARCH.md), and "demo" (the default without --model: the bundled tiny
model, settings that show learning on a CPU in minutes). Explicit flags override presets.
"""
import argparse
import functools
import json
import math
import os
import sys
import time
from collections import defaultdict

from minirl.common import BUNDLED_MODEL  # assets/tiny-arith

# grpo.policy_loss statistics that are counts or sums (the others are per-token means).
COUNT_STATS = ("n_tokens", "entropy_sum", "n_completion_tokens")

PRESETS = {
    "drgrpo": dict(lr=1e-6, warmup_steps=0, beta=0.0, temperature=1.0, top_p=1.0, top_k=0,
                   num_samples=8, prompts_per_step=128, max_new_tokens=3000, advantage_std="none",
                   loss_aggregation="seq-mean-token-sum-norm", adam_beta1=0.9, adam_beta2=0.999,
                   weight_decay=0.0, grad_clip=1.0, template="boxed", wrong_reward=0.0),
    "kim-trl": dict(lr=1e-6, warmup_steps=25, beta=0.0, temperature=0.9, top_p=1.0, top_k=50,
                    num_samples=10, max_prompt_len=256, advantage_std="group",
                    loss_aggregation="seq-mean-token-mean", adam_beta1=0.9, adam_beta2=0.99,
                    weight_decay=0.1, grad_clip=0.1, template="boxed", wrong_reward=-1.0),
    "demo": dict(model=BUNDLED_MODEL, task="arithmetic", task_levels="1,2,3", template="raw", lr=5e-5,
                 warmup_steps=2, steps=300, prompts_per_step=16, num_samples=8, max_new_tokens=64,
                 temperature=1.0, advantage_std="group", loss_aggregation="token-mean",
                 grad_clip=1.0, eval_every=0, eval_problems=300, eval_samples=8,
                 train_problems=4000, weight_decay=0.0, save_every=100),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default=None,
      help="settings bundle; default: demo without --model, drgrpo with it")
    # what to train on
    a("--model", default=None, help="HF folder (or hub id with huggingface_hub)")
    a("--data", default=None, help="problems jsonl/parquet (question + gold answer); else --task")
    a("--task", default="arithmetic", choices=["arithmetic", "countdown"],
      help="synthetic verifiable task used when --data is not given")
    a("--task-levels", default=None, help="comma-separated difficulty levels of the task (default: all)")
    a("--train-problems", type=int, default=4000, help="synthetic problems generated for training")
    a("--reward", default=None, help="custom reward: path/to/file.py:function (response, problem) -> float")
    a("--grader", default="minirl", choices=["minirl", "math_verify"], help="math answer checker for --data")
    a("--correct-reward", type=float, default=1.0)
    a("--wrong-reward", type=float, default=0.0)
    a("--template", default="boxed", help="prompt template: boxed, r1-zero, raw, chat")
    a("--question-field", default=None)
    a("--answer-field", default=None)
    # rollouts
    a("--steps", type=int, default=200, help="training steps (one rollout batch each)")
    a("--prompts-per-step", type=int, default=128, help="P: problems (groups) per step")
    a("--num-samples", type=int, default=8, help="n: completions per problem (group size)")
    a("--max-new-tokens", type=int, default=3000)
    a("--max-prompt-len", type=int, default=None, help="skip problems whose prompt is longer")
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    a("--top-k", type=int, default=0)
    a("--dynamic-sampling", action="store_true", help="drop groups with all-equal rewards, resample")
    a("--max-sampling-rounds", type=int, default=4, help="cap on rollout rounds per step with --dynamic-sampling")
    a("--truncated", default="keep", choices=["keep", "mask", "penalty"],
      help="completions that hit --max-new-tokens: keep, mask from the loss, or penalise")
    a("--truncation-penalty", type=float, default=-1.0, help="reward of a truncated completion with --truncated penalty")
    # loss
    a("--advantage-std", default="none", choices=["group", "batch", "none"])
    a("--loss-aggregation", default="seq-mean-token-sum-norm",
      choices=["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
    a("--eps-low", type=float, default=0.2)
    a("--eps-high", type=float, default=0.2, help="> eps-low is DAPO's clip-higher (e.g. 0.28)")
    a("--beta", type=float, default=0.0, help="KL coefficient; 0 loads no reference model")
    a("--kl-estimator", default="k3", choices=["k1", "k2", "k3"])
    a("--ref-device", default=None, help="device of the reference model (e.g. cpu to save GPU memory)")
    a("--epochs-per-rollout", type=int, default=1, help="passes over each rollout batch")
    a("--mini-batches", type=int, default=1, help="optimizer steps per pass")
    # optimisation
    a("--lr", type=float, default=1e-6)
    a("--lr-schedule", default="constant", choices=["constant", "cosine", "linear"])
    a("--warmup-steps", type=int, default=0)
    a("--weight-decay", type=float, default=0.0)
    a("--adam-beta1", type=float, default=0.9)
    a("--adam-beta2", type=float, default=0.999)
    a("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    a("--micro-batch-tokens", type=int, default=None, help="padded tokens per micro-batch (default 16384 GPU / 4096 CPU)")
    a("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"], help="auto = on for CUDA")
    a("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row")
    # machine
    a("--device", default=None, help="default: cuda if available else cpu")
    a("--dtype", default=None, help="bf16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    a("--seed", type=int, default=0)
    # evaluation, checkpoints, logging
    a("--eval-every", type=int, default=50, help="held-out evaluation every k steps (0 = only before/after)")
    a("--eval-data", default=None, help="held-out problems file (default: a held-out synthetic set)")
    a("--eval-problems", type=int, default=200)
    a("--eval-samples", type=int, default=4, help="samples per held-out problem for pass@1")
    a("--out", default=None, help="run folder (default runs/grpo-<time>)")
    a("--save-every", type=int, default=50)
    a("--keep-last", type=int, default=2)
    a("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    a("--stop-after", type=int, default=None, help="stop this invocation after k steps (resume later)")
    a("--wandb-project", default=None)
    a("--tensorboard", action="store_true")
    a("--dump-rollouts", default=None, metavar="FILE",
      help="append each step's rollouts (tokens, rewards, advantages) and its updates (mini-batch "
           "membership, loss) to FILE as one JSON line per step, to inspect or recompute a step")
    return p


def parse_args(argv=None):
    """Parse twice: once to find the preset, then with the preset's values as defaults."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    preset = first.preset or ("drgrpo" if first.model else "demo")
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.preset = preset
    return args


def main():
    args = parse_args()
    import torch

    import minirl
    from minirl import grpo, tasks
    from minirl.common import MinirlError, default_device, default_dtype, parse_dtype
    from minirl.data import format_prompt, load_problems
    from minirl.grader import grade
    from minirl.training import (MasterAdamW, Progress, RunDir, grad_norm_and_finite, load_checkpoint,
                                 lr_at, step_generator, use_gradient_checkpointing)

    # ---------------------------------------------------------------- checks before any work
    for flag, v in (("--steps", args.steps), ("--prompts-per-step", args.prompts_per_step),
                    ("--num-samples", args.num_samples), ("--max-new-tokens", args.max_new_tokens),
                    ("--epochs-per-rollout", args.epochs_per_rollout), ("--mini-batches", args.mini_batches)):
        if v < 1:
            raise MinirlError(f"{flag} must be >= 1 (got {v})")
    if args.num_samples < 2 and args.advantage_std == "group":
        raise MinirlError("--num-samples 1 gives every group a zero advantage; use >= 2")
    if args.prompts_per_step % args.mini_batches:
        raise MinirlError(f"--prompts-per-step {args.prompts_per_step} is not divisible by "
                          f"--mini-batches {args.mini_batches}")
    if args.beta == 0 and args.ref_device:
        raise MinirlError("--ref-device is set but --beta is 0 (no reference model is loaded)")
    if args.resume and not args.out:
        raise MinirlError("--resume needs --out (the run folder to continue)")
    if not os.path.exists(args.model) and args.model.count("/") != 1:
        raise MinirlError(f"--model {args.model}: folder not found")
    device = torch.device(args.device) if args.device else default_device()
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    out = args.out or os.path.join("runs", "grpo-" + time.strftime("%Y%m%d-%H%M%S"))
    run = RunDir(out)
    args_path = os.path.join(out, "args.json")
    if args.resume and os.path.exists(args_path):
        with open(args_path) as f:
            saved = json.load(f)
        ignore = {"resume", "stop_after", "steps", "out", "wandb_project", "tensorboard", "device"}
        changed = [k for k, v in vars(args).items() if k not in ignore and saved.get(k, v) != v]
        if changed:
            raise MinirlError(f"--resume: flags differ from {args_path}: " +
                              ", ".join(f"--{k.replace('_', '-')}" for k in changed))

    # ---------------------------------------------------------------- data and rewards
    tokenizer = minirl.load_tokenizer(args.model)
    levels = [int(x) for x in args.task_levels.split(",")] if args.task_levels else None
    if args.data:
        train_problems = load_problems(args.data, question_field=args.question_field,
                                       answer_field=args.answer_field)
        eval_problems = (load_problems(args.eval_data) if args.eval_data
                         else train_problems[:0])  # no eval unless a held-out file is given
    else:
        train_problems = tasks.make_problems(args.task, args.train_problems, seed=args.seed, levels=levels)
        # Held-out: drawn with another seed. Not de-duplicated against the training draws:
        # the easiest levels have few distinct questions (level 1: 200), so a few repeat.
        eval_problems = (load_problems(args.eval_data) if args.eval_data else
                         tasks.make_problems(args.task, args.eval_problems, seed=args.seed + 7_777_777, levels=levels))
    user_reward = tasks.load_reward_fn(args.reward) if args.reward else None
    grader_timeouts = [0]

    def is_correct(problem, text):
        if not args.data:
            return tasks.verify(problem, text) > 0
        g = grade(text, problem.answer, backend=args.grader)
        grader_timeouts[0] += int(g.timed_out)
        return g.correct

    def reward_of(problem, text, finish_reason):
        correct = is_correct(problem, text)
        if args.truncated == "penalty" and finish_reason == "length":
            return args.truncation_penalty, correct
        if user_reward is not None:
            return float(user_reward(text, problem)), correct
        return (args.correct_reward if correct else args.wrong_reward), correct

    add_special = args.template != "chat"  # chat templates write their own BOS

    def encode_prompt(problem):
        return tokenizer.encode(format_prompt(problem.question, args.template, tokenizer),
                                add_special_tokens=add_special)

    prompt_ids = [encode_prompt(p) for p in train_problems]  # tokenised once for the whole run
    eval_ids = [encode_prompt(p) for p in eval_problems]
    if args.max_prompt_len:
        keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= args.max_prompt_len]
        train_problems = [train_problems[i] for i in keep]
        prompt_ids = [prompt_ids[i] for i in keep]
    if not train_problems:
        raise MinirlError("no training problems (empty data, or every prompt is longer than --max-prompt-len)")
    if len(train_problems) < args.prompts_per_step:
        raise MinirlError(f"--prompts-per-step {args.prompts_per_step} is larger than the "
                          f"{len(train_problems)} training problems")

    # ---------------------------------------------------------------- model, optimizer, resume
    start_step, data_pos, extra = 0, 0, {}
    if args.resume and run.latest_checkpoint():
        ckpt = run.latest_checkpoint()
        model, state = load_checkpoint(ckpt, device, dtype)
        start_step, extra = state["step"], state["extra"]
        data_pos = extra["data_pos"]
        run.truncate_metrics(start_step)
    else:
        model = minirl.load_model(args.model, device=device, dtype=dtype)
        state = None
    run.save_args(vars(args))
    run.enable_loggers(args.wandb_project, args.tensorboard, run_name=os.path.basename(out), config=vars(args))
    ref_model = None
    if args.beta > 0:
        ref_model = minirl.load_model(args.model, device=args.ref_device or device, dtype=dtype)
        ref_model.requires_grad_(False)
    model.gradient_checkpointing = use_gradient_checkpointing(args.gradient_checkpointing, device)
    optimizer = MasterAdamW(model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    micro_tokens = args.micro_batch_tokens or (16384 if device.type == "cuda" else 4096)
    pad_id = tokenizer.pad_token_id
    stop_ids = tokenizer.eos_token_ids
    eval_seed = args.seed + 12345

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch):
        """The shuffled problem order of one epoch (computed once, not once per problem)."""
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        return torch.randperm(len(train_problems), generator=g).tolist()

    def take_problems(pos, count):
        """Problem indices pos .. pos+count of the endless per-epoch-shuffled stream."""
        idx = []
        for k in range(pos, pos + count):
            epoch, i = divmod(k, len(train_problems))
            idx.append(epoch_order(epoch)[i])
        return idx

    def rollout(indices, generator):
        t0 = time.time()
        model.eval()
        with torch.no_grad():
            groups = minirl.generate(model, [prompt_ids[i] for i in indices], n=args.num_samples,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, top_k=args.top_k, stop_token_ids=stop_ids,
                                     generator=generator)
        return groups, time.time() - t0

    def evaluate_heldout():
        """pass@1 (mean over --eval-samples samples at the training temperature) and greedy
        accuracy, overall and per difficulty level."""
        if not eval_problems:
            return None
        model.eval()
        with torch.no_grad():
            sampled = minirl.generate(model, eval_ids, n=args.eval_samples, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      stop_token_ids=stop_ids, seed=eval_seed)
            greedy = minirl.generate(model, eval_ids, n=1, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                     stop_token_ids=stop_ids)
        per_level = defaultdict(lambda: [0, 0.0, 0.0])  # level -> [problems, pass@1 sum, greedy sum]
        for p, group, g in zip(eval_problems, sampled, greedy):
            acc = sum(is_correct(p, tokenizer.decode(c.token_ids)) for c in group) / len(group)
            gr = float(is_correct(p, tokenizer.decode(g[0].token_ids)))
            for key in ["all"] + ([p.difficulty] if p.difficulty is not None else []):
                per_level[key][0] += 1
                per_level[key][1] += acc
                per_level[key][2] += gr
        return {str(k): {"problems": v[0], "pass@1": v[1] / v[0], "greedy": v[2] / v[0]}
                for k, v in per_level.items()}

    # ---------------------------------------------------------------- the loop
    print(f"run folder {out} | preset {args.preset} | model {args.model} | {device} {str(dtype).replace('torch.', '')} | "
          f"{len(train_problems)} train / {len(eval_problems)} held-out problems | P={args.prompts_per_step} "
          f"n={args.num_samples} steps={args.steps}", flush=True)
    eval_before = extra.get("eval_before")
    if eval_before is None:
        eval_before = evaluate_heldout()
        if eval_before:
            print(f"held-out before training: pass@1 {eval_before['all']['pass@1']:.3f} "
                  f"greedy {eval_before['all']['greedy']:.3f}", flush=True)
            run.log({"step": 0, **{f"eval/{k}": v for k, v in flatten(eval_before).items()}})
    progress = Progress(args.steps, start_step)
    bad_steps = 0
    last_step = min(args.steps, start_step + args.stop_after) if args.stop_after else args.steps
    for step in range(start_step + 1, last_step + 1):
        lr = lr_at(step - 1, args.lr, args.warmup_steps, args.steps, args.lr_schedule)
        optimizer.set_lr(lr)
        grader_timeouts[0] = 0

        # 1-3. rollouts, rewards, dynamic sampling
        kept, n_groups, n_zero_std, rounds, t_gen, gen_tokens = [], 0, 0, 0, 0.0, 0
        rewards_all, correct_all, lengths, truncated = [], [], [], []
        while len(kept) < args.prompts_per_step and (rounds == 0 or (args.dynamic_sampling and rounds < args.max_sampling_rounds)):
            need = args.prompts_per_step - len(kept)
            indices = take_problems(data_pos, need)
            data_pos += need
            groups, dt = rollout(indices, step_generator(args.seed, step * 64 + rounds, device))
            t_gen += dt
            rounds += 1
            for i, group in zip(indices, groups):
                texts = [tokenizer.decode(c.token_ids) for c in group]
                scored = [reward_of(train_problems[i], t, c.finish_reason) for t, c in zip(texts, group)]
                rewards = [r for r, _ in scored]
                n_groups += 1
                gen_tokens += sum(len(c.token_ids) for c in group)
                rewards_all += rewards
                correct_all += [c for _, c in scored]
                lengths += [len(c.token_ids) for c in group]
                truncated += [c.finish_reason == "length" for c in group]
                zero_std = max(rewards) == min(rewards)
                n_zero_std += zero_std
                if not (args.dynamic_sampling and zero_std):
                    kept.append((i, group, rewards))

        # 4. advantages and the samples the update sees
        samples, dump_samples, dump_updates = [], [], []
        rewards_of = {id(c): r for _, group, rs in kept for c, r in zip(group, rs)}
        if kept:
            rewards_t = torch.tensor([r for _, _, r in kept])  # [P, n]
            adv = grpo.group_advantages(rewards_t, args.advantage_std)
            for (i, group, _), a_row in zip(kept, adv.tolist()):
                for c, a in zip(group, a_row):
                    mask_it = args.truncated == "mask" and c.finish_reason == "length"
                    samples.append(grpo.Sample(prompt_ids[i], list(c.token_ids), a, loss_mask=not mask_it))
                    dump_samples.append({"prompt_ids": prompt_ids[i], "completion_ids": list(c.token_ids),
                                         "reward": rewards_of[id(c)], "advantage": a,
                                         "finish_reason": c.finish_reason, "group": len(dump_samples) // args.num_samples})

        # 5-6. policy update
        t0 = time.time()
        on_policy = args.epochs_per_rollout == 1 and args.mini_batches == 1
        model.train()
        if samples and (not on_policy or ref_model is not None):
            with torch.no_grad():
                for mb in grpo.micro_batches(samples, micro_tokens):
                    if not on_policy:
                        lp, m = grpo.completion_logprobs(model, mb, pad_id, args.temperature)
                        for s, row, mm in zip(mb, lp, m):
                            s.old_logprobs = row[mm].float()
                    if ref_model is not None:
                        lp, m = grpo.completion_logprobs(ref_model, mb, pad_id, args.temperature)
                        for s, row, mm in zip(mb, lp, m):
                            s.ref_logprobs = row[mm].float()
        stats_sum, loss_sum, grad_norm, skipped, train_tokens = {}, 0.0, 0.0, 0, 0
        n_updates = 0
        for epoch in range(args.epochs_per_rollout):
            g = torch.Generator().manual_seed(args.seed * 7 + step * 131 + epoch)
            order = torch.randperm(len(samples), generator=g).tolist() if len(samples) else []
            per_mb = len(order) // args.mini_batches if order else 0
            for mbi in range(args.mini_batches if samples else 0):
                chunk = [samples[j] for j in order[mbi * per_mb:(mbi + 1) * per_mb]]
                active = [s for s in chunk if s.loss_mask]
                num_seq, num_tok = len(active), sum(len(s.completion_ids) for s in active)
                optimizer.zero_grad()
                update_loss = 0.0  # this update's loss, kept on the device until the update
                ratios = []
                for mb in grpo.micro_batches(chunk, micro_tokens):
                    loss, st = grpo.policy_loss(
                        model, mb, pad_id=pad_id, temperature=args.temperature, eps_low=args.eps_low,
                        eps_high=args.eps_high, beta=args.beta, kl_estimator=args.kl_estimator,
                        aggregation=args.loss_aggregation, num_sequences=num_seq, num_tokens=num_tok,
                        norm_length=args.max_new_tokens, on_policy=on_policy)
                    loss.backward()
                    update_loss = update_loss + loss.detach()
                    # Statistics stay 0-dim device tensors (no host sync per micro-batch);
                    # the per-token means are weighted by their token counts.
                    for k, v in st.items():
                        v = v.detach() if k in COUNT_STATS else v.detach() * st["n_tokens"]
                        stats_sum[k] = stats_sum[k] + v if k in stats_sum else v
                    train_tokens += sum(len(s.prompt_ids) + len(s.completion_ids) for s in mb)
                    ratios += [float(st["ratio_min"]), float(st["ratio_max"])] if args.dump_rollouts else []
                update_loss = float(update_loss)  # one read per update (with the grad norm's)
                dump_updates.append({"epoch": epoch, "samples": order[mbi * per_mb:(mbi + 1) * per_mb],
                                     "loss": update_loss, "ratio_min": min(ratios, default=1.0),
                                     "ratio_max": max(ratios, default=1.0)})
                loss_sum += update_loss
                norm, finite = grad_norm_and_finite(model.parameters(), args.grad_clip)
                if finite and math.isfinite(update_loss):
                    optimizer.step()
                    bad_steps = 0
                else:
                    skipped += 1
                    bad_steps += 1
                    optimizer.zero_grad()
                    if bad_steps >= args.max_bad_steps:
                        print(f"error: {bad_steps} non-finite steps in a row; stopping (last checkpoint kept)",
                              file=sys.stderr)
                        sys.exit(1)
                grad_norm = norm
                n_updates += 1
        optimizer.zero_grad()
        t_train = time.time() - t0

        # logging
        keys = list(stats_sum)
        values = torch.stack([stats_sum[k].float() for k in keys]).tolist() if keys else []
        stats = defaultdict(float, zip(keys, values))  # one transfer for all statistics
        ntok = max(stats["n_tokens"], 1.0)
        rec = {
            "step": step, "reward_mean": mean(rewards_all), "correct_frac": mean(correct_all),
            "zero_std_frac": n_zero_std / max(n_groups, 1), "groups_kept": len(kept), "groups_sampled": n_groups,
            "sampling_rounds": rounds, "len_mean": mean(lengths), "len_max": max(lengths) if lengths else 0,
            "truncated_frac": mean(truncated), "loss": loss_sum / max(n_updates, 1),
            "clip_low": stats["clip_low_frac"] / ntok, "clip_high": stats["clip_high_frac"] / ntok,
            "ratio_mean": stats["ratio_mean"] / ntok if stats["n_tokens"] else 1.0,
            "kl": stats["kl_mean"] / ntok, "entropy": stats["entropy_sum"] / max(stats["n_completion_tokens"], 1.0),
            "grad_norm": grad_norm, "lr": lr, "skipped_updates": skipped, "grader_timeouts": grader_timeouts[0],
            "gen_tok_s": gen_tokens / max(t_gen, 1e-9), "train_tok_s": train_tokens / max(t_train, 1e-9),
            "t_gen": t_gen, "t_train": t_train,
        }
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            ev = evaluate_heldout()
            if ev:
                rec.update({f"eval/{k}": v for k, v in flatten(ev).items()})
        run.log(rec)
        if args.dump_rollouts:
            with open(args.dump_rollouts, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "samples": dump_samples, "updates": dump_updates}) + "\n")
        print(f"step {step:4d}/{args.steps} | reward {rec['reward_mean']:.3f} correct {rec['correct_frac']:.3f} "
              f"zero-std {rec['zero_std_frac']:.2f} | len {rec['len_mean']:.0f}/{rec['len_max']} "
              f"trunc {rec['truncated_frac']:.2f} | clip {rec['clip_low']:.3f}/{rec['clip_high']:.3f} "
              f"kl {rec['kl']:.4f} ent {rec['entropy']:.3f} | gnorm {grad_norm:.3f} lr {lr:.2e} | "
              f"gen {rec['gen_tok_s']:.0f} tok/s {t_gen:.1f}s train {rec['train_tok_s']:.0f} tok/s {t_train:.1f}s | "
              f"{progress.eta(step)}"
              + (f" | held-out pass@1 {rec['eval/all/pass@1']:.3f}" if "eval/all/pass@1" in rec else ""), flush=True)
        if (args.save_every and step % args.save_every == 0) or step == last_step:
            run.save_checkpoint(step, model, tokenizer, optimizer, keep_last=args.keep_last,
                                extra={"data_pos": data_pos, "eval_before": eval_before})

    if last_step < args.steps:
        print(f"stopped after step {last_step} (--stop-after); continue with --resume --out {out}")
        return
    # ---------------------------------------------------------------- the end: before / after
    final_dir = os.path.join(out, "final")
    minirl.save_model(model, final_dir, tokenizer=tokenizer)
    eval_after = evaluate_heldout()
    summary = {"eval_before": eval_before, "eval_after": eval_after, "final_model": final_dir}
    from minirl.common import atomic_write_json
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    if eval_after:
        run.log({"step": args.steps, **{f"eval/{k}": v for k, v in flatten(eval_after).items()}})
        print(before_after_table(eval_before, eval_after))
    print(f"final model: {final_dir}")


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def flatten(ev):
    return {f"{level}/{k}": v for level, d in ev.items() for k, v in d.items()}


def before_after_table(before, after):
    levels = sorted((k for k in after if k != "all"), key=lambda k: int(k) if k.isdigit() else 0) + ["all"]
    lines = ["held-out pass@1 (mean over samples) and greedy accuracy, before -> after GRPO",
             f"{'level':>6} {'problems':>8} {'pass@1 before':>14} {'pass@1 after':>13} {'greedy before':>14} {'greedy after':>13}"]
    for k in levels:
        b, a = before[k], after[k]
        lines.append(f"{k:>6} {a['problems']:>8} {b['pass@1']:>14.3f} {a['pass@1']:>13.3f} "
                     f"{b['greedy']:>14.3f} {a['greedy']:>13.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from minirl.training import run_main
    run_main(main)
