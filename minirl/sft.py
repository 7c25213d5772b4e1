"""Supervised fine-tuning (distillation) as data: what train_sft.py does between a jsonl file
and a loss.

    prompt/response pairs | chat messages | evaluate.py samples | synthetic task teacher
      -> Sequence(ids, mask)          mask[t] = 1: token t is a training target (a response
                                      or assistant token, the final eos included)
      -> plan_epoch                   shuffle by (seed, epoch), pack into rows of max_len,
                                      cut the rows into optimizer steps
      -> micro_batches + collate      packed rows (positions restart per example, segment
                                      ids keep attention inside each example) or one
                                      right-padded example per row (--no-packing)
      -> response_logprobs            hidden states of the target positions only -> the
                                      fused linear log-prob kernel (no full logits)
      -> loss = -sum(logprob) / (target tokens in the whole optimizer step)

Why a step is a set of packed rows in both layouts: the examples of a step are chosen once,
by packing, and --no-packing only lays the same examples out differently. The loss of a
step is divided by the number of target tokens of the whole step, not of a micro-batch or a
row, so packing, padding and gradient accumulation change nothing but float rounding
(tests/test_sft.py checks this).

Why prompts are tokenized apart from responses: the sampler sees exactly that at generation
time (prompt ids, then generated ids), so training and sampling agree on the token boundary
between the two.
"""
import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from minirl.common import MinirlError, make_generator, read_jsonl
from minirl.data import prompt_add_special_tokens
from minirl.losses import linear_logprobs

# ---------------------------------------------------------------- examples -> token ids


@dataclass
class Sequence:
    """One training example as token ids. mask[t] = 1 when token t is predicted with a loss
    (the first token never is: nothing precedes it)."""
    ids: list
    mask: list
    group: str  # examples of one group (one problem) stay on one side of the train/val split
    where: str  # "file:line" (or a description) for error messages

    def __len__(self):
        return len(self.ids)

    @property
    def num_targets(self) -> int:
        return int(sum(self.mask[1:]))


def encode_pair(tokenizer, prompt: str, response: str, eos_id: int, group: str, where: str,
                add_special_tokens: bool = True) -> Sequence:
    """prompt ids (no loss) + response ids + eos (loss). The prompt is encoded as
    train_grpo.py encodes it for sampling: with the tokenizer's special tokens (e.g. Llama-3's
    BOS) except for chat prompts, whose template writes its own. A response that already
    ends with the eos token does not get a second one."""
    p = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    r = tokenizer.encode(response, add_special_tokens=False)
    if not r or r[-1] != eos_id:
        r = r + [eos_id]
    return Sequence(p + r, [0] * len(p) + [1] * len(r), group, where)


def encode_messages(tokenizer, messages: list, eos_ids: list, group: str, where: str) -> Sequence:
    """A chat conversation through the tokenizer's chat template, with the loss on the
    assistant turns only (their text and end-of-turn token, e.g. `...<|im_end|>`).

    Each assistant turn is located in the rendered conversation as the text between
    render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]); the pieces
    are then encoded one by one so every token is entirely prompt or entirely response. If
    the last assistant turn holds none of the tokenizer's eos ids, eos_ids[0] is appended
    (with loss) so the model learns to stop where the sampler stops."""
    if not isinstance(messages, list) or not messages:
        raise MinirlError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise MinirlError(f"{where}: messages[{i}] needs string 'role' and 'content'")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise MinirlError(f"{where}: no assistant message (nothing to train on)")

    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen)
        except MinirlError as e:
            raise MinirlError(f"{where}: {e}") from None
        except Exception as e:  # a template raising on an odd conversation
            raise MinirlError(f"{where}: the chat template failed ({type(e).__name__}: {e})") from None

    full = render(messages, False)
    spans = []  # (start, end) character spans of assistant turns in `full`
    for i in turns:
        before, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise MinirlError(f"{where}: the chat template does not render this conversation "
                              f"turn by turn (assistant message {i} cannot be located); "
                              "flatten it to a prompt/response pair")
        end = len(upto.rstrip())  # the newline after the end-of-turn token is not trained
        spans.append((len(before), max(end, len(before))))
    ids, mask, pos = [], [], 0
    for start, end in spans:
        for text, m in ((full[pos:start], 0), (full[start:end], 1)):
            if text:
                piece = tokenizer.encode(text, add_special_tokens=False)
                ids += piece
                mask += [m] * len(piece)
        pos = end
    last_start = len(ids) - _trailing_ones(mask)
    tail = full[pos:]
    if not any(t in eos_ids for t in ids[last_start:]):
        ids.append(eos_ids[0])
        mask.append(1)
    elif tail.strip():  # text after the last assistant turn (a template's footer): no loss
        piece = tokenizer.encode(tail, add_special_tokens=False)
        ids += piece
        mask += [0] * len(piece)
    return Sequence(ids, mask, group, where)


def _trailing_ones(mask):
    n = 0
    for m in reversed(mask):
        if not m:
            break
        n += 1
    return n


# ---------------------------------------------------------------- data files


def is_samples_file(path: str) -> bool:
    """True for a samples file written by `evaluate.py sample` (its first line has
    problem_id, sample_index and response)."""
    for _, obj in read_jsonl(path):
        return isinstance(obj, dict) and {"problem_id", "sample_index", "response"} <= set(obj)
    return False


def samples_template(path: str) -> Optional[str]:
    """The prompt template a samples file was sampled with (from its settings file)."""
    from minirl.report import read_settings
    settings = read_settings(path)
    t = settings.get("template") if isinstance(settings, dict) else None
    return t if isinstance(t, str) else None


def select_samples(path: str, only_correct: bool, max_per_problem: Optional[int]):
    """(question, response, problem_id, "file:line") for the samples to train on, and counts.

    Kept: finished samples (finish_reason "stop": a truncated response would teach the model
    not to stop), correct ones only with only_correct, and per problem at most
    max_per_problem of them: those with the smallest sample_index. Samples are i.i.d. draws,
    so the first K are as good as a random K, and the choice is the same on every run."""
    per_problem, order = {}, []
    counts = {"samples": 0, "incorrect": 0, "truncated": 0, "over_max_per_problem": 0}
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise MinirlError(f"{where}: expected a JSON object")
        for key in ("problem_id", "sample_index", "response", "question"):
            if key not in rec:
                hint = (" (the problem text is needed to build the prompt; samples files from "
                        "evaluate.py store it)") if key == "question" else ""
                raise MinirlError(f"{where}: missing key {key!r}{hint}")
        if not isinstance(rec["response"], str) or not rec["response"].strip():
            raise MinirlError(f"{where}: 'response' is empty or not a string")
        if not isinstance(rec["question"], str):
            raise MinirlError(f"{where}: 'question' must be a string")
        if only_correct and "correct" not in rec:
            raise MinirlError(f"{where}: missing key 'correct' (needed by --only-correct)")
        counts["samples"] += 1
        if rec.get("finish_reason", "stop") != "stop":
            counts["truncated"] += 1
            continue
        if only_correct and rec["correct"] is not True:
            counts["incorrect"] += 1
            continue
        pid = str(rec["problem_id"])
        if pid not in per_problem:
            per_problem[pid] = []
            order.append(pid)
        per_problem[pid].append((rec["sample_index"], rec["question"], rec["response"], where))
    if counts["samples"] == 0:
        raise MinirlError(f"{path}: no samples (empty file)")
    out = []
    for pid in order:
        chosen = sorted(per_problem[pid], key=lambda r: r[0])
        if max_per_problem is not None:
            counts["over_max_per_problem"] += max(0, len(chosen) - max_per_problem)
            chosen = chosen[:max_per_problem]
        out += [(q, r, pid, where) for _, q, r, where in chosen]
    counts["problems"] = len(order)
    return out, counts


def record_locations(path: str) -> list:
    """"file:line" of each record of a jsonl file (blank lines skipped, as the readers do),
    or "file: row N" for parquet: where minirl.data.load_sft_examples read example i."""
    if str(path).endswith(".parquet"):
        import pyarrow.parquet as pq
        return [f"{path}: row {i}" for i in range(1, pq.read_metadata(path).num_rows + 1)]
    with open(path, encoding="utf-8") as f:
        return [f"{path}:{i}" for i, line in enumerate(f, 1) if line.strip()]


def load_sequences(path: str, tokenizer, template: str, eos_ids: list, only_correct=False,
                   max_per_problem=None):
    """Token sequences of a data file, and counts of what was dropped. The file is a samples
    file from evaluate.py, or jsonl/parquet of prompt/response pairs or chat `messages` (read
    by minirl.data.load_sft_examples). Prompts go through `template` (minirl.data.format_prompt);
    chat messages through the tokenizer's chat template."""
    from minirl.data import format_prompt, load_sft_examples

    eos = eos_ids[0]
    special = prompt_add_special_tokens(template, tokenizer)
    if is_samples_file(path):
        rows, counts = select_samples(path, only_correct, max_per_problem)
        seqs = [encode_pair(tokenizer, format_prompt(q, template, tokenizer), r, eos, pid, where, special)
                for q, r, pid, where in rows]
        return seqs, counts
    if only_correct or max_per_problem is not None:
        flag = "--only-correct" if only_correct else "--max-per-problem"
        raise MinirlError(f"{flag}: applies to samples files written by `evaluate.py sample`; "
                          f"{path} holds prompt/response pairs or messages")
    examples = load_sft_examples(path)
    locations = record_locations(path)
    seqs = []
    for ex, where in zip(examples, locations):
        if ex.messages:
            # Group by the conversation before the first assistant turn (the "prompt").
            first = next(k for k, m in enumerate(ex.messages) if m["role"] == "assistant")
            group = json.dumps(ex.messages[:first], sort_keys=True)
            seqs.append(encode_messages(tokenizer, ex.messages, eos_ids, group, where))
        else:
            prompt = format_prompt(ex.prompt, template, tokenizer)
            seqs.append(encode_pair(tokenizer, prompt, ex.response, eos, ex.prompt, where, special))
    return seqs, {"examples": len(seqs)}


def task_sequences(tokenizer, eos_id: int, problems, template: str):
    """Teacher solutions of synthetic task problems (minirl.tasks.make_problems) as training
    sequences, grouped by problem id: the default data of `python train_sft.py` (distil the
    harder arithmetic levels)."""
    from minirl.data import format_prompt
    from minirl.tasks import teacher_solution

    special = prompt_add_special_tokens(template, tokenizer)
    return [encode_pair(tokenizer, format_prompt(p.question, template, tokenizer), teacher_solution(p),
                        eos_id, p.id, f"problem {p.id}", special)
            for p in problems]


def drop_too_long(seqs, max_len: int, on_too_long: str):
    """(kept, number dropped). on_too_long="fail" raises on the first example longer than
    max_len, naming it; "skip" drops them (the caller prints the count)."""
    kept = []
    for s in seqs:
        if len(s) <= max_len:
            kept.append(s)
        elif on_too_long == "fail":
            raise MinirlError(f"{s.where}: example has {len(s)} tokens, more than --max-len {max_len} "
                              "(raise --max-len, or --on-too-long skip)")
    for s in kept:
        if s.num_targets == 0:
            raise MinirlError(f"{s.where}: no response token to train on")
    return kept, len(seqs) - len(kept)


def split_heldout(seqs, fraction: float, seed: int):
    """(train, val) with about `fraction` of the groups (problems / distinct prompts) held out,
    chosen by a seeded permutation: no problem has samples on both sides."""
    if not fraction:
        return list(seqs), []
    groups = list(dict.fromkeys(s.group for s in seqs))
    n_val = int(round(fraction * len(groups)))
    if n_val == 0 or n_val >= len(groups):
        return list(seqs), []
    perm = torch.randperm(len(groups), generator=make_generator(seed, "sft-heldout-split")).tolist()
    val_groups = set(groups[i] for i in perm[:n_val])
    return [s for s in seqs if s.group not in val_groups], [s for s in seqs if s.group in val_groups]


# ---------------------------------------------------------------- planning: rows and steps


def pack_rows(order, lengths, max_len: int, window: int = 64) -> list:
    """First-fit packing of examples (in `order`) into rows of at most max_len tokens.

    Each example goes into the first open row with room; at most `window` rows are open at
    once (the oldest is closed when a new one would exceed it), so packing costs
    O(N x window) and rows stay close to the shuffled order. Rows that cannot take the
    shortest example any more are closed at once. Returns lists of example indices."""
    shortest = min((lengths[i] for i in order), default=1)
    open_rows, room, done = [], [], []
    for i in order:
        n = lengths[i]
        for r in range(len(open_rows)):
            if n <= room[r]:
                open_rows[r].append(i)
                room[r] -= n
                if room[r] < shortest:
                    done.append(open_rows.pop(r))
                    room.pop(r)
                break
        else:
            open_rows.append([i])
            room.append(max_len - n)
            if room[-1] < shortest:
                done.append(open_rows.pop())
                room.pop()
            elif len(open_rows) > window:
                done.append(open_rows.pop(0))
                room.pop(0)
    return done + open_rows


def epoch_order(n: int, seed: int, epoch: int) -> list:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) only, so a resumed
    run sees the data in exactly the order an uninterrupted one would."""
    return torch.randperm(n, generator=make_generator(seed, "sft-epoch-order", epoch)).tolist()


def plan_epoch(lengths, seed: int, epoch: int, max_len: int, rows_per_step: int) -> list:
    """The optimizer steps of one epoch: a list of steps, each a list of rows, each a list
    of example indices."""
    rows = pack_rows(epoch_order(len(lengths), seed, epoch), lengths, max_len)
    return [rows[i:i + rows_per_step] for i in range(0, len(rows), rows_per_step)]


def micro_batches(step_rows, lengths, packing: bool, max_len: int, tokens_per_micro_batch: int) -> list:
    """How one step's examples are laid out in forward/backward passes: a list of
    micro-batches, each a list of rows (lists of example indices).

    packing: the step's rows, tokens_per_micro_batch // max_len of them per micro-batch.
    padding: one example per row, longest first (similar lengths share a micro-batch, so
    little is padded), as many rows as fit rows x longest <= tokens_per_micro_batch."""
    if packing:
        per = max(1, tokens_per_micro_batch // max_len)
        return [step_rows[i:i + per] for i in range(0, len(step_rows), per)]
    examples = sorted((i for row in step_rows for i in row), key=lambda i: (-lengths[i], i))
    out, current = [], []
    for i in examples:
        if current and (len(current) + 1) * lengths[current[0][0]] > tokens_per_micro_batch:
            out.append(current)
            current = []
        current.append([i])
    if current:
        out.append(current)
    return out


def layout_fill(plan, lengths, packing: bool, max_len: int, tokens_per_micro_batch: int) -> float:
    """Real tokens / computed positions (B x T summed over micro-batches) of an epoch's plan:
    how much of the compute goes to padding."""
    real = computed = 0
    for step_rows in plan:
        for mb in micro_batches(step_rows, lengths, packing, max_len, tokens_per_micro_batch):
            row_lengths = [sum(lengths[i] for i in row) for row in mb]
            real += sum(row_lengths)
            computed += len(mb) * max(row_lengths)
    return real / max(computed, 1)


# ---------------------------------------------------------------- tensors and loss


@dataclass
class Batch:
    """One micro-batch as tensors. Only the N target tokens reach the lm head: `index` holds
    the flat positions (into B*T) whose hidden states predict `targets`."""
    input_ids: torch.Tensor                # [B, T]
    positions: Optional[torch.Tensor]      # [B, T], None for one example per row (0..T-1)
    segment_ids: Optional[torch.Tensor]    # [B, T], None for one example per row
    index: torch.Tensor                    # [N] flat positions of the predicting tokens
    targets: torch.Tensor                  # [N] the tokens they predict
    example: torch.Tensor                  # [N] the example each target belongs to
    num_tokens: int                        # real (non-padding) tokens
    num_targets: int                       # N


def collate(seqs, rows, pad_id: int, device) -> Batch:
    """Rows of examples -> one Batch. Several examples in a row are packed: positions restart
    at 0 for each and segment ids keep attention inside each (Transformer.forward builds the
    block-diagonal causal mask). A row with one example is right-padded: causal attention
    never looks ahead, so real tokens never see the padding and no mask is needed."""
    B = len(rows)
    T = max(sum(len(seqs[i]) for i in row) for row in rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    seg = np.full((B, T), -1, dtype=np.int64)  # padding: its own segment
    index, targets, example = [], [], []
    for b, row in enumerate(rows):
        o = 0
        for j, i in enumerate(row):
            s = seqs[i]
            L = len(s)
            ids[b, o:o + L] = s.ids
            pos[b, o:o + L] = np.arange(L)
            seg[b, o:o + L] = j
            # Token t of the example is predicted by the hidden state at t - 1.
            m = np.asarray(s.mask[1:], dtype=bool)
            t = np.nonzero(m)[0]
            index.append(b * T + o + t)
            targets.append(np.asarray(s.ids, dtype=np.int64)[1:][m])
            example.append(np.full(len(t), i, dtype=np.int64))
            o += L
    packed = any(len(row) > 1 for row in rows)

    def dev(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True)

    index, targets, example = (np.concatenate(x) for x in (index, targets, example))
    return Batch(input_ids=dev(ids), positions=dev(pos) if packed else None,
                 segment_ids=dev(seg) if packed else None, index=dev(index), targets=dev(targets),
                 example=dev(example), num_tokens=sum(len(seqs[i]) for row in rows for i in row),
                 num_targets=len(targets))


def response_logprobs(model, batch: Batch, backend=None, chunk_size=None) -> torch.Tensor:
    """log p(target) [N] fp32 of the batch's target tokens. The hidden states of prompt and
    padding positions are never multiplied by the lm head: they are dropped before the fused
    linear log-prob kernel, which itself never holds more than a chunk of logits."""
    hidden = model(batch.input_ids, positions=batch.positions, segment_ids=batch.segment_ids,
                   return_hidden=True)  # [B, T, H]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.index)  # [N, H]
    return linear_logprobs(h, model.lm_head_weight, batch.targets, backend=backend,
                           chunk_size=chunk_size)  # [N] fp32


@torch.no_grad()
def heldout_loss(model, seqs, max_len: int, tokens_per_micro_batch: int, pad_id: int, device) -> float:
    """Mean -log p over the target tokens of `seqs` (packed in file order)."""
    if not seqs:
        return float("nan")
    was_training = model.training
    model.eval()
    lengths = [len(s) for s in seqs]
    rows = pack_rows(list(range(len(seqs))), lengths, max_len)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for mb in micro_batches(rows, lengths, True, max_len, tokens_per_micro_batch):
        batch = collate(seqs, mb, pad_id, device)
        total += -response_logprobs(model, batch).double().sum()
        count += batch.num_targets
    model.train(was_training)
    return float(total) / max(count, 1)


def model_flops_per_token(cfg, context: float, lm_head_fraction: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), counting useful work
    only: 2 x (weights of the matmuls) for the linear layers, the lm head for the fraction
    of tokens that reach it, and 2 x 2 x context x (heads x head_dim) per layer for
    attention scores and values, where `context` is the mean number of keys a query sees
    (about half the example length under a causal mask)."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = H * (q + 2 * kv) + q * H + 3 * H * I
    linear = 2 * (L * per_layer + lm_head_fraction * cfg.vocab_size * H)
    attention = L * 2 * 2 * context * q
    return 3 * (linear + attention)


def mean_causal_context(lengths) -> float:
    """Mean number of keys a query attends to when each example attends only to itself."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float((lengths * (lengths + 1) / 2).sum() / max(lengths.sum(), 1))


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if not math.isnan(n) else "nan"
