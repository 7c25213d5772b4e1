"""Banned words (minirl/banned.py): exact on a hand-built tokenizer with tricky tokens (every
token sequence up to length 3 is allowed iff its decoded text holds no banned whole word),
through generate() on a tiny random model (eager, static shapes, greedy), and the leak test
on SmolLM2-135M-Instruct."""
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from minirl import MinirlError, load_model, load_tokenizer
from minirl.banned import BannedWords, token_texts
from minirl.sampler import generate
from minirl.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ["but", "hmm", "wait", "maybe"]
# Byte-level spellings ("Ġ" is a space, "Ċ" a newline): the word alone, with a leading space,
# in other cases, split in pieces, glued to punctuation, inside one token between spaces, and
# longer words that merely contain a banned one.
PIECES = ["b", "u", "t", "h", "m", "w", "a", "i", "y", "e", "r", "B", "H", "W", "Ġ", ",", ".", "Ċ", "_", "2",
          "Ġbut", "ĠBut", "BUT", "bu", "ut", "but,", ",Ġbut", "ĠbutĠ", "ter", "Ġbutter", "but_", "Ġre",
          "Ġhmm", "hm", "mm", "hmmm", "ĠHmm.", "Ġwa", "it", "it.", "Wait", "ĠwAIT", "may", "be", "Ġmay", "be,",
          "Ġso,Ġbut,Ġno", "Ġmaybe!", "Ã©", "Ã"]  # "é", and its first byte alone
SPECIAL = ["<eos>", "<pad>"]


def hand_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIAL + PIECES)}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIAL)
    return Tokenizer(tk, {"eos_token": "<eos>", "pad_token": "<pad>"})


def has_banned(text, words=WORDS):
    return re.search(r"\b(" + "|".join(words) + r")\b", text, flags=re.IGNORECASE) is not None


def test_token_texts_follow_the_decoder():
    tok = hand_tokenizer()
    texts = token_texts(tok)
    assert texts[:2] == ["", ""]  # special tokens: skipped by decoding
    assert texts[SPECIAL.index("<eos>")] == "" and texts[len(SPECIAL) + PIECES.index("Ġbut")] == " but"
    assert texts[len(SPECIAL) + PIECES.index("Ã©")] == "é"
    assert texts[len(SPECIAL) + PIECES.index("Ã")] == "\ufffd"  # part of a character: not a letter


def allowed(tables, seqs, last_index):
    """Replay the sampler's rule on sequences [N, L]: each token must not be forbidden in the
    state before it. -> [N] bool."""
    seqs = torch.as_tensor(seqs).reshape(-1, torch.as_tensor(seqs).shape[-1])  # [N, L]
    state = torch.zeros(seqs.shape[0], dtype=torch.long)  # [N] ROOT
    ok = torch.ones(seqs.shape[0], dtype=torch.bool)  # [N]
    for t in range(seqs.shape[1]):
        forbid = tables.forbidden(state, torch.tensor(t == last_index))  # [N, V]
        ok &= ~forbid.gather(1, seqs[:, t:t + 1])[:, 0]
        state = tables.advance(state, seqs[:, t])
    return ok


def test_every_short_sequence_is_allowed_iff_its_text_has_no_banned_word():
    tok = hand_tokenizer()
    ban = BannedWords(tok, ",".join(WORDS).upper())  # the words in any case
    eos = tok.eos_token_ids[0]
    tables = ban.tables(tok.vocab_size, [eos], [], "cpu")
    ids = list(range(len(SPECIAL), tok.vocab_size)) + [SPECIAL.index("<pad>")]  # a special non-stop token too
    n_banned = n_open = 0
    for L in (1, 2, 3):
        seqs = torch.tensor(list(itertools.product(ids, repeat=L)))  # [N, L] every sequence of length L
        texts = tok.tk.decode_batch(seqs.tolist(), skip_special_tokens=True)
        bad = torch.tensor([has_banned(t) for t in texts])  # [N]
        n_banned += int(bad.sum())
        # Ended by the length limit (its last token at the last position), or by a stop token.
        assert torch.equal(allowed(tables, seqs, L - 1), ~bad)
        with_eos = torch.cat([seqs, torch.full((len(seqs), 1), eos)], 1)  # [N, L + 1]
        assert torch.equal(allowed(tables, with_eos, L + 5), ~bad)
        # Not at the end yet, a text ending on a banned word may still become a longer word.
        n_open += int((allowed(tables, seqs, L + 5) & bad).sum())
    assert n_banned > 10_000  # the vocabulary does spell the words in many ways
    assert n_open > 0  # e.g. " but": "ter" may follow ("," may not)
    # Words that merely contain a banned one stay allowed, however they are spelled.
    piece = {p: len(SPECIAL) + i for i, p in enumerate(PIECES)}
    for spelling in (["Ġbut", "ter", "."], ["Ġbutter"], ["Ġre", "bu", "t"], ["hmmm"], ["but_"], ["Ġbut", "2"],
                     ["Ġhmm", "m", ","], ["Ġwa", "it", "e", "r"]):
        assert allowed(tables, [[piece[p] for p in spelling]], len(spelling) - 1).all(), spelling


def test_bad_word_lists_are_refused():
    tok = hand_tokenizer()
    with pytest.raises(MinirlError, match="empty"):
        BannedWords(tok, " , ")
    with pytest.raises(MinirlError, match="single words"):
        BannedWords(tok, ["let me"])


@pytest.fixture(scope="module")
def hand_model(tmp_path_factory):
    """A random Llama over the hand-built vocabulary, flat enough that every token appears."""
    tok = hand_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size + 3, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = tmp_path_factory.mktemp("hand")
    hf.save_pretrained(path)
    return load_model(path, device="cpu", dtype=torch.float32), tok


@pytest.mark.parametrize("kw", [dict(temperature=1.5), dict(temperature=1.0, top_k=20, static_shapes=True),
                                dict(temperature=0.0)], ids=["sampled", "static", "greedy"])
def test_generate_never_writes_a_banned_word(hand_model, kw):
    model, tok = hand_model
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
    common = dict(n=40 if kw["temperature"] else 1, max_new_tokens=12, stop_token_ids=tok.eos_token_ids,
                  seed=0, **kw)
    if not kw["temperature"]:
        common.pop("seed")
    ban = BannedWords(tok, WORDS)
    texts = {}
    for name, extra in (("free", {}), ("banned", dict(banned_words=ban))):
        out = generate(model, prompts, **common, **extra)
        ids = [c.token_ids for cs in out for c in cs]
        texts[name] = [tok.decode([i for i in s if i < tok.vocab_size]) for s in ids]
    if kw["temperature"]:
        assert sum(map(has_banned, texts["free"])) > 10  # without the ban the words do appear
    assert not any(map(has_banned, texts["banned"]))
    # Unrelated words that contain a banned one stay possible.
    if kw["temperature"] == 1.5:
        assert any(re.search(r"butter|hmmm|but_", t, re.I) for t in texts["banned"])


def test_banned_token_ids_and_words_together(hand_model):
    model, tok = hand_model
    bu = len(SPECIAL) + PIECES.index("bu")
    out = generate(model, [[5, 6]], n=50, max_new_tokens=10, temperature=1.5, seed=1,
                   banned_token_ids=[bu], banned_words=BannedWords(tok, WORDS))
    ids = [c.token_ids for c in out[0]]
    assert not any(bu in s for s in ids)
    assert not any(has_banned(tok.decode([i for i in s if i < tok.vocab_size])) for s in ids)


# ----------------------------------------------------------------------------- the leak test

LEAK_WORDS = ["wait", "hmm", "maybe", "but", "alternatively"]
QUESTIONS = ["Is 91 a prime number? Think step by step.", "What is 17 * 23? Check your answer.",
             "Which is larger, 9.11 or 9.9?", "A bat and a ball cost $1.10 in total. The bat costs $1 "
             "more than the ball. How much does the ball cost?"]


def count_words(texts):
    return sum(len(re.findall(r"\b(" + "|".join(LEAK_WORDS) + r")\b", t, re.IGNORECASE)) for t in texts)


def test_smollm2_leak(smollm2_dir, tmp_path):
    """evaluate.py sample --banned-words on SmolLM2-135M-Instruct: 32 responses of up to 40
    tokens hold none of the words; the same request without the ban does (the full 200-response
    run is `python benchmarks/bench_sampler.py --leak`)."""
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "0"}) + "\n" for q in QUESTIONS))
    out = tmp_path / "s.jsonl"
    flags = {"--model": smollm2_dir, "--data": data, "--template": "chat", "--n": 8, "--max-new-tokens": 40,
             "--chunk-problems": 4, "--seed": 0, "--out": out, "--banned-words": ",".join(LEAK_WORDS)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "sample",
                           *[str(x) for kv in flags.items() for x in kv]],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    banned = [json.loads(ln)["response"] for ln in open(out)]
    assert len(banned) == 32 and count_words(banned) == 0
    # Without the ban (same prompts and settings, through the library): the words appear.
    model = load_model(smollm2_dir, device="cpu", dtype=torch.float32)
    tok = load_tokenizer(smollm2_dir)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    free = generate(model, prompts, n=8, max_new_tokens=40, temperature=1.0, stop_token_ids=tok.eos_token_ids,
                    seed=0)
    assert count_words([tok.decode(c.token_ids) for cs in free for c in cs]) > 0
