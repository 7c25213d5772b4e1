"""Cognitive-behaviour labels for sampled responses, by a judge model or a keyword baseline.

Hu et al. (arXiv 2505.21067) explain part of distillation's gain by behaviours the teacher
passes on, labelled by an LLM judge: *Multi-Perspective Thinking or Attempting* and
*Metacognitive Awareness*; Gandhi et al. (arXiv 2503.01307) count *verification*,
*backtracking*, *subgoal setting* and *backward chaining*. Each behaviour is a definition
plus a judge prompt in `minirl/behaviours.json` (edit it, or bring your own file).

One judgment = (sample, behaviour) -> the judge's raw answer and its label:
- "yes_no" behaviours: the label is True/False;
- "count" behaviours: the label is a whole number (the behaviour is shown when > 0).
Parsing is strict (`parse_answer`): the answer must be exactly the word / number, optionally
on a last line "Answer: ..."; anything else is *unparseable* (label None), counted and
reported, never read as "no".

Judges (`judge(prompts) -> answers`):
- `KeywordJudge`: counts the behaviour's keywords (the baseline; no model);
- `ModelJudge`: a local HF folder through minirl's own sampler, batched, greedy;
- `HTTPJudge`: any OpenAI-compatible chat-completions server (vLLM, llama.cpp, a hosted API),
  standard-library HTTP (urllib), threads, a timeout per request, retries with exponential
  backoff on 429 / 5xx / timeouts / refused connections; 401, 403 and other 4xx stop at once.

Cache (`JudgmentCache`): an append-only jsonl file, one line per judgment, keyed by
(sample, behaviour, judge, prompt hash) -- the sample by problem id, sample index and a hash
of its response. Written line by line as answers arrive, so a killed run loses at most the
judgments in flight; a torn last line is dropped on reading. Failed requests are not cached:
a re-run retries them and reuses everything else.
"""
import concurrent.futures
import hashlib
import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from minirl.common import MinirlError

BEHAVIOURS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "behaviours.json")
ANSWER_KINDS = ("yes_no", "count")


# --------------------------------------------------------------------------- behaviours

@dataclass
class Behaviour:
    name: str
    source: str
    definition: str
    answer: str          # "yes_no" or "count"
    prompt: str          # with {question}, {response}, {definition}
    keywords: tuple

    @property
    def prompt_hash(self) -> str:
        """Changes whenever the text the judge sees changes (prompt, definition, answer kind)."""
        text = json.dumps([self.prompt, self.definition, self.answer])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def render(self, question: str, response: str) -> str:
        # str.replace, not str.format: responses are full of LaTeX braces.
        return (self.prompt.replace("{definition}", self.definition)
                .replace("{question}", question or "").replace("{response}", response))


def load_behaviours(path=None, names=None) -> list:
    """Behaviours from a behaviours file (default: the one shipped with minirl), all of them
    or the ones named in `names` (in that order). Raises MinirlError naming the file and key."""
    path = path or BEHAVIOURS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise MinirlError(f"--behaviour-file: cannot read {path} ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise MinirlError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise MinirlError(f"{path}: must hold a JSON object {{name: behaviour}}")
    found = {}
    for name, b in raw.items():
        if name.startswith("_"):
            continue
        where = f"{path}: behaviour {name!r}"
        if not isinstance(b, dict):
            raise MinirlError(f"{where}: must be an object")
        for key in ("definition", "answer", "prompt"):
            if key not in b:
                raise MinirlError(f"{where}: missing key {key!r}")
        if b["answer"] not in ANSWER_KINDS:
            raise MinirlError(f"{where}: 'answer' must be one of {ANSWER_KINDS}, got {b['answer']!r}")
        prompt = "\n".join(b["prompt"]) if isinstance(b["prompt"], list) else b["prompt"]
        if not isinstance(prompt, str) or "{response}" not in prompt:
            raise MinirlError(f"{where}: 'prompt' must be text (or a list of lines) containing {{response}}")
        keywords = b.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
            raise MinirlError(f"{where}: 'keywords' must be a list of non-empty strings")
        found[name] = Behaviour(name, str(b.get("source", "")), str(b["definition"]), b["answer"], prompt,
                                tuple(keywords))
    if not found:
        raise MinirlError(f"{path}: no behaviours")
    if names is None:
        return list(found.values())
    unknown = [n for n in names if n not in found]
    if unknown or not names:
        raise MinirlError(f"--behaviours: unknown {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"{path} has {', '.join(found)}")
    return [found[n] for n in dict.fromkeys(names)]


# --------------------------------------------------------------------------- parsing

_LAST_LINE = re.compile(r"^(?:final\s+)?answer\s*[:=]\s*(.+?)$", re.IGNORECASE)
_YES_NO = re.compile(r"^[*\"'`]*(yes|no)[*\"'`]*[.!]?$", re.IGNORECASE)
_COUNT = re.compile(r"^[*\"'`]*(\d{1,4})[*\"'`]*\.?$")


def parse_answer(text, kind: str):
    """The label in a judge's answer, or None when it is unparseable.

    Accepted: the whole answer is the word / number (surrounding space, quotes, ** and a final
    period allowed), or its last non-empty line is "Answer: <word/number>". "yes"/"no" -> True /
    False for kind "yes_no"; a whole number 0..9999 -> int for kind "count". Nothing else:
    "Yes, because..." or "2 or 3" are unparseable, not guessed."""
    if not isinstance(text, str):
        return None
    candidates = [text.strip()]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        m = _LAST_LINE.match(lines[-1])
        if m:
            candidates.append(m.group(1).strip())
    for c in candidates:
        if kind == "yes_no":
            m = _YES_NO.match(c)
            if m:
                return m.group(1).lower() == "yes"
        else:
            m = _COUNT.match(c)
            if m:
                return int(m.group(1))
    return None


def shows(label) -> bool:
    """Does a parsed label mean the behaviour is present? (True, or a count > 0)."""
    return bool(label) if isinstance(label, bool) else label > 0


# --------------------------------------------------------------------------- cache

def response_hash(response: str) -> str:
    return hashlib.sha256(response.encode("utf-8")).hexdigest()[:16]


def judgment_key(problem_id, sample_index, response, behaviour: Behaviour, judge_id: str) -> str:
    return json.dumps([problem_id, sample_index, response_hash(response), behaviour.name, judge_id,
                       behaviour.prompt_hash])


class JudgmentCache:
    """Append-only jsonl of judgments. Reading drops a torn last line (an interrupted
    write) and truncates the file there, so the next append starts on a fresh line; a
    broken line anywhere else is an error naming the line."""

    def __init__(self, path):
        self.path = str(path)
        self.records = {}
        if os.path.exists(self.path):
            self._load()

    def _load(self):
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1  # bytes after the last newline: a torn line
        for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec["key"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise MinirlError(f"{self.path}:{lineno}: not a judgment line; is this a judgments file?") from None
            self.records[key] = rec
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def get(self, key):
        return self.records.get(key)

    def append(self, records):
        """Write records (one line each, one write, flushed to disk) and remember them."""
        if not records:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[r["key"]] = r


# --------------------------------------------------------------------------- judges

class KeywordJudge:
    """The baseline: the number of keyword matches (whole words, any case) in the response,
    answered as the behaviour's prompt asks ("yes"/"no" or the count)."""
    id = "keyword"
    batch_size = 256

    def judge_items(self, items):
        from minirl import metrics
        out = []
        for beh, question, response in items:
            found = metrics.count_phrases([response], {"k": beh.keywords})["k"].per_text[0]
            out.append(str(int(found)) if beh.answer == "count" else ("yes" if found else "no"))
        return out


class ModelJudge:
    """A local HF folder run through minirl's sampler: greedy, `batch_size` prompts at a time.
    A prompt longer than the model's context keeps its end (where the question is asked)."""

    def __init__(self, model_dir, batch_size=16, max_new_tokens=16, device=None):
        import minirl
        parts = os.path.normpath(model_dir).split(os.sep)
        # runs/x/final and runs/y/final are different judges: keep the run's name.
        self.id = "model:" + "/".join(parts[-2:] if parts[-1] in ("final", "model") and len(parts) > 1 else parts[-1:])
        self.tokenizer = minirl.load_tokenizer(model_dir)
        self.model = minirl.load_model(model_dir, device=device)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.truncated = 0

    def judge_items(self, items):
        from minirl.data import format_prompt
        from minirl.sampler import generate
        template = "chat" if self.tokenizer.chat_template is not None else "raw"
        limit = self.model.config.max_position_embeddings - self.max_new_tokens
        prompts = []
        for beh, question, response in items:
            ids = self.tokenizer.encode(format_prompt(beh.render(question, response), template, self.tokenizer),
                                        add_special_tokens=template != "chat")
            self.truncated += len(ids) > limit
            prompts.append(ids[-limit:])
        groups = generate(self.model, prompts, n=1, max_new_tokens=self.max_new_tokens, temperature=0.0,
                          stop_token_ids=self.tokenizer.eos_token_ids)
        return [self.tokenizer.decode(g[0].token_ids) for g in groups]


class JudgeRequestError(Exception):
    """One request failed after its retries (not cached; a re-run retries it)."""


class HTTPJudge:
    """An OpenAI-compatible chat-completions endpoint. `url` is the server's base
    (http://host:8000/v1) or the full .../chat/completions address."""

    def __init__(self, url, name, api_key=None, key_env=None, timeout=60.0, retries=3, backoff=1.0,
                 concurrency=8, max_tokens=16):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        if not self.url.startswith(("http://", "https://")):
            raise MinirlError(f"--judge-url: must start with http:// or https://, got {url!r}")
        self.id = "api:" + name
        self.name, self.api_key, self.key_env = name, api_key, key_env
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.concurrency, self.max_tokens = concurrency, max_tokens

    def request(self, prompt):
        body = json.dumps({"model": self.name, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))  # jittered
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    reply = json.loads(r.read().decode("utf-8"))
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    hint = (f"set the API key in ${self.key_env} (--judge-key-env)" if not self.api_key
                            else f"the key in ${self.key_env} was refused")
                    raise MinirlError(f"--judge-url: {self.url} answered {e.code} {e.reason}: {hint}") from None
                if e.code != 429 and e.code < 500:
                    raise MinirlError(f"--judge-url: {self.url} answered {e.code} {e.reason} "
                                      f"(is --judge-name {self.name!r} served there?)") from None
                last = f"HTTP {e.code} {e.reason}"
            except (socket.timeout, TimeoutError):
                last = f"timed out after {self.timeout:g} s"
            except urllib.error.URLError as e:
                reason = e.reason
                last = ("timed out" if isinstance(reason, (socket.timeout, TimeoutError))
                        else f"cannot connect ({getattr(reason, 'strerror', None) or reason})")
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                last = f"bad reply ({type(e).__name__}: {e})"
        raise JudgeRequestError(last)

    def stream(self, items):
        """Yield lists of (index, answer or JudgeRequestError) as requests finish: up to
        `concurrency` requests in flight, each answer handed over as soon as it arrives (a
        slow request holds up nothing but itself)."""
        pool = concurrent.futures.ThreadPoolExecutor(self.concurrency)
        pending, inflight = iter(enumerate(items)), {}
        try:
            while True:
                for i, (beh, q, r) in pending:
                    inflight[pool.submit(self.request, beh.render(q, r))] = i
                    if len(inflight) >= self.concurrency:
                        break
                if not inflight:
                    return
                done, _ = concurrent.futures.wait(inflight, return_when=concurrent.futures.FIRST_COMPLETED)
                out = []
                for f in done:
                    i = inflight.pop(f)
                    try:
                        out.append((i, f.result()))
                    except JudgeRequestError as e:
                        out.append((i, e))
                yield out
        finally:  # an error or an interruption: drop what was not sent, do not wait for it
            pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- running

@dataclass
class JudgeStats:
    judged: int = 0          # new judgments written to the cache
    cached: int = 0          # found in the cache
    unparseable: int = 0     # judged (new or cached) but not parseable
    failed: int = 0          # requests that failed after their retries (not cached)
    last_error: str = ""


def _batches(judge, items):
    """(index, answer) lists from any judge: streamed for a server, batch by batch otherwise."""
    if isinstance(judge, HTTPJudge):
        yield from judge.stream(items)
        return
    for start in range(0, len(items), judge.batch_size):
        answers = judge.judge_items(items[start:start + judge.batch_size])
        yield list(enumerate(answers, start))


def run_judge(samples, behaviours, judge, cache: JudgmentCache, progress=None) -> JudgeStats:
    """Judge every (sample, behaviour) not in the cache and append the answers to it.

    samples: dicts with problem_id, sample_index, question (may be missing) and response.
    Answers are written to the cache as they arrive (batch by batch for a local judge).
    progress(done, total) is called after each write. When no request has succeeded yet
    and 3 x concurrency have failed (a wrong URL, a server down), stops with a MinirlError."""
    stats = JudgeStats()
    todo = []
    for s in samples:
        for beh in behaviours:
            key = judgment_key(s["problem_id"], s["sample_index"], s["response"], beh, judge.id)
            rec = cache.get(key)
            if rec is None:
                todo.append((key, s, beh))
            else:
                stats.cached += 1
                stats.unparseable += rec["label"] is None
    items = [(beh, s.get("question") or "", s["response"]) for _, s, beh in todo]
    give_up = 3 * getattr(judge, "concurrency", 1)
    done = 0
    for answered in _batches(judge, items):
        records = []
        for i, answer in answered:
            key, s, beh = todo[i]
            if isinstance(answer, JudgeRequestError):
                stats.failed += 1
                stats.last_error = str(answer)
                continue
            label = parse_answer(answer, beh.answer)
            stats.unparseable += label is None
            records.append({"key": key, "problem_id": s["problem_id"], "sample_index": s["sample_index"],
                            "behaviour": beh.name, "judge": judge.id, "prompt_hash": beh.prompt_hash,
                            "answer": answer, "label": label})
        cache.append(records)
        stats.judged += len(records)
        done += len(answered)
        if stats.judged == 0 and stats.failed >= give_up:
            raise MinirlError(f"judge: the first {stats.failed} requests all failed ({stats.last_error}); "
                              "stopping (nothing was lost: re-run when the server answers)")
        if progress:
            progress(done, len(todo))
    return stats


# --------------------------------------------------------------------------- reading labels

def read_labels(path, judge_id=None):
    """Labels from a judgments file: ({(problem_id, sample_index, behaviour): label}, judge id).

    When the file holds several judges, `judge_id` picks one (else a MinirlError lists them).
    A later line for the same (sample, behaviour) replaces an earlier one (e.g. after the
    prompt was edited). Unparseable judgments are kept as None."""
    cache = JudgmentCache(path)
    judges = sorted({r["judge"] for r in cache.records.values()})
    if judge_id is None:
        if len(judges) > 1:
            raise MinirlError(f"{path}: holds judgments of several judges ({', '.join(judges)}); "
                              "pick one with --judge-id")
        judge_id = judges[0] if judges else None
    elif judge_id not in judges:
        raise MinirlError(f"--judge-id: {path} has no judgments by {judge_id!r} (it has {', '.join(judges) or 'none'})")
    labels = {}
    for r in cache.records.values():
        if r["judge"] == judge_id:
            labels[(r["problem_id"], r["sample_index"], r["behaviour"])] = r["label"]
    return labels, judge_id


def judgments_path(samples_path):
    """Where `evaluate.py judge` writes a samples file's judgments: beside it."""
    return os.path.splitext(str(samples_path))[0] + ".judgments.jsonl"


# --------------------------------------------------------------------------- calibration

def cohen_kappa(a, b) -> float:
    """Cohen's kappa of two binary label lists: (p_o - p_e) / (1 - p_e); 1.0 when both
    raters give one same constant label (p_e = 1), NaN for empty input."""
    n = len(a)
    if n == 0:
        return float("nan")
    po = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)


def calibration_scores(gold, predicted) -> dict:
    """Agreement of a judge with hand labels, per behaviour.

    gold: {behaviour: [bool]}; predicted: {behaviour: [label or None]} in the same order.
    Presence is compared (a count > 0 is "shows it"); an unparseable prediction counts as
    a disagreement in `accuracy` and is left out of `kappa` (reported as `unparseable`)."""
    out = {}
    for name, g in gold.items():
        p = predicted[name]
        parsed = [(gi, shows(pi)) for gi, pi in zip(g, p) if pi is not None]
        out[name] = {"n": len(g), "positives": int(sum(g)),
                     "accuracy": sum(gi == pi for gi, pi in parsed) / len(g) if g else float("nan"),
                     "kappa": cohen_kappa([x for x, _ in parsed], [y for _, y in parsed]),
                     "unparseable": len(g) - len(parsed)}
    return out
