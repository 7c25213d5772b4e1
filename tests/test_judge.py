"""minirl.judge and `evaluate.py judge`: parsing, the cache, the three judges, a real HTTP
server (scripted answers, or the bundled model through minirl's sampler), interruption and
resume, server errors, the API key, calibration against the shipped hand labels."""
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from minirl import judge as J
from minirl.common import MinirlError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = os.path.join(ROOT, "tests", "data", "behaviour_labels.jsonl")
BUNDLED = os.path.join(ROOT, "assets", "tiny-arith")


# --------------------------------------------------------------------------- a test server

def scripted_answer(prompt):
    """Deterministic answers from the prompt alone: count prompts get 0..2, yes/no prompts
    yes or no; the test computes the expected labels with the same function."""
    h = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    return str(h % 3) if "whole number" in prompt else ("yes" if h % 2 else "no")


class JudgeServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (free port), in a thread.

    answer(prompt) -> text decides the reply; fault(n, prompt, headers) may return an HTTP
    status to send instead (500, 401) or "sleep" to stall past the client's timeout. Serves
    at most `max_requests` requests and shuts itself down after `lifetime` seconds."""

    def __init__(self, answer=scripted_answer, fault=None, delay=0.0, max_requests=2000, lifetime=60.0):
        self.answer, self.fault, self.delay = answer, fault, delay
        self.requests, self.lock = 0, threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    server.requests += 1
                    n = server.requests
                if n > max_requests or self.path != "/v1/chat/completions":
                    return self.send_error(404)
                fault = server.fault(n, prompt, self.headers) if server.fault else None
                if fault == "sleep":
                    time.sleep(1.5)
                elif fault:
                    return self.send_error(fault)
                time.sleep(server.delay)
                text = server.answer(prompt)
                data = json.dumps({"id": str(n), "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                "finish_reason": "stop"}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): what the test wants

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime, self.httpd.shutdown)  # stops by itself
        self.timer.daemon = True
        self.timer.start()

    def close(self):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    made = []

    def make(**kw):
        made.append(JudgeServer(**kw))
        return made[-1]
    yield make
    for s in made:
        s.close()


def model_answerer(model_dir, max_new_tokens=8):
    """A server's answer function backed by a local model through minirl's sampler."""
    import minirl
    tok, model = minirl.load_tokenizer(model_dir), minirl.load_model(model_dir)
    limit = model.config.max_position_embeddings - max_new_tokens
    lock = threading.Lock()

    def answer(prompt):
        ids = tok.encode(prompt, add_special_tokens=True)[-limit:]
        with lock:
            out = minirl.generate(model, [ids], n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                                  stop_token_ids=tok.eos_token_ids)
        return tok.decode(out[0][0].token_ids)
    return answer


# --------------------------------------------------------------------------- helpers

RESPONSES = ["3+4 = 7. Let me check: 7-4 = 3. \\boxed{7}",
             "Wait, 6*7 is 42, not 48. Alternatively add 6 seven times. \\boxed{42}",
             "First 2*3 = 6, then 6+1 = 7. \\boxed{7}",
             "Hmm, I am not sure. Working backwards from 10: 10-3 = 7. \\boxed{7}"]


def write_samples(path, problems=4, n=3):
    rows = []
    for p in range(problems):
        for j in range(n):
            rows.append({"problem_id": f"p{p}", "difficulty": 1 + p % 2, "gold": "7", "question": f"q{p}: 3+4=?",
                         "sample_index": j, "response": RESPONSES[(p + j) % 4] + f" (sample {p}.{j})",
                         "num_tokens": 20, "finish_reason": "stop", "answer": "7", "correct": (p + j) % 2 == 0})
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


def run_eval(*args, env=None, check=True, timeout=120):
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    e.pop("OPENAI_API_KEY", None)
    e.update(env or {})
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=e)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def load_evaluate():
    """evaluate.py as a module, for flag checks that need no subprocess."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cached_labels(path):
    return {k: r["label"] for k, r in J.JudgmentCache(path).records.items()}


def expected_labels(rows, behaviours, judge_id):
    out = {}
    for r in rows:
        for b in behaviours:
            key = J.judgment_key(r["problem_id"], r["sample_index"], r["response"], b, judge_id)
            out[key] = J.parse_answer(scripted_answer(b.render(r["question"], r["response"])), b.answer)
    return out


# --------------------------------------------------------------------------- units

def test_parse_answer_is_strict():
    assert J.parse_answer("yes", "yes_no") is True and J.parse_answer(" No. ", "yes_no") is False
    assert J.parse_answer("**Yes**", "yes_no") is True
    assert J.parse_answer("The response checks.\nAnswer: no", "yes_no") is False
    for bad in ("Yes, because it checks", "maybe", "", "yes no", "3", None, "y"):
        assert J.parse_answer(bad, "yes_no") is None, bad
    assert J.parse_answer("2", "count") == 2 and J.parse_answer("0.", "count") == 0
    assert J.parse_answer("Reasoning...\nFinal answer: 3", "count") == 3
    for bad in ("two", "2 or 3", "-1", "yes", "1.5", "12345"):
        assert J.parse_answer(bad, "count") is None, bad
    assert J.shows(True) and not J.shows(False) and J.shows(2) and not J.shows(0)


def test_behaviours_file_pick_and_own(tmp_path):
    all_b = J.load_behaviours()
    assert [b.name for b in all_b] == ["multi_perspective", "metacognitive", "verification", "backtracking",
                                       "subgoal_setting", "backward_chaining"]
    picked = J.load_behaviours(names=["backtracking", "metacognitive"])
    assert [b.name for b in picked] == ["backtracking", "metacognitive"]
    with pytest.raises(MinirlError, match="unknown 'nope'"):
        J.load_behaviours(names=["nope"])
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"guessing": {"definition": "d", "answer": "yes_no",
                                            "prompt": "Is {response} a guess? yes or no", "keywords": ["guess"]}}))
    (b,) = J.load_behaviours(str(own))
    assert b.render("q", "I guess {x}") == "Is I guess {x} a guess? yes or no"  # braces in responses are safe
    h = b.prompt_hash
    own.write_text(own.read_text().replace("a guess?", "a guess at all?"))
    assert J.load_behaviours(str(own))[0].prompt_hash != h  # an edited prompt is judged again
    own.write_text(json.dumps({"x": {"definition": "d", "answer": "score", "prompt": "{response}"}}))
    with pytest.raises(MinirlError, match="'answer' must be one of"):
        J.load_behaviours(str(own))


def test_cache_tolerates_a_torn_last_line(tmp_path):
    path = tmp_path / "j.jsonl"
    cache = J.JudgmentCache(path)
    cache.append([{"key": "a", "label": True}, {"key": "b", "label": None}])
    with open(path, "a") as f:
        f.write('{"key": "c", "lab')  # killed mid-write
    cache = J.JudgmentCache(path)
    assert set(cache.records) == {"a", "b"}
    cache.append([{"key": "c", "label": 2}])
    assert set(J.JudgmentCache(path).records) == {"a", "b", "c"}  # the next line starts fresh
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(MinirlError, match="j.jsonl:2"):
        J.JudgmentCache(path)


def test_cohen_kappa_by_hand():
    # 10 items: both yes 3, both no 4, a yes/b no 1, a no/b yes 2. p_o = 0.7,
    # p_a = 0.4, p_b = 0.5, p_e = 0.4*0.5 + 0.6*0.5 = 0.5, kappa = 0.2 / 0.5 = 0.4.
    a = [1, 1, 1, 0, 0, 0, 0, 1, 0, 0]
    b = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    assert J.cohen_kappa(a, b) == pytest.approx(0.4)
    sc = J.calibration_scores({"x": [bool(v) for v in a]}, {"x": [bool(v) for v in b[:8]] + [None, 3]})
    # item 9 unparseable (left out of kappa, wrong in accuracy); item 10 count 3 = present vs gold no.
    assert sc["x"]["unparseable"] == 1 and sc["x"]["accuracy"] == pytest.approx(7 / 10)


# --------------------------------------------------------------------------- over HTTP

def test_http_judge_labels_kill_and_resume(tmp_path, server_factory):
    """Scripted server: labels equal the script; a judge killed mid-run continues from the
    cache and ends with the same labels as an uninterrupted run; a re-run is free."""
    server = server_factory(delay=0.03)
    samples, rows = write_samples(tmp_path / "s.jsonl", problems=6, n=3)  # 18 responses x 6 = 108
    flags = ["--judge-url", server.url, "--judge-name", "scripted", "--concurrency", "2", "--backoff", "0.01"]
    full = tmp_path / "full.jsonl"
    proc = run_eval("judge", samples, *flags, "--out", full)
    assert "108 new, 0 cached, 0 unparseable" in proc.stdout
    behaviours = J.load_behaviours()
    assert cached_labels(full) == expected_labels(rows, behaviours, "api:scripted")

    cut = tmp_path / "s.judgments.jsonl"  # the default place, beside the samples
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "evaluate.py"), "judge", samples, *flags],
                         cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and (not cut.exists() or cut.read_text().count("\n") < 20):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    done = cut.read_text().count("\n")
    assert 20 <= done < 108
    proc = run_eval("judge", samples, *flags)
    assert f"{108 - done} new, {done} cached" in proc.stdout
    assert cached_labels(cut) == cached_labels(full)

    # The report shows the labels: share per behaviour with an interval, by correctness.
    from minirl.report import build_report
    rep = build_report([samples], tmp_path / "rep", bootstrap=20, plots=False)
    beh = rep["models"][0]["behaviours"]
    labels = cached_labels(cut)
    for b in behaviours:
        shown = [J.shows(v) for k, v in labels.items() if json.loads(k)[3] == b.name]
        assert beh[b.name]["judged"] == 18 and beh[b.name]["share"]["mean"] == pytest.approx(sum(shown) / 18)
    assert rep["settings"]["judge"] == "api:scripted"
    assert "## Cognitive behaviours (judge: api:scripted)" in open(tmp_path / "rep" / "report.md").read()
    assert "0 new, 108 cached" in run_eval("judge", samples, *flags).stdout  # a re-run is free


def test_http_judge_backed_by_the_bundled_model(tmp_path, server_factory):
    """The server answers with the bundled model through minirl's sampler: the tiny
    arithmetic model cannot answer yes/no, so its answers are counted as unparseable."""
    server = server_factory(answer=model_answerer(BUNDLED))
    samples, rows = write_samples(tmp_path / "s.jsonl", problems=2, n=2)
    proc = run_eval("judge", samples, "--judge-url", server.url, "--judge-name", "tiny",
                    "--behaviours", "verification,metacognitive", "--max-tokens", "8")
    records = list(J.JudgmentCache(tmp_path / "s.judgments.jsonl").records.values())
    assert len(records) == 8 and server.requests == 8
    bad = sum(r["label"] is None for r in records)
    assert bad == sum(J.parse_answer(r["answer"], "count" if r["behaviour"] == "verification" else "yes_no") is None
                      for r in records)
    assert f"8 new, 0 cached, {bad} unparseable" in proc.stdout
    run_eval("report", samples, "--out", tmp_path / "rep", "--bootstrap", "10", "--no-plots")
    beh = json.load(open(tmp_path / "rep" / "report.json"))["models"][0]["behaviours"]
    assert sum(b["unparseable"] for b in beh.values()) == bad  # reported, not read as "no"
    assert sum(b["judged"] for b in beh.values()) == 8 - bad


def test_http_server_errors_are_retried_and_reported(tmp_path, server_factory):
    samples, rows = write_samples(tmp_path / "s.jsonl", problems=2, n=2)
    base = ["--judge-name", "scripted", "--behaviours", "backtracking", "--backoff", "0.01", "--concurrency", "2"]
    # Two 500s and a stalled request (past --timeout): retried, every label arrives.
    server = server_factory(fault=lambda n, p, h: 500 if n <= 2 else "sleep" if n == 3 else None)
    proc = run_eval("judge", samples, "--judge-url", server.url, *base, "--timeout", "0.5")
    assert "4 new, 0 cached, 0 unparseable" in proc.stdout



def test_http_failures_keep_the_cache_and_say_so(tmp_path, server_factory):
    samples, rows = write_samples(tmp_path / "s.jsonl", problems=2, n=2)
    base = ["--judge-name", "scripted", "--behaviours", "backtracking", "--backoff", "0.01", "--concurrency", "2"]
    # Requests for problem p1 always fail: the others are cached, one clear line, exit 2.
    out = tmp_path / "j.jsonl"
    server = server_factory(fault=lambda n, p, h: 500 if "q1:" in p else None)
    proc = run_eval("judge", samples, "--judge-url", server.url, *base, "--retries", "2", "--out", out, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "2 request(s) failed after 2 retries (last: HTTP 500" in err[0] and "re-run" in err[0]
    assert len(J.JudgmentCache(out).records) == 2
    healthy = server_factory()
    proc = run_eval("judge", samples, "--judge-url", healthy.url, *base, "--out", out)
    assert "2 new, 2 cached" in proc.stdout and len(J.JudgmentCache(out).records) == 4

    # Connection refused (nothing listens): stops early with one line; the cache is untouched.
    dead = server_factory()
    url = dead.url
    dead.close()
    base[base.index("backtracking")] = "backtracking,verification"  # 4 new judgments to ask for
    proc = run_eval("judge", samples, "--judge-url", url, *base, "--retries", "1", "--out", out, check=False)
    assert proc.returncode == 2 and "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert len(J.JudgmentCache(out).records) == 4


def test_http_judge_api_key(tmp_path, server_factory):
    samples, _ = write_samples(tmp_path / "s.jsonl", problems=1, n=2)
    server = server_factory(fault=lambda n, p, h: None if h.get("Authorization") == "Bearer sk-test" else 401)
    flags = ["judge", samples, "--judge-url", server.url, "--judge-name", "scripted", "--behaviours", "verification"]
    proc = run_eval(*flags, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --judge-url: {server.url}/chat/completions answered 401 Unauthorized: "
        "set the API key in $OPENAI_API_KEY (--judge-key-env)"]
    assert run_eval(*flags, env={"OPENAI_API_KEY": "sk-test"}).returncode == 0
    assert len(J.JudgmentCache(tmp_path / "s.judgments.jsonl").records) == 2
    ev = load_evaluate()  # another variable, in-process
    os.environ["MY_KEY"] = "sk-test"
    try:
        args = ev.build_parser().parse_args(flags + ["--judge-key-env", "MY_KEY", "--out", str(tmp_path / "b.jsonl")])
        ev.cmd_judge(args)
    finally:
        del os.environ["MY_KEY"]
    assert len(J.JudgmentCache(tmp_path / "b.jsonl").records) == 2


def test_unparseable_answers_are_counted_not_read_as_no(tmp_path, server_factory):
    samples, _ = write_samples(tmp_path / "s.jsonl", problems=2, n=2)
    server = server_factory(answer=lambda p: "Maybe, it is hard to say." if "q0:" in p else "yes")
    proc = run_eval("judge", samples, "--judge-url", server.url, "--judge-name", "s", "--behaviours", "metacognitive")
    assert "4 new, 0 cached, 2 unparseable" in proc.stdout
    run_eval("report", samples, "--out", tmp_path / "rep", "--bootstrap", "10", "--no-plots")
    b = json.load(open(tmp_path / "rep" / "report.json"))["models"][0]["behaviours"]["metacognitive"]
    assert b["judged"] == 2 and b["unparseable"] == 2 and b["share"]["mean"] == 1.0
    assert "(2 / 2)" in open(tmp_path / "rep" / "report.md").read()


# --------------------------------------------------------------------------- local model, keyword, calibration

def test_local_model_judge_end_to_end(tmp_path):
    samples, _ = write_samples(tmp_path / "s.jsonl", problems=2, n=2)
    proc = run_eval("judge", samples, "--judge-model", BUNDLED, "--behaviours", "backtracking,multi_perspective",
                    "--batch-size", "3", "--max-tokens", "6")
    assert "8 new, 0 cached" in proc.stdout
    records = list(J.JudgmentCache(tmp_path / "s.judgments.jsonl").records.values())
    assert len(records) == 8 and {r["judge"] for r in records} == {"model:tiny-arith"}
    # Greedy and batched: the same answers in other batch sizes, one prompt at a time.
    judge = J.ModelJudge(BUNDLED, batch_size=1, max_new_tokens=6)
    behaviours = {b.name: b for b in J.load_behaviours()}
    rows = {(r["problem_id"], r["sample_index"]): r for r in map(json.loads, open(samples))}
    for r in records:
        s = rows[(r["problem_id"], r["sample_index"])]
        assert judge.judge_items([(behaviours[r["behaviour"]], s["question"], s["response"])]) == [r["answer"]]


def test_keyword_judge_and_two_files_in_a_report(tmp_path):
    a, _ = write_samples(tmp_path / "a.jsonl", problems=4, n=2)
    b, rows = write_samples(tmp_path / "b.jsonl", problems=4, n=2)
    run_eval("judge", a, b, "--judge", "keyword", "--behaviours", "verification,backtracking")
    run_eval("report", a, b, "--out", tmp_path / "rep", "--bootstrap", "10")
    rep = json.load(open(tmp_path / "rep" / "report.json"))
    # The keyword counts by hand: "check" is in RESPONSES[0], "Wait" in RESPONSES[1].
    shown = [((p + j) % 4) == 0 for p in range(4) for j in range(2)]
    assert rep["models"][0]["behaviours"]["verification"]["share"]["mean"] == pytest.approx(sum(shown) / 8)
    assert rep["comparisons"][0]["behaviours"]["verification"]["change"]["mean"] == 0.0
    assert "behaviours.png" in rep["figures"]


def test_calibrate_keyword_baseline_on_the_shipped_labels(tmp_path):
    proc = run_eval("judge", "--calibrate", LABELS, "--judge", "keyword", "--out", tmp_path / "cal.json")
    scores = json.load(open(tmp_path / "cal.json"))["scores"]
    assert set(scores) == {b.name for b in J.load_behaviours()}
    rows = [json.loads(line) for line in open(LABELS)]
    assert len(rows) == 60 and all(len(r["labels"]) == 6 for r in rows)
    # The same numbers by hand from the keyword judge's answers.
    judge = J.KeywordJudge()
    for b in J.load_behaviours():
        pred = [J.shows(J.parse_answer(a, b.answer)) for a in judge.judge_items([(b, r["question"], r["response"])
                                                                                 for r in rows])]
        gold = [r["labels"][b.name] for r in rows]
        assert scores[b.name]["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / 60)
        assert scores[b.name]["kappa"] == pytest.approx(J.cohen_kappa(gold, pred))
        assert f"{b.name:<20}" in proc.stdout


def test_judge_flag_errors(tmp_path):
    samples, _ = write_samples(tmp_path / "s.jsonl", problems=1, n=1)
    proc = run_eval("judge", samples, "--judge", "keyword", "--judge-url", "http://x", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: judge: give exactly one of --judge keyword, --judge-model DIR, --judge-url URL "
        "(got --judge, --judge-url)"]
    ev = load_evaluate()
    for args, msg in (([], "exactly one of"),
                      (["--judge-url", "http://127.0.0.1:9/v1"], "needs --judge-name"),
                      (["--judge-url", "ftp://x", "--judge-name", "m"], "must start with http"),
                      (["--judge", "keyword", "--behaviours", "nope"], "unknown 'nope'"),
                      (["--judge", "keyword", "--per-problem", "0"], "--per-problem must be >= 1"),
                      (["--judge", "keyword", "--concurrency", "0"], "--concurrency must be >= 1"),
                      (["--judge-model", str(tmp_path / "none")], "is not a folder")):
        with pytest.raises(MinirlError, match=msg):
            ev.cmd_judge(ev.build_parser().parse_args(["judge", samples, *args]))
    with pytest.raises(MinirlError, match="instead of samples"):
        ev.cmd_judge(ev.build_parser().parse_args(["judge", samples, "--calibrate", LABELS, "--judge", "keyword"]))
    assert not os.path.exists(tmp_path / "s.judgments.jsonl")  # nothing written by a refused run

    # --behaviour-file brings your own behaviours.
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"guessing": {"definition": "d", "answer": "count", "prompt": "{response}",
                                            "keywords": ["sample"]}}))
    ev.cmd_judge(ev.build_parser().parse_args(["judge", samples, "--judge", "keyword", "--behaviour-file", str(own)]))
    (rec,) = J.JudgmentCache(tmp_path / "s.judgments.jsonl").records.values()
    assert rec["behaviour"] == "guessing" and rec["label"] == 1  # "(sample 0.0)" holds the keyword once
