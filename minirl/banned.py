"""Banned words: a decoding restriction that cannot leak (Hu et al., arXiv 2505.21067, section
on restricting reflective words such as "wait" at decoding time).

    ban = BannedWords(tokenizer, ["wait", "hmm", "but"])
    generate(model, prompts, ..., banned_words=ban)

What is banned, exactly: a banned word may not appear in the completion's text as a *whole
word*, in any case ("But", "BUT"), however the tokenizer spells it (one token " but", or "b" +
"ut", or inside a longer token such as "but,"). A word is a maximal run of word characters
(letters, digits, underscore: what `\\w` matches in Python's `re`), so "butter", "rebut" and
"hmmm" are other words and stay allowed (ban "hmmm" too if you want it gone). The
completion's text is judged on its own: the prompt's last characters never join its first word.

How: a trie of the banned words (lowercase) is an automaton whose state is the current partial
word: ROOT (no word characters since the last boundary), a trie node (the partial word is a
prefix of a banned word), or DEAD (inside a word that is no banned word). For every state and
every token the tables below give the state after the token and whether the token *closes* a
banned word, i.e. puts a non-word character right after a complete banned word (" but," does;
" but" does not: "butter" may follow). The sampler forbids, per row and step, the tokens that
would close a banned word; the end of the text closes the word too, so a stop token, or any
token at the last allowed position, is also forbidden when it would leave a complete banned
word at the end. Everything is a table lookup on the device: [rows, V] of forbidden tokens
gathered by state, then the new state gathered by (state, token).

Token texts come from the tokenizer's own decoder: the text token i adds after other text,
decode([anchor, i]) minus decode([anchor]) (so that a SentencePiece "▁" reads as the space it
is mid-sentence); special tokens decode to nothing (decoding skips them), so they neither
close nor continue a word. A token holding part of a multi-byte character decodes to U+FFFD,
a non-word character: it closes words, which can only forbid more, never less, for banned
words of ASCII letters (banned words with non-ASCII letters may leak through byte-level pieces).
"""
from typing import Dict, List

import torch

from minirl.common import MinirlError

ROOT, DEAD = 0, 1  # automaton states; trie nodes are 2, 3, ...


def is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def token_texts(tokenizer) -> List[str]:
    """The text each token id adds after other text ('' for special tokens). `tokenizer` is a
    minirl Tokenizer (its `tk` is a `tokenizers.Tokenizer`)."""
    tk = tokenizer.tk
    V = tokenizer.vocab_size
    anchor = tk.encode(".", add_special_tokens=False).ids
    if len(anchor) == 1:
        head = tk.decode(anchor, skip_special_tokens=True)
        texts = tk.decode_batch([[anchor[0], i] for i in range(V)], skip_special_tokens=True)
        if head and all(t.startswith(head) for t in texts):
            return [t[len(head):] for t in texts]
    return tk.decode_batch([[i] for i in range(V)], skip_special_tokens=True)


class BannedWords:
    """The automaton of module docstring, built once per (tokenizer, words); generate() turns
    it into device tables for its stop tokens. Raises MinirlError for an empty list or a
    word that is not a single word (letters, digits, underscore)."""

    def __init__(self, tokenizer, words):
        if isinstance(words, str):
            words = words.split(",")
        self.words = sorted({w.strip().lower() for w in words if w.strip()})
        if not self.words:
            raise MinirlError("banned words: the list is empty")
        for w in self.words:
            if not all(is_word_char(c) for c in w):
                raise MinirlError(f"banned word {w!r}: only single words (letters, digits, underscore) "
                                  f"can be banned")
        self._build_trie()
        self.next_state, self.closes = self._build_tables(token_texts(tokenizer))

    def _build_trie(self):
        self.children: List[Dict[str, int]] = [{}, {}]  # per state: character -> state
        terminal = [False, False]
        for w in self.words:
            s = ROOT
            for c in w:
                if c not in self.children[s]:
                    self.children[s][c] = len(self.children)
                    self.children.append({})
                    terminal.append(False)
                s = self.children[s][c]
            terminal[s] = True
        self.terminal = torch.tensor(terminal)  # [S] the partial word is a whole banned word

    def _build_tables(self, texts: List[str]):
        """next_state [S, V] int32 and closes [S, V] bool (token closes a banned word)."""
        S, V = len(self.children), len(texts)
        terminal = self.terminal
        empty = torch.zeros(V, dtype=torch.bool)     # [V] no text: the state is unchanged
        brk = torch.zeros(V, dtype=torch.bool)       # [V] holds a non-word character
        lead_empty = torch.zeros(V, dtype=torch.bool)  # [V] starts with a non-word character
        inner = torch.zeros(V, dtype=torch.bool)     # [V] closes a banned word of its own text
        tail = torch.full((V,), DEAD, dtype=torch.int32)  # [V] state after its last boundary
        by_lead: Dict[str, List[int]] = {}           # leading word characters -> token ids
        for i, t in enumerate(texts):
            t = t.lower()
            j = 0
            while j < len(t) and is_word_char(t[j]):
                j += 1
            if j:
                by_lead.setdefault(t[:j], []).append(i)
            if not t:
                empty[i] = True
            elif j < len(t):
                brk[i], lead_empty[i] = True, j == 0
                s = ROOT
                for c in t[j:]:
                    if is_word_char(c):
                        s = self.children[s].get(c, DEAD) if s != DEAD else DEAD
                    else:
                        inner[i] |= bool(terminal[s])
                        s = ROOT
                tail[i] = s
        # Every state, every token: what happens when the token's leading word characters lead
        # to DEAD (or there are none).
        states = torch.arange(S, dtype=torch.int32)[:, None]  # [S, 1]
        nxt = torch.where(empty, states, torch.where(brk, tail, torch.tensor(DEAD, dtype=torch.int32)))  # [S, V]
        closes = inner[None, :] | (brk & lead_empty)[None, :] & terminal[:, None]  # [S, V]
        # The few (state, token) pairs whose leading word characters stay inside the trie.
        for s in range(S):
            if s == DEAD:
                continue
            stack = [(s, "")]
            while stack:
                node, path = stack.pop()
                for c, child in self.children[node].items():
                    stack.append((child, path + c))
                    ids = by_lead.get(path + c)
                    if ids:
                        ids = torch.tensor(ids)
                        nxt[s, ids] = torch.where(brk[ids], tail[ids], torch.tensor(child, dtype=torch.int32))
                        closes[s, ids] = inner[ids] | (brk[ids] & bool(terminal[child]))
        return nxt, closes

    def tables(self, vocab: int, stop_ids: List[int], banned_ids: List[int], device) -> "BanTables":
        """Device tables for one generate() call on a model with `vocab` output tokens (ids the
        tokenizer does not know have no text)."""
        S, V = self.next_state.shape
        nxt, closes = self.next_state[:, :vocab], self.closes[:, :vocab]
        if vocab > V:
            extra = vocab - V
            nxt = torch.cat([nxt, torch.arange(S, dtype=torch.int32)[:, None].expand(S, extra)], 1)
            closes = torch.cat([closes, torch.zeros(S, extra, dtype=torch.bool)], 1)
        ends_banned = self.terminal[nxt.long()]  # [S, vocab] the text would end on a banned word
        always = closes.clone()
        if banned_ids:
            always[:, banned_ids] = True
        is_stop = torch.zeros(vocab, dtype=torch.bool)
        if stop_ids:
            is_stop[stop_ids] = True
        during = always | (ends_banned & is_stop)  # [S, vocab]
        last = always | ends_banned  # [S, vocab] at the last allowed position
        return BanTables(torch.cat([during, last]).to(device), nxt.to(device))


class BanTables:
    """BannedWords on the device for one generate() call: forbid [2S, V] (rows S.. for the last
    position), next_state [S, V]."""

    def __init__(self, forbid: torch.Tensor, next_state: torch.Tensor):
        self.forbid, self.next_state = forbid, next_state
        self.S = next_state.shape[0]

    def forbidden(self, state: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """state [B] int64, last: 0-dim bool (this is the last position) -> [B, V] bool."""
        return self.forbid.index_select(0, state + self.S * last.long())

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """state [B], tokens [B] -> the state after each row's token [B] int64."""
        return self.next_state[state, tokens].long()
