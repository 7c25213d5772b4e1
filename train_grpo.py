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
Presets: "drgrpo" (the default with --model: Dr. GRPO / Oat-Zero's recipe, the RL model that
Kim et al., arXiv 2505.14216, analyse: lr 1e-6, beta 0, temperature 1.0, 8 samples, no std,
constant normaliser), "kim-trl" (the TRL settings of Kim et al.'s own GRPO run), and "demo" (the
default without --model: the bundled tiny model, settings that show learning on a CPU in
minutes). Explicit flags override presets.

More than one GPU: `torchrun --nproc_per_node N train_grpo.py ...`. A step's prompts are
split over the ranks (every N-th), each with its own seed, so the completions are the same for
any N; each rank samples from a plain replica of the weights gathered once per step, grades
its share, and the rewards are gathered so every rank computes the same advantages and
dynamic-sampling decision. Each mini-batch is the same set of samples as on one process,
each rank training on every N-th of them (global loss denominators; FSDP2 sums the
gradients). Rank 0 alone prints and writes. See minirl/distributed.py, docs/distributed.md.

Reading order: main() is setup plus the loop; one step is collect_rollouts ->
compute_advantages -> update_policy -> log_step, each defined below in that order. The loss
itself is minirl/grpo.py (policy_loss, token_loss, aggregate); the optimizer minirl/training.py.

Sampler/trainer mismatch (logged every step as mismatch_*): the sampler returns the
log-prob of each sampled token under the distribution it drew from (logits / temperature,
then top-k/top-p truncation, renormalised: see minirl/sampler.py); the trainer's log-prob of the
same token is log_softmax(logits / temperature) over the whole vocabulary, from a full
training forward, before the update (the "old" log-probs). With top-k/top-p the sampler's
value includes the renormalisation log(1 / kept mass) >= 0 on purpose: that is part of the
difference between the distribution sampled from and the one trained, which --rollout-correction
(tis / mis, minirl/grpo.py) corrects. Turn a correction on when mismatch_k3 is not negligible
(bf16 or a different sampler, or top-k/top-p sampling).

Zero-advantage samples: with beta = 0 (and no rollout correction, which does not change a
zero), a sample whose advantage is 0 (every sample of an all-right or all-wrong group) has a
zero gradient; the update skips its forward and backward, keeping every denominator
(--zero-advantage train computes it anyway; the update is the same).
"""
import argparse
import functools
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

import minirl
from minirl import distributed, grpo, tasks
from minirl.common import (BUNDLED_MODEL, MinirlError, atomic_write_json, default_device, default_dtype,
                          make_generator, parse_dtype)
from minirl.data import format_prompt, load_problems, prompt_add_special_tokens
from minirl.training import (BadSteps, MasterAdamW, Progress, RunDir, check_out_dir, check_resume_args,
                             grad_norm_and_finite, load_checkpoint, lr_at, use_gradient_checkpointing)

# grpo.policy_loss statistics: sums and counts are added over micro-batches, *_max / *_min
# kept as the extreme, and the others (per-token means) weighted by their token counts.
SUM_STATS = ("n_tokens", "entropy_sum", "n_completion_tokens", "mismatch_k3_sum", "mismatch_abs_sum",
             "mismatch_big_sum", "mismatch_tokens", "correction_weight_sum", "correction_capped_sum")
# Settings a resumed run may change: where it logs, how long it runs, the device.
MAY_CHANGE_ON_RESUME = {"resume", "stop_after", "steps", "out", "wandb_project", "tensorboard", "device",
                        "dump_rollouts"}

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
    a("--max-bad-steps", type=int, default=3, help="stop after this many non-finite updates in a row")
    a("--zero-advantage", default="skip", choices=["skip", "train"],
      help="with --beta 0: skip samples whose advantage is 0 in the update (same update, less work), "
           "or run them anyway (their tokens then count in the logged clip/ratio/entropy statistics)")
    a("--rollout-correction", default="none", choices=list(grpo.ROLLOUT_CORRECTIONS),
      help="weight the policy-gradient term by the trainer/sampler ratio of each token: tis = "
           "min(ratio, cap), mis = ratio where <= cap else 0 (see the module docstring)")
    a("--rollout-correction-cap", type=float, default=2.0, help="the cap C of --rollout-correction")
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


def check_args(args):
    """Every flag, before anything is loaded or written: one line naming the flag."""
    for flag in ("steps", "prompts_per_step", "num_samples", "max_new_tokens", "epochs_per_rollout",
                 "mini_batches", "max_sampling_rounds", "eval_problems", "eval_samples", "train_problems",
                 "max_bad_steps"):
        if getattr(args, flag) < 1 and not (flag == "eval_problems" and getattr(args, flag) == 0):
            raise MinirlError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    for flag in ("eval_every", "save_every", "keep_last", "warmup_steps", "top_k"):
        if getattr(args, flag) < 0:
            raise MinirlError(f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(args, flag)})")
    for flag in ("micro_batch_tokens", "max_prompt_len", "stop_after"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise MinirlError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise MinirlError(f"--temperature must be > 0 (got {args.temperature}): training needs a "
                          "sampling distribution (temperature 0 is greedy decoding)")
    if not 0 < args.top_p <= 1:
        raise MinirlError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise MinirlError(f"--lr must be > 0 (got {args.lr})")
    for flag in ("weight_decay", "grad_clip", "beta", "eps_low", "eps_high"):
        if not getattr(args, flag) >= 0:
            raise MinirlError(f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(args, flag)})")
    if args.eps_low >= 1:
        raise MinirlError(f"--eps-low must be < 1 (got {args.eps_low}): the ratio is positive")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            raise MinirlError(f"--{flag.replace('_', '-')} must be in [0, 1) (got {getattr(args, flag)})")
    if not args.rollout_correction_cap > 0:
        raise MinirlError(f"--rollout-correction-cap must be > 0 (got {args.rollout_correction_cap})")
    if args.num_samples < 2 and args.advantage_std == "group":
        raise MinirlError("--num-samples 1 gives every group a zero advantage; use >= 2")
    if args.beta == 0 and args.ref_device:
        raise MinirlError("--ref-device is set but --beta is 0 (no reference model is loaded)")
    if args.resume and not args.out:
        raise MinirlError("--resume needs --out (the run folder to continue)")
    if not os.path.exists(args.model) and args.model.count("/") != 1:
        raise MinirlError(f"--model {args.model}: folder not found")


# ==================================================================== setup

@dataclass
class Setup:
    """What the loop needs, built once by main()."""
    args: argparse.Namespace
    device: torch.device
    run: RunDir
    tokenizer: object
    train_problems: list
    prompt_ids: list  # tokenised prompts of train_problems
    eval_problems: list
    eval_ids: list
    model: object = None
    ref_model: object = None
    optimizer: object = None
    bad_steps: BadSteps = None
    grader_timeouts: int = 0
    micro_tokens: int = 4096
    reward_fn: object = None
    dist: distributed.Dist = field(default_factory=distributed.Dist)  # one process without torchrun
    dtype: torch.dtype = torch.float32  # compute dtype


def load_data(args, tokenizer):
    """(train problems, their prompt ids, held-out problems, their prompt ids)."""
    levels = [int(x) for x in args.task_levels.split(",")] if args.task_levels else None
    if args.data:
        train = load_problems(args.data, question_field=args.question_field, answer_field=args.answer_field)
        held_out = load_problems(args.eval_data) if args.eval_data else []  # no eval without a held-out file
    else:
        train = tasks.make_problems(args.task, args.train_problems, seed=args.seed, levels=levels)
        # Held-out: drawn with another seed. Not de-duplicated against the training draws:
        # the easiest levels have few distinct questions (level 1: 200), so a few repeat.
        held_out = (load_problems(args.eval_data) if args.eval_data else
                    tasks.make_problems(args.task, args.eval_problems, seed=args.seed + 7_777_777, levels=levels)
                    if args.eval_problems else [])
    add_special = prompt_add_special_tokens(args.template, tokenizer)  # a chat template writes its own BOS

    def encode(problem):
        return tokenizer.encode(format_prompt(problem.question, args.template, tokenizer), add_special_tokens=add_special)

    prompt_ids = [encode(p) for p in train]  # tokenised once for the whole run
    if args.max_prompt_len:
        keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= args.max_prompt_len]
        train, prompt_ids = [train[i] for i in keep], [prompt_ids[i] for i in keep]
    if not train:
        raise MinirlError("no training problems (empty data, or every prompt is longer than --max-prompt-len)")
    if len(train) < args.prompts_per_step:
        raise MinirlError(f"--prompts-per-step {args.prompts_per_step} is larger than the "
                          f"{len(train)} training problems")
    return train, prompt_ids, held_out, [encode(p) for p in held_out]


def load_policy(S, dtype):
    """Model (from the latest checkpoint with --resume), reference model, optimizer; returns
    (start step, data position, checkpoint extras)."""
    args, state, start_step, data_pos, extra = S.args, None, 0, 0, {}
    ckpt, notes = distributed.from_main(S.run.resume_checkpoint, S.dist) if args.resume else (None, [])
    if S.dist.on or distributed.is_sharded_checkpoint(ckpt):
        start_step, extra = load_sharded_policy(S, ckpt)
        data_pos = extra.get("data_pos", 0)
    elif ckpt:
        S.model, state = load_checkpoint(ckpt, S.device, dtype)
        start_step, extra = state["step"], state["extra"]
        data_pos = extra["data_pos"]
    if args.resume and S.dist.main:  # metric lines after the checkpoint (or all, with none) are written again
        notes += S.run.truncate_metrics(start_step if ckpt else -1)
    for note in notes:  # damaged checkpoints skipped, a torn metrics line, leftovers removed
        print(note, flush=True)
    if S.dist.on or distributed.is_sharded_checkpoint(ckpt):
        return start_step, data_pos, extra
    if not ckpt:
        S.model = minirl.load_model(args.model, device=S.device, dtype=dtype)
    if args.beta > 0:
        S.ref_model = minirl.load_model(args.model, device=args.ref_device or S.device, dtype=dtype)
        S.ref_model.requires_grad_(False)
    S.model.gradient_checkpointing = use_gradient_checkpointing(args.gradient_checkpointing, S.device)
    S.optimizer = MasterAdamW(S.model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.weight_decay)
    if state is not None:
        S.optimizer.load_state_dict(state["optimizer"])
    return start_step, data_pos, extra


def load_sharded_policy(S, ckpt):
    """load_policy under torchrun (or for a checkpoint written under torchrun): fp32 weights
    sharded with FSDP2 (they are the master weights; compute in --dtype), the reference
    model sharded the same way, the checkpoint's shards resharded to this run's ranks."""
    args, dist = S.args, S.dist
    S.model = distributed.shard(minirl.load_model(args.model, device=S.device, dtype=torch.float32), dist, S.dtype)
    if args.beta > 0:
        ref = minirl.load_model(args.model, device=args.ref_device or S.device, dtype=torch.float32)
        S.ref_model = distributed.shard(ref.requires_grad_(False), dist, S.dtype)
    S.model.gradient_checkpointing = use_gradient_checkpointing(args.gradient_checkpointing, S.device)
    S.optimizer = MasterAdamW(S.model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.weight_decay)
    if ckpt is None:
        return 0, {}
    state, resharded = distributed.load_checkpoint(ckpt, S.model, S.optimizer, dist)
    print(f"resumed from {ckpt} at step {state['step']}{resharded}", flush=True)
    if not dist.on and S.dtype != torch.float32:  # one process: compute weights + fp32 master copy
        saved = {"opt": S.optimizer.opt.state_dict(), "master": [p.detach().clone() for p in S.model.parameters()]}
        S.model.to(S.dtype)
        S.optimizer = MasterAdamW(S.model.parameters(), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay)
        S.optimizer.load_state_dict(saved)
        if S.ref_model is not None:
            S.ref_model.to(S.dtype)
    return state["step"], state["extra"]


def main():
    args = parse_args()
    check_args(args)
    try:
        dtype = parse_dtype(args.dtype)
    except MinirlError as e:
        raise MinirlError(f"--dtype: {e}") from None
    device = torch.device(args.device) if args.device else default_device()
    dtype = dtype or default_dtype(device)
    out = args.out or os.path.join("runs", "grpo-" + time.strftime("%Y%m%d-%H%M%S"))
    check_out_dir(out, args.resume)
    dist = distributed.init(device)  # one process without torchrun
    device = dist.device
    distributed.quiet_unless_main(dist)
    args_path = os.path.join(out, "args.json")
    if args.resume and os.path.exists(args_path):
        with open(args_path) as f:
            check_resume_args(json.load(f), vars(args), MAY_CHANGE_ON_RESUME, args_path)
    tokenizer = minirl.load_tokenizer(args.model)
    train, prompt_ids, held_out, eval_ids = load_data(args, tokenizer)
    S = Setup(args, device, RunDir(out), tokenizer, train, prompt_ids, held_out, eval_ids,
              bad_steps=BadSteps(args.max_bad_steps),
              micro_tokens=args.micro_batch_tokens or (16384 if device.type == "cuda" else 4096),
              reward_fn=tasks.load_reward_fn(args.reward) if args.reward else None, dist=dist, dtype=dtype)
    start_step, data_pos, extra = load_policy(S, dtype)
    if dist.main:
        S.run.save_args(vars(args))
        S.run.enable_loggers(args.wandb_project, args.tensorboard, run_name=os.path.basename(out), config=vars(args))
    print(f"run folder {out} | preset {args.preset} | model {args.model} | {device} {str(dtype).replace('torch.', '')} | "
          f"{len(train)} train / {len(held_out)} held-out problems | P={args.prompts_per_step} "
          f"n={args.num_samples} steps={args.steps}", flush=True)
    eval_before = extra.get("eval_before")
    if eval_before is None:
        eval_before = evaluate_heldout(S)
        if eval_before:
            print(f"held-out before training: pass@1 {eval_before['all']['pass@1']:.3f} "
                  f"greedy {eval_before['all']['greedy']:.3f}", flush=True)
            if dist.main:
                S.run.log({"step": 0, **{f"eval/{k}": v for k, v in flatten(eval_before).items()}})

    # ---------------------------------------------------------------- the loop: one GRPO step each
    progress = Progress(args.steps, start_step)
    last_step = min(args.steps, start_step + args.stop_after) if args.stop_after else args.steps
    for step in range(start_step + 1, last_step + 1):
        lr = lr_at(step - 1, args.lr, args.warmup_steps, args.steps, args.lr_schedule)
        S.optimizer.set_lr(lr)
        rollouts, data_pos = collect_rollouts(S, step, data_pos)  # 1-3. sample, reward, dynamic sampling
        samples = compute_advantages(S, rollouts)                 # 4. advantages per group
        update = update_policy(S, step, samples)                  # 5-6. log-probs, mini-batches, optimizer
        log_step(S, step, lr, rollouts, samples, update, progress)
        if (args.save_every and step % args.save_every == 0) or step == last_step:
            extra = {"data_pos": data_pos, "eval_before": eval_before}
            if dist.on:  # every rank writes its shards
                distributed.save_checkpoint(S.run, step, S.model, S.optimizer, tokenizer, dist, extra, args.keep_last)
            else:
                S.run.save_checkpoint(step, S.model, tokenizer, S.optimizer, keep_last=args.keep_last, extra=extra)
    if last_step < args.steps:
        print(f"stopped after step {last_step} (--stop-after); continue with --resume --out {out}")
    else:
        finish(S, eval_before)
    distributed.close(dist)


# ==================================================================== one step, in data order

@dataclass
class Rollouts:
    """One step's sampled groups and what the log line reports about them."""
    kept: list = field(default_factory=list)  # (problem index, completions, rewards) per kept group
    rewards: list = field(default_factory=list)  # every sampled completion's, kept or not
    correct: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    truncated: list = field(default_factory=list)
    groups: int = 0
    zero_std: int = 0
    rounds: int = 0
    seconds: float = 0.0


def collect_rollouts(S, step, data_pos):
    """1-3. Sample n completions for the next problems, reward them, and with
    --dynamic-sampling drop all-equal groups and sample more problems (up to
    --max-sampling-rounds rounds). Each round has its own random stream (step, round)."""
    args, R, dist = S.args, Rollouts(), S.dist
    S.grader_timeouts = 0
    sampler = distributed.replica(S.model, dist, S.dtype)  # weights gathered once per step under torchrun
    while len(R.kept) < args.prompts_per_step and (
            R.rounds == 0 or (args.dynamic_sampling and R.rounds < args.max_sampling_rounds)):
        need = args.prompts_per_step - len(R.kept)
        indices = take_problems(args.seed, len(S.train_problems), data_pos, need)
        # One seed per prompt, keyed by its place in the data stream: a prompt's completions
        # do not depend on the other prompts of the call, so any split over ranks draws the same.
        seeds = [make_generator(args.seed, "rollout", step, R.rounds, data_pos + k).initial_seed()
                 for k in range(need)]
        data_pos += need
        t0, timeouts_before = time.time(), S.grader_timeouts
        sampler.eval()
        mine = distributed.split(list(range(need)), dist)  # every prompt without torchrun
        with torch.no_grad():
            groups = minirl.generate(
                sampler, [S.prompt_ids[indices[k]] for k in mine], n=args.num_samples,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, stop_token_ids=S.tokenizer.eos_token_ids, return_logprobs=True,
                seeds=[seeds[k] for k in mine])
        scored = [[reward_of(S, S.train_problems[indices[k]], S.tokenizer.decode(c.token_ids), c.finish_reason)
                   for c in group] for k, group in zip(mine, groups)]  # grading on each rank
        groups, scored = gather_rollouts(groups, scored, S, timeouts_before)
        R.seconds += time.time() - t0
        R.rounds += 1
        for i, group, scored_group in zip(indices, groups, scored):
            rewards = [r for r, _ in scored_group]
            R.groups += 1
            R.rewards += rewards
            R.correct += [ok for _, ok in scored_group]
            R.lengths += [len(c.token_ids) for c in group]
            R.truncated += [c.finish_reason == "length" for c in group]
            zero_std = max(rewards) == min(rewards)
            R.zero_std += zero_std
            if not (args.dynamic_sampling and zero_std):
                R.kept.append((i, group, rewards))
    return R, data_pos


def gather_rollouts(groups, scored, S, timeouts_before):
    """Under torchrun: every rank's sampled groups and their (reward, correct), back in the
    round's prompt order on every rank, and the round's grader timeouts summed. Else unchanged."""
    if not S.dist.on:
        return groups, scored
    shares = distributed.gather((groups, scored, S.grader_timeouts - timeouts_before), S.dist)
    S.grader_timeouts = timeouts_before + sum(t for _, _, t in shares)
    return distributed.merge([g for g, _, _ in shares]), distributed.merge([s for _, s, _ in shares])


@functools.lru_cache(maxsize=2)
def epoch_order(seed, n_problems, epoch):
    """The shuffled problem order of one epoch (computed once, not once per problem)."""
    return torch.randperm(n_problems, generator=make_generator(seed, "epoch-order", epoch)).tolist()


def take_problems(seed, n_problems, pos, count):
    """Problem indices pos .. pos+count of the endless per-epoch-shuffled stream."""
    return [epoch_order(seed, n_problems, k // n_problems)[k % n_problems] for k in range(pos, pos + count)]


def is_correct(S, problem, text):
    if not S.args.data:
        return tasks.verify(problem, text) > 0
    from minirl.grader import grade  # loaded only for --data (the math grader is large)
    g = grade(text, problem.answer, backend=S.args.grader)
    S.grader_timeouts += int(g.timed_out)
    return g.correct


def reward_of(S, problem, text, finish_reason):
    """(reward, correct) of one completion."""
    args, correct = S.args, is_correct(S, problem, text)
    if args.truncated == "penalty" and finish_reason == "length":
        return args.truncation_penalty, correct
    if S.reward_fn is not None:
        return float(S.reward_fn(text, problem)), correct
    return (args.correct_reward if correct else args.wrong_reward), correct


def compute_advantages(S, rollouts):
    """4. Group advantages (minirl.grpo.group_advantages) and the samples the update sees;
    with --truncated mask, truncated completions stay in their group's statistics but get
    no loss."""
    if not rollouts.kept:
        return []
    rewards = torch.tensor([r for _, _, r in rollouts.kept])  # [P, n]
    adv = grpo.group_advantages(rewards, S.args.advantage_std)  # [P, n]
    samples = []
    for (i, group, rs), a_row in zip(rollouts.kept, adv.tolist()):
        for c, a, r in zip(group, a_row, rs):
            masked = S.args.truncated == "mask" and c.finish_reason == "length"
            samples.append(grpo.Sample(S.prompt_ids[i], list(c.token_ids), a, loss_mask=not masked,
                                       sampler_logprobs=torch.as_tensor(c.logprobs, dtype=torch.float32),
                                       reward=r, finish_reason=c.finish_reason))
    return samples


def split_mini_batches(n, k, generator):
    """A shuffled split of range(n) into k mini-batches whose sizes differ by at most one:
    every sample is used (with fewer than k samples, some mini-batches are empty)."""
    order = torch.randperm(n, generator=generator).tolist()
    return [order[j * n // k:(j + 1) * n // k] for j in range(k)]


def update_policy(S, step, samples):
    """5-6. Old (rollout-policy) and reference log-probs, then --epochs-per-rollout passes of
    --mini-batches optimizer steps, each accumulated over micro-batches of at most
    --micro-batch-tokens padded tokens. Returns the statistics for the log."""
    args, model, t0 = S.args, S.model, time.time()
    on_policy = args.epochs_per_rollout == 1 and args.mini_batches == 1
    model.train()
    with torch.no_grad():
        for mb in rank_micro_batches(S, samples) if (not on_policy or S.ref_model) else []:
            batch = mb or samples[:1]  # None: a stand-in pass, discarded (see rank_micro_batches)
            if not on_policy:  # the rollout policy's log-probs, before any update
                lp, m = grpo.completion_logprobs(model, batch, S.tokenizer.pad_token_id, args.temperature)
                for s, row, mm in zip(mb or [], lp, m):
                    s.old_logprobs = row[mm].float()
            if S.ref_model is not None:
                lp, m = grpo.completion_logprobs(S.ref_model, batch, S.tokenizer.pad_token_id, args.temperature)
                for s, row, mm in zip(mb or [], lp, m):
                    s.ref_logprobs = row[mm].float()
    if S.dist.on and (not on_policy or S.ref_model):  # every rank gets every sample's
        mine = distributed.split(samples, S.dist)
        rows = distributed.gather([(cpu(s.old_logprobs), cpu(s.ref_logprobs)) for s in mine], S.dist)
        for s, (old, ref) in zip(samples, distributed.merge(rows)):
            s.old_logprobs, s.ref_logprobs = old, ref
    U = {"stats": {}, "losses": [], "grad_norm": 0.0, "skipped": 0, "train_tokens": 0, "dump": []}
    for epoch in range(args.epochs_per_rollout):
        split = split_mini_batches(len(samples), args.mini_batches, make_generator(args.seed, "mini-batches", step, epoch))
        for chunk_ids in split:
            chunk = [samples[j] for j in chunk_ids]
            if not any(s.loss_mask for s in chunk):  # empty or fully masked: nothing to learn, no step
                U["dump"].append({"epoch": epoch, "samples": chunk_ids, "loss": None})
                continue
            loss, ratio_range = train_mini_batch(S, chunk, on_policy, U)
            for p in model.parameters():  # every sample skipped (A = 0): AdamW still steps on a 0 gradient
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
            norm, finite = grad_norm_and_finite(model.parameters(), args.grad_clip)
            if S.bad_steps.record(finite and math.isfinite(loss)):
                S.optimizer.step()
            else:
                U["skipped"] += 1
            S.optimizer.zero_grad()
            U["grad_norm"] = norm
            U["losses"].append(loss)
            U["dump"].append({"epoch": epoch, "samples": chunk_ids, "loss": loss,
                              "ratio_min": ratio_range[0], "ratio_max": ratio_range[1]})
    if S.dist.on:
        reduce_over_ranks(S, U)
    U["seconds"] = time.time() - t0
    return U


def rank_micro_batches(S, samples):
    """The micro-batches of `samples` that this rank runs: all of them on one process; under
    torchrun those of its share (every N-th sample), padded with None up to the count of the
    rank with the most. Each forward under FSDP2 is a collective every rank must join, so a
    None is run on a stand-in sample with weight 0."""
    per_rank = [grpo.micro_batches(share, S.micro_tokens) for share in distributed.shares(samples, S.dist)]
    mine = per_rank[S.dist.rank]
    return mine + [None] * (max(map(len, per_rank)) - len(mine))


def cpu(t):
    return None if t is None else t.cpu()


def reduce_over_ranks(S, U):
    """Under torchrun: the update's statistics, token counts and ratio ranges of every rank
    combined, as one process would have them (sums added, extremes kept). The losses are
    already global (train_mini_batch)."""
    updates = [d for d in U["dump"] if d["loss"] is not None]
    shares = distributed.gather(({k: float(v) for k, v in U["stats"].items()}, U["train_tokens"],
                                 [(d["ratio_min"], d["ratio_max"]) for d in updates]), S.dist)
    total = {}
    for stats, _, _ in shares:
        for k, v in stats.items():
            pick = max if k.endswith("_max") else min if k.endswith("_min") else (lambda a, b: a + b)
            total[k] = pick(total[k], v) if k in total else v
    U["stats"] = {k: torch.tensor(v) for k, v in total.items()}
    U["train_tokens"] = sum(t for _, t, _ in shares)
    for j, d in enumerate(updates):
        d["ratio_min"] = min(ranges[j][0] for _, _, ranges in shares)
        d["ratio_max"] = max(ranges[j][1] for _, _, ranges in shares)


def train_mini_batch(S, chunk, on_policy, U):
    """Forward and backward of one mini-batch over its micro-batches (the gradient
    accumulates); the loss's denominators are the whole mini-batch's. With beta = 0,
    samples whose advantage is 0 are left out (their gradient is exactly 0). Returns the
    mini-batch's loss and, with --dump-rollouts, its (min, max) ratio."""
    args = S.args
    active = [s for s in chunk if s.loss_mask]
    num_seq, num_tok = len(active), sum(len(s.completion_ids) for s in active)
    if args.beta == 0 and args.zero_advantage == "skip":
        chunk = [s for s in chunk if s.advantage != 0]
    loss_sum, ratios = 0.0, []  # loss kept on the device: one host read per update
    for mb in rank_micro_batches(S, chunk):  # under torchrun: this rank's share, padded
        loss, st = grpo.policy_loss(
            S.model, mb or chunk[:1], pad_id=S.tokenizer.pad_token_id, temperature=args.temperature,
            eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta, kl_estimator=args.kl_estimator,
            aggregation=args.loss_aggregation, num_sequences=num_seq, num_tokens=num_tok,
            norm_length=args.max_new_tokens, on_policy=on_policy,
            rollout_correction=args.rollout_correction, correction_cap=args.rollout_correction_cap)
        if mb is None:  # a stand-in pass: joins the collectives, adds nothing
            (loss * 0.0).backward()
            continue
        loss.backward()
        loss_sum = loss_sum + loss.detach()
        accumulate_stats(U["stats"], st)
        U["train_tokens"] += sum(len(s.prompt_ids) + len(s.completion_ids) for s in mb)
        if args.dump_rollouts and st["n_tokens"] > 0:
            ratios += [float(st["ratio_min"]), float(st["ratio_max"])]
    loss_value = distributed.all_sum(float(loss_sum), S.dist)  # the whole mini-batch's, on every rank
    return loss_value, (min(ratios, default=1.0), max(ratios, default=1.0))


def accumulate_stats(total, st):
    """Add one micro-batch's statistics (0-dim device tensors: no host sync) to `total`."""
    for k, v in st.items():
        v = v.detach().float()
        if k in SUM_STATS:
            total[k] = total[k] + v if k in total else v
        elif k.endswith("_max") or k.endswith("_min"):
            pick = torch.maximum if k.endswith("_max") else torch.minimum
            total[k] = pick(total[k], v) if k in total else v
        else:  # a per-token mean: weighted by its token count
            total[k] = total[k] + v * st["n_tokens"] if k in total else v * st["n_tokens"]


def log_step(S, step, lr, R, samples, U, progress):
    """Everything to metrics.jsonl; a short line to the terminal."""
    args, keys = S.args, list(U["stats"])
    values = torch.stack([U["stats"][k] for k in keys]).tolist() if keys else []  # one transfer
    st = defaultdict(float, zip(keys, values))
    ntok, mtok = max(st["n_tokens"], 1.0), max(st["mismatch_tokens"], 1.0)
    train_tokens = U["train_tokens"]
    rec = {
        "step": step, "reward_mean": mean(R.rewards), "correct_frac": mean(R.correct),
        "zero_std_frac": R.zero_std / max(R.groups, 1), "groups_kept": len(R.kept), "groups_sampled": R.groups,
        "sampling_rounds": R.rounds, "len_mean": mean(R.lengths), "len_max": max(R.lengths, default=0),
        "truncated_frac": mean(R.truncated), "loss": mean(U["losses"]),
        "clip_low": st["clip_low_frac"] / ntok, "clip_high": st["clip_high_frac"] / ntok,
        "ratio_mean": st["ratio_mean"] / ntok if st["n_tokens"] else 1.0,
        "kl": st["kl_mean"] / ntok, "entropy": st["entropy_sum"] / max(st["n_completion_tokens"], 1.0),
        "mismatch_k3": st["mismatch_k3_sum"] / mtok, "mismatch_abs_mean": st["mismatch_abs_sum"] / mtok,
        "mismatch_abs_max": st["mismatch_abs_max"], "mismatch_frac_gt_0.1": st["mismatch_big_sum"] / mtok,
        "grad_norm": U["grad_norm"], "lr": lr, "skipped_updates": U["skipped"], "grader_timeouts": S.grader_timeouts,
        "gen_tok_s": sum(R.lengths) / max(R.seconds, 1e-9), "train_tok_s": train_tokens / max(U["seconds"], 1e-9),
        "t_gen": R.seconds, "t_train": U["seconds"],
    }
    if args.rollout_correction != "none":
        rec["correction_weight_mean"] = st["correction_weight_sum"] / mtok
        rec["correction_capped_frac"] = st["correction_capped_sum"] / mtok
    if args.eval_every and step % args.eval_every == 0 and step != args.steps:
        ev = evaluate_heldout(S)
        if ev:
            rec.update({f"eval/{k}": v for k, v in flatten(ev).items()})
    if not S.dist.main:  # under torchrun rank 0 alone writes and prints
        return
    S.run.log(rec)
    if args.dump_rollouts:
        dump_rollouts(args.dump_rollouts, step, samples, U)
    tok_s = (sum(R.lengths) + train_tokens) / max(R.seconds + U["seconds"], 1e-9)
    print(f"step {step:4d}/{args.steps} | reward {rec['reward_mean']:.3f} correct {rec['correct_frac']:.3f} "
          f"len {rec['len_mean']:.0f} | kl {rec['kl']:.4f} gnorm {rec['grad_norm']:.3f} | {tok_s:.0f} tok/s | "
          f"{progress.eta(step)}"
          + (f" | held-out pass@1 {rec['eval/all/pass@1']:.3f}" if "eval/all/pass@1" in rec else ""), flush=True)


def dump_rollouts(path, step, samples, U):
    """--dump-rollouts: one JSON line per step with every trained sample and every update."""
    rows = [{"prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids, "reward": s.reward,
             "advantage": s.advantage, "finish_reason": s.finish_reason,
             "sampler_logprobs": s.sampler_logprobs.tolist()} for s in samples]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "samples": rows, "updates": U["dump"]}) + "\n")


# ==================================================================== evaluation and the end

def evaluate_heldout(S):
    """pass@1 (mean over --eval-samples samples at the training temperature) and greedy
    accuracy, overall and per difficulty level; the same random stream every time."""
    if not S.eval_problems:
        return None
    args = S.args
    model = distributed.replica(S.model, S.dist, S.dtype)  # under torchrun every rank evaluates it all
    model.eval()
    with torch.no_grad():
        sampled = minirl.generate(model, S.eval_ids, n=args.eval_samples, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  stop_token_ids=S.tokenizer.eos_token_ids, generator=make_generator(args.seed, "eval"))
        greedy = minirl.generate(model, S.eval_ids, n=1, max_new_tokens=args.max_new_tokens, temperature=0.0,
                                 stop_token_ids=S.tokenizer.eos_token_ids)
    per_level = defaultdict(lambda: [0, 0.0, 0.0])  # level -> [problems, pass@1 sum, greedy sum]
    for p, group, g in zip(S.eval_problems, sampled, greedy):
        acc = sum(is_correct(S, p, S.tokenizer.decode(c.token_ids)) for c in group) / len(group)
        gr = float(is_correct(S, p, S.tokenizer.decode(g[0].token_ids)))
        for key in ["all"] + ([p.difficulty] if p.difficulty is not None else []):
            per_level[key][0] += 1
            per_level[key][1] += acc
            per_level[key][2] += gr
    return {str(k): {"problems": v[0], "pass@1": v[1] / v[0], "greedy": v[2] / v[0]} for k, v in per_level.items()}


def finish(S, eval_before):
    """The final model, and the held-out table before / after."""
    final_dir = os.path.join(S.run.path, "final")
    weights = distributed.full_state_dict(S.model, S.dist)  # under torchrun: on rank 0, one tensor at a time
    if S.dist.main:
        minirl.save_model(distributed.FullWeights(weights, S.model.config) if S.dist.on else S.model, final_dir,
                          tokenizer=S.tokenizer)
    del weights
    eval_after = evaluate_heldout(S)
    if not S.dist.main:
        return
    atomic_write_json(os.path.join(S.run.path, "summary.json"),
                      {"eval_before": eval_before, "eval_after": eval_after, "final_model": final_dir})
    if eval_after:
        S.run.log({"step": S.args.steps, **{f"eval/{k}": v for k, v in flatten(eval_after).items()}})
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
