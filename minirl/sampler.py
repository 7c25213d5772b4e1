"""Batched sampling with a KV cache: GRPO rollouts (n samples per prompt) and pass@k evaluation.

    out = generate(model, [[1, 2, 3], [4, 5]], n=8, max_new_tokens=256, temperature=0.9,
                   top_k=50, stop_token_ids=[eos], seed=0, return_logprobs=True)
    out[p][j].token_ids, out[p][j].finish_reason, out[p][j].logprobs   # prompt p, sample j

What is implemented, exactly:

* Waves. The request is a list of (prompt, sample) rows. Prompts are ordered by length
  (longest first, stable) and the rows are cut into waves whose KV cache holds at most
  `max_batch_tokens` tokens (rows x (longest prompt of the wave + max_new_tokens)). The
  default budget is 2 GiB of cache on CPU and 40% of the free GPU memory on CUDA.
* Prefill once per distinct prompt. In each wave the distinct prompts are left-padded and
  run through the model once (in chunks of at most `PREFILL_TOKENS` tokens), only the last
  position goes through the output projection, and each prompt's cache row is copied to
  its n sample rows (index_select).
* Exact rows. Every row has its own positions (prompt length + step) and an attention mask
  that hides its left padding, so padding and batch composition never change what a row
  attends to. Finished rows keep being computed (their tokens are discarded) until at least
  a quarter of the batch has finished; then the batch is compacted (finished rows are
  dropped from cache, mask, positions and every per-row buffer, in place). On CUDA the
  check runs every `CUDA_SYNC_EVERY` steps and compacts when the live rows fit a smaller
  power-of-two bucket.
* Sampling (`sample_next`, defined by `sampling_logprobs`): banned tokens get -inf first
  (they can never appear, whatever the temperature); then logits / temperature; top-k
  keeps the tokens whose logit is >= the k-th largest (ties at the boundary kept, as in
  transformers); top-p keeps the smallest prefix of the tokens sorted by probability whose
  mass reaches top_p (the top token always), plus every token tied with the last one kept.
  temperature == 0 is greedy (argmax over the non-banned tokens; top-k/top-p ignored).
  On CPU, with top-k (or top-p whose nucleus lies in the 256 most likely tokens) the work
  is done on those candidates only, after a check that this is exact; the whole-vocabulary
  version (used inside CUDA graphs) picks the same token for the same random number.
* Log-probs (`return_logprobs=True`): the log-probability of each sampled token under the
  sampling distribution above (after bans, temperature, top-k and top-p, renormalised), in
  fp32. For greedy decoding there is no sampling distribution: the log-prob is the
  log-softmax of the raw logits with only the banned tokens removed (the model's own
  distribution at temperature 1).
* Randomness. One uniform number per sampled token, and the token is read off the inverse
  CDF of the sampling distribution (cumulative sum in fp64; a token of probability 0 is
  never chosen). Each row (prompt p, sample j) has its own stream: a seed is drawn for it
  from the base generator (`generator`, or a CPU torch.Generator seeded with `seed`, or
  one seeded from torch's global RNG when neither is given), and its uniforms come from a
  CPU generator with that seed. Hence: the same seed gives the same output (bitwise on
  CPU); the n samples of a prompt are independent; and the random numbers a row uses do not
  depend on waves, compaction, batch order or the device. What can still differ between
  two batchings is the logits themselves (floating-point results of a matmul depend on the
  batch shape), so a sampled token can flip where two tokens' CDF boundaries straddle
  the uniform by less than that rounding.
* Stops. A row ends at its first token in `stop_token_ids` (kept in token_ids,
  finish_reason "stop") or after max_new_tokens (finish_reason "length").
* CUDA. The decode step (forward of one token per row, output projection, sampling) is
  captured in a CUDA graph per (batch bucket, cache-width bucket): batches are padded up
  to a power of two (the padding rows are stale rows whose results are ignored), the cache
  width to a multiple of `GRAPH_WIDTH_STEP` columns (the causal mask hides the columns not
  yet written). Inputs live in static buffers, the write column and step index are device
  tensors. Stop conditions are evaluated on the device; the host reads them every
  `CUDA_SYNC_EVERY` steps. `use_cuda_graph=False` runs the plain eager loop instead.
  The tests run this static bookkeeping eagerly on CPU (`_STATIC_ON_CPU`); the graph
  capture itself has, at the time of writing, not yet been run on a GPU.

Library code: no printing. Errors a caller can cause raise MinirlError (a ValueError)
naming the argument, before any work is done.
"""
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from minirl.common import MinirlError
from minirl.model import KVCache

PREFILL_TOKENS = 8192          # max tokens (rows x padded prompt length) per prefill forward
COMPACT_FRACTION = 0.25        # compact once this fraction of the computed rows has finished
CUDA_SYNC_EVERY = 16           # on CUDA the host looks at the stop flags every this many steps
GRAPH_WIDTH_STEP = 128         # CUDA graphs are captured for cache widths in multiples of this
CPU_CACHE_BYTES = 2 * 1024**3  # default KV budget on CPU
CUDA_FREE_FRACTION = 0.4       # default KV budget on CUDA: this fraction of free memory
SAMPLING_BYTES_PER_VOCAB = 40  # temporaries of sample_next per row and vocabulary entry
TOP_P_CANDIDATES = 256         # top-p without top-k: candidates tried before the whole vocabulary
_STATIC_ON_CPU = False         # tests: run the CUDA-graph bookkeeping (buckets, padding) eagerly on CPU


@dataclass
class Completion:
    token_ids: List[int]               # generated tokens, including the stop token if one was produced
    finish_reason: str                 # "stop" or "length"
    logprobs: Optional[List[float]] = None  # per token, under the sampling distribution (see module doc)


# ----------------------------------------------------------------------------- sampling

def _mass_before(desc: torch.Tensor) -> torch.Tensor:
    """[B, K] probabilities sorted descending -> [B, K] fp64 mass of the tokens before each."""
    cum = desc.double().cumsum(dim=-1)  # [B, K]
    return torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                      banned_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Log-probs [B, V] (fp32, -inf for excluded tokens) of the distribution sample_next draws
    from: bans, then temperature, then top-k, then top-p (see the module docstring).
    temperature == 0: log-softmax of the logits with the banned tokens removed."""
    x = logits.float()  # [B, V]
    if banned_mask is not None:
        x = x.masked_fill(banned_mask, float("-inf"))  # [B, V]
    if temperature == 0:
        return F.log_softmax(x, dim=-1)
    x = x / temperature  # [B, V]
    V = x.shape[-1]
    k = min(top_k, V)
    if 0 < k < V:
        kth = x.topk(k, dim=-1).values[:, -1:]  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    logp = F.log_softmax(x, dim=-1)  # [B, V]
    if top_p < 1.0:
        p = logp.exp()  # [B, V]
        # Top-p needs the probabilities in descending order; with top-k only the first k
        # can be kept (tokens tied with the k-th share its value, see module doc).
        desc = p.topk(k, dim=-1).values if 0 < k < V else p.sort(dim=-1, descending=True).values  # [B, K]
        n_keep = (_mass_before(desc) < top_p).sum(dim=-1, keepdim=True)  # [B, 1], >= 1: the top token is kept
        p_min = desc.gather(-1, n_keep - 1)  # [B, 1] probability of the last kept token
        logp = F.log_softmax(x.masked_fill(p < p_min, float("-inf")), dim=-1)  # [B, V]
    return logp


def sample_next(logits: torch.Tensor, uniforms: Optional[torch.Tensor], temperature: float,
                top_k: int = 0, top_p: float = 1.0, banned_mask: Optional[torch.Tensor] = None,
                need_logprobs: bool = True, sync_free: bool = False):
    """One token per row: tokens [B] int64 and their log-probs [B] fp32 (or None).

    logits [B, V]; uniforms [B] in [0, 1) (fp64 preferably; unused when temperature == 0).
    The token is the first one, in vocabulary order, whose cumulative probability exceeds
    u * total: inverse-CDF sampling, exact for any distribution, one random number per token.

    Two ways to compute it, which pick the same token for the same u (up to float rounding):
    - over the whole vocabulary (`sampling_logprobs`): static shapes, no host synchronisation
      (capturable in a CUDA graph; used when sync_free=True);
    - over candidates (sync_free=False, the default): with top-k, the k largest logits; with
      top-p alone, the 256 most likely tokens when they hold the nucleus. The host checks that
      the candidates contain the whole support (no ties at the boundary, nucleus reached)
      and otherwise falls back to the whole vocabulary. Much cheaper on a CPU."""
    x = logits.float()  # [B, V]
    if banned_mask is not None:
        x = x.masked_fill(banned_mask, float("-inf"))
    if temperature == 0:
        tokens = x.argmax(dim=-1)  # [B]
        if not need_logprobs:
            return tokens, None
        return tokens, F.log_softmax(x, dim=-1).gather(-1, tokens[:, None])[:, 0]
    V = x.shape[-1]
    k = top_k if 0 < top_k < V else 0
    if not sync_free and (k or top_p < 1.0):
        z = x if temperature == 1 else x / temperature  # [B, V]
        vals, idx = z.topk(k or min(V, TOP_P_CANDIDATES), dim=-1)  # [B, K] sorted, descending
        if k:
            # Exact unless a token outside the k ties with the k-th (top-k keeps ties).
            ok = not bool(((z >= vals[:, -1:]).sum(dim=-1) > k).any())
            log_z = torch.logsumexp(vals, dim=-1, keepdim=True)  # [B, 1] support = the k tokens
        else:
            log_z = torch.logsumexp(z, dim=-1, keepdim=True)  # [B, 1] support = whole vocabulary
            p = (vals - log_z).exp()  # [B, K]
            n_keep = (_mass_before(p) < top_p).sum(dim=-1, keepdim=True)  # [B, 1]
            # Exact if the nucleus ends inside the candidates, strictly above the last one
            # (so no token outside them can tie with the last kept token).
            ok = bool(((n_keep < vals.shape[-1]) & (p.gather(-1, n_keep - 1) > p[:, -1:])).all())
        if ok:
            return _sample_candidates(vals, idx, log_z, top_p, uniforms, need_logprobs)
    logp_all = sampling_logprobs(x, temperature, top_k, top_p)  # [B, V]
    cdf = logp_all.exp().cumsum(dim=-1, dtype=torch.float64)  # [B, V] fp64: a 150k tail stays exact
    # u * total < total for u < 1, so the search never runs past the last token of
    # positive probability, and a zero-probability token (cdf flat) is never the first > target.
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]  # [B, 1]
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=V - 1)  # [B] (clamp: guard only)
    logp = logp_all.gather(-1, tokens[:, None])[:, 0] if need_logprobs else None  # [B]
    return tokens, logp


def _sample_candidates(vals, idx, log_z, top_p, uniforms, need_logprobs):
    """sample_next over candidates: vals [B, K] tempered logits sorted descending, idx [B, K]
    their token ids, log_z [B, 1] the log-normaliser before top-p. Same rules as
    sampling_logprobs; the CDF runs in vocabulary order, as over the whole vocabulary."""
    if top_p < 1.0:
        p = (vals - log_z).exp()  # [B, K]
        n_keep = (_mass_before(p) < top_p).sum(dim=-1, keepdim=True)  # [B, 1] >= 1
        vals = vals.masked_fill(p < p.gather(-1, n_keep - 1), float("-inf"))
    logp = F.log_softmax(vals, dim=-1)  # [B, K]
    order = idx.argsort(dim=-1)  # [B, K] vocabulary order
    idx, logp = idx.gather(-1, order), logp.gather(-1, order)
    cdf = logp.exp().cumsum(dim=-1, dtype=torch.float64)  # [B, K]
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]  # [B, 1]
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=idx.shape[-1] - 1)  # [B, 1]
    return idx.gather(-1, j)[:, 0], (logp.gather(-1, j)[:, 0] if need_logprobs else None)


# ----------------------------------------------------------------------------- helpers

def _model_device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    _, dtype = _model_device_dtype(model)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


def default_max_batch_tokens(model) -> int:
    """Tokens of KV cache per wave: 2 GiB worth on CPU, 40% of the free memory on CUDA."""
    device, _ = _model_device_dtype(model)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = CUDA_FREE_FRACTION * free
    else:
        budget = CPU_CACHE_BYTES
    return max(1, int(budget // kv_bytes_per_token(model)))


def _default_max_rows(model) -> Optional[int]:
    """On CUDA, also bound the rows of a wave by the [rows, V] temporaries of sampling."""
    device, _ = _model_device_dtype(model)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, int(0.2 * free // (SAMPLING_BYTES_PER_VOCAB * model.config.vocab_size)))


def _as_id_list(seq, what: str, vocab: int, allow_empty: bool) -> List[int]:
    """A list of python ints in [0, vocab), or a MinirlError naming `what`."""
    if isinstance(seq, (str, bytes)) or not hasattr(seq, "__len__"):
        raise MinirlError(f"{what}: expected a list of token ids, got {type(seq).__name__}")
    if len(seq) == 0:
        if allow_empty:
            return []
        raise MinirlError(f"{what}: is empty (a prompt needs at least one token)")
    try:
        t = torch.as_tensor(seq)
    except (TypeError, ValueError, RuntimeError):
        raise MinirlError(f"{what}: expected a flat list of integer token ids") from None
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise MinirlError(f"{what}: expected a flat list of integer token ids (got dtype {t.dtype}, "
                          f"shape {tuple(t.shape)})")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise MinirlError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab})")
    return t.tolist()


def _validate(model, prompts, n, max_new_tokens, temperature, top_p, top_k, stop_token_ids,
              banned_token_ids, max_batch_tokens):
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "vocab_size"):
        raise MinirlError("model: expected a minirl Transformer (with .config)")
    vocab = cfg.vocab_size

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(n) or n < 1:
        raise MinirlError(f"n must be an integer >= 1, got {n!r}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise MinirlError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or not math.isfinite(temperature) or temperature < 0:
        raise MinirlError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise MinirlError(f"top_p must be in (0, 1], got {top_p!r}")
    if not is_int(top_k) or top_k < 0:
        raise MinirlError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if max_batch_tokens is not None and (not is_int(max_batch_tokens) or max_batch_tokens < 1):
        raise MinirlError(f"max_batch_tokens must be an integer >= 1, got {max_batch_tokens!r}")
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)):
        raise MinirlError("prompts must be a list of token-id lists")
    stop = sorted(set(_as_id_list(stop_token_ids or [], "stop_token_ids", vocab, True)))
    banned = sorted(set(_as_id_list(banned_token_ids or [], "banned_token_ids", vocab, True)))
    if len(banned) == vocab:
        raise MinirlError("banned_token_ids bans every token of the vocabulary")
    clean = []
    limit = cfg.max_position_embeddings
    for i, p in enumerate(prompts):
        ids = _as_id_list(p, f"prompts[{i}]", vocab, False)
        if len(ids) + max_new_tokens > limit:
            raise MinirlError(f"prompts[{i}]: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} "
                              f"exceed the model's context (max_position_embeddings={limit})")
        clean.append(ids)
    if max_batch_tokens is not None and clean:
        need = max(map(len, clean)) + max_new_tokens
        if need > max_batch_tokens:
            raise MinirlError(f"max_batch_tokens={max_batch_tokens} is smaller than one sequence "
                              f"(longest prompt + max_new_tokens = {need})")
    return clean, stop, banned


def _plan_waves(lengths: List[int], n: int, max_new: int, budget: int, max_rows: Optional[int]):
    """Waves of rows (prompt index, sample index). Prompts longest first (stable), the n
    samples of a prompt adjacent; a wave's cache (rows x (longest prompt + max_new)) fits
    `budget` tokens. A long prompt's samples may be split over several waves."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    waves, cur, cur_len = [], [], 0
    for p in order:
        for j in range(n):
            width = max(cur_len, lengths[p]) + max_new
            full = (len(cur) + 1) * width > budget or (max_rows is not None and len(cur) >= max_rows)
            if cur and full:
                waves.append(cur)
                cur, cur_len = [], 0
            cur.append((p, j))
            cur_len = max(cur_len, lengths[p])
    if cur:
        waves.append(cur)
    return waves


def _cache_view(cache: KVCache, rows: int) -> KVCache:
    """The first `rows` rows of a cache, as views (same storage)."""
    view = KVCache.__new__(KVCache)
    view.k = [k[:rows] for k in cache.k]
    view.v = [v[:rows] for v in cache.v]
    return view


def _move_rows_to_front(t: torch.Tensor, keep: torch.Tensor):
    """t[:len(keep)] = t[keep], in place (index_select first: source and target overlap)."""
    t[: keep.numel()].copy_(t.index_select(0, keep))


def _bucket(rows: int, cap: int) -> int:
    return min(cap, 1 << max(0, rows - 1).bit_length())


# ----------------------------------------------------------------------------- entry point

@torch.inference_mode()
def generate(model, prompts, *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, stop_token_ids=None, banned_token_ids=None,
             seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
             return_logprobs: bool = False, max_batch_tokens: Optional[int] = None,
             use_cuda_graph: bool = True) -> List[List[Completion]]:
    """For each prompt (a list of token ids), its n completions in order. See the module
    docstring for the exact semantics of every argument."""
    prompts, stop, banned = _validate(model, prompts, n, max_new_tokens, temperature, top_p, top_k,
                                      stop_token_ids, banned_token_ids, max_batch_tokens)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise MinirlError(f"seed must be an integer, got {seed!r}")
    if seed is not None and generator is not None:
        raise MinirlError("give seed or generator, not both")
    if not prompts:
        return []
    device, dtype = _model_device_dtype(model)
    vocab = model.config.vocab_size
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else
                              int(torch.randint(0, 2**62, (1,)).item()))  # follows torch.manual_seed
    # One seed per (prompt, sample) row, drawn in request order: a row's random stream does
    # not depend on how rows are grouped into waves.
    row_seeds = torch.randint(0, 2**62, (len(prompts) * n,), generator=generator,
                              device=generator.device).tolist()

    budget = max_batch_tokens or default_max_batch_tokens(model)
    lengths = [len(p) for p in prompts]
    waves = _plan_waves(lengths, n, max_new_tokens, budget, _default_max_rows(model))

    banned_mask = None
    if banned:
        banned_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        banned_mask[torch.tensor(banned, device=device)] = True
    stop_ids = torch.tensor(stop if stop else [-1], dtype=torch.long, device=device)
    sp = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
              banned_mask=banned_mask, need_logprobs=return_logprobs)
    # Static mode: the decode step in fixed shapes, captured in CUDA graphs on CUDA.
    # (_STATIC_ON_CPU lets the tests run the same bookkeeping eagerly on a CPU.)
    static = use_cuda_graph and (device.type == "cuda" or _STATIC_ON_CPU)
    sp["sync_free"] = static  # inside a CUDA graph: whole-vocabulary sampling, no host checks

    results: List[List[Optional[Completion]]] = [[None] * n for _ in prompts]
    for wave in waves:
        seeds = [row_seeds[p * n + j] for p, j in wave]
        out = _run_wave(model, prompts, wave, seeds, max_new_tokens, sp, stop_ids, device, dtype,
                        static)
        for (p, j), comp in zip(wave, out):
            results[p][j] = comp
    return results


# ----------------------------------------------------------------------------- one wave

def _run_wave(model, prompts, wave, seeds, max_new, sp, stop_ids, device, dtype, static):
    """Prefill the wave's distinct prompts once, copy to sample rows, decode to the end."""
    R = len(wave)
    distinct = list(dict.fromkeys(p for p, _ in wave))  # prompt indices in wave order
    local = {p: i for i, p in enumerate(distinct)}
    P = max(len(prompts[p]) for p in distinct)  # left-padded prompt width
    W = P + max_new  # cache columns
    cfg = model.config

    # Per-row uniforms [R, max_new]: row r's stream comes only from its own seed.
    uniforms = None
    if sp["temperature"] > 0:
        uniforms = torch.stack([torch.rand(max_new, generator=torch.Generator().manual_seed(s),
                                           dtype=torch.float64) for s in seeds]).to(device)  # [R, max_new]

    cache = KVCache(cfg, R, W, device=device, dtype=dtype)
    mask = torch.ones(R, W, dtype=torch.long, device=device)  # [R, W] 1 = real (generated columns too)
    row_prompt = torch.tensor([local[p] for p, _ in wave], device=device)  # [R] distinct index of each row
    plen = torch.tensor([len(prompts[p]) for p, _ in wave], device=device)  # [R]
    mask[:, :P] = (torch.arange(P, device=device)[None, :] >= (P - plen)[:, None]).long()  # left padding

    # ---- prefill: distinct prompts only, in chunks; logits at the last position only
    first_logits = torch.empty(len(distinct), cfg.vocab_size, device=device)  # [U, V]
    chunk = max(1, PREFILL_TOKENS // P)
    for c0 in range(0, len(distinct), chunk):
        ids_list = [prompts[p] for p in distinct[c0:c0 + chunk]]
        U = len(ids_list)
        ids = torch.zeros(U, P, dtype=torch.long)
        pmask = torch.zeros(U, P, dtype=torch.long)
        for i, r in enumerate(ids_list):
            ids[i, P - len(r):] = torch.tensor(r)
            pmask[i, P - len(r):] = 1
        ids, pmask = ids.to(device), pmask.to(device)  # [U, P]
        pre = KVCache(cfg, U, P, device=device, dtype=dtype)
        h = model(ids, attention_mask=pmask, kv_cache=pre, cache_start=0, return_hidden=True)  # [U, P, H]
        first_logits[c0:c0 + U] = model.logits(h[:, -1])  # [U, V]
        # Copy each prompt's cache to all of its sample rows (rows of a prompt are adjacent).
        sel = ((row_prompt >= c0) & (row_prompt < c0 + U)).nonzero()[:, 0]  # [r]
        src = row_prompt.index_select(0, sel) - c0  # [r]
        r0, r1 = int(sel[0]), int(sel[-1]) + 1
        for dst_l, src_l in zip(cache.k + cache.v, pre.k + pre.v):
            dst_l[r0:r1, :, :P] = src_l.index_select(0, src)  # [r, Hkv, P, D]
        del pre, h

    # ---- per-row decode state (index = position in the computed batch, compacted together)
    u0 = uniforms[:, 0] if uniforms is not None else None
    tok, lp = sample_next(first_logits.index_select(0, row_prompt), u0, **sp)  # [R], [R]
    del first_logits
    out_tok = torch.zeros(max_new, R, dtype=torch.long, device=device)  # [T, R] by wave row
    out_lp = torch.zeros(max_new, R, dtype=torch.float32, device=device) if sp["need_logprobs"] else None
    length = torch.full((R,), max_new, dtype=torch.long, device=device)  # [R] tokens kept per wave row
    stopped = torch.zeros(R, dtype=torch.bool, device=device)  # [R] per wave row: ended by a stop token
    rows = torch.arange(R, device=device)  # [R] wave row held at each batch position
    done = torch.zeros(R, dtype=torch.bool, device=device)  # [R]
    ids = tok[:, None].clone()  # [R, 1] the token to feed next
    pos = plen[:, None].clone()  # [R, 1] its position
    col = torch.tensor(P, device=device)  # 0-dim: the cache column it is written to
    step = torch.tensor(1, device=device)  # 0-dim: the index of the token being sampled

    def record(t, tok, lp, m):
        """Store the step-t tokens of the first m batch positions; update stops (on device)."""
        r = rows[:m]
        out_tok[t].index_copy_(0, r, tok[:m])
        if out_lp is not None:
            out_lp[t].index_copy_(0, r, lp[:m])
        hit = torch.isin(tok[:m], stop_ids) & ~done[:m]  # [m]
        length.index_copy_(0, r, torch.where(hit, t + 1, length.index_select(0, r)))
        stopped.index_copy_(0, r, stopped.index_select(0, r) | hit)
        done[:m] |= hit

    record(0, tok, lp, R)
    runner = _GraphRunner(model, sp) if static else None
    m = R  # rows whose results matter (a prefix of the batch)
    B = R  # rows computed (>= m in static mode: padded to a bucket)
    sync_every = CUDA_SYNC_EVERY if static else 1
    for t in range(1, max_new):
        if (t - 1) % sync_every == 0:
            live = m - int(done[:m].sum())
            if live == 0:
                break
            target_B = _bucket(live, R) if static else live
            if live <= (1 - COMPACT_FRACTION) * m and target_B < B:
                keep = (~done[:m]).nonzero()[:, 0]  # [live]
                for buf in cache.k + cache.v + [mask, ids, pos, rows, done]:
                    _move_rows_to_front(buf, keep)
                if uniforms is not None:
                    _move_rows_to_front(uniforms, keep)
                m, B = live, target_B
        width = P + t  # columns 0 .. col (= P + t - 1) are attended to
        u = uniforms[:B] if uniforms is not None else None
        if runner is not None:
            width = min(W, -(-width // GRAPH_WIDTH_STEP) * GRAPH_WIDTH_STEP)
            tok, lp = runner.step(B, width, ids, pos, mask, cache, col, step, u)
        else:
            tok, lp = _decode_step(model, ids[:B], pos[:B], mask[:B, :width], _cache_view(cache, B),
                                   col, step, u, sp)
        record(t, tok, lp, m)
        ids[:B, 0] = tok
        pos.add_(1)
        col.add_(1)
        step.add_(1)

    out_tok = out_tok.T.tolist()  # [R][T]
    out_lp = out_lp.T.tolist() if out_lp is not None else None
    length, stopped = length.tolist(), stopped.tolist()
    return [Completion(token_ids=out_tok[r][:length[r]], finish_reason="stop" if stopped[r] else "length",
                       logprobs=out_lp[r][:length[r]] if out_lp is not None else None)
            for r in range(R)]


def _decode_step(model, ids, pos, mask, cache, col, step, uniforms, sp):
    """One token for every row: forward [B, 1] through the cache, sample. Static shapes and
    no host synchronisation, so it can be captured in a CUDA graph."""
    h = model(ids, positions=pos, attention_mask=mask, kv_cache=cache, cache_start=col,
              return_hidden=True)  # [B, 1, H]
    logits = model.logits(h[:, 0])  # [B, V]
    u = uniforms.index_select(1, step.reshape(1))[:, 0] if uniforms is not None else None  # [B]
    return sample_next(logits, u, **sp)


class _GraphRunner:
    """CUDA graphs of _decode_step, one per (rows, cache width), captured on first use.
    The graph reads the static buffers of the wave (ids, pos, mask, cache, col, step,
    uniforms: their first `rows` rows) and returns static output tensors that the caller
    consumes before the next replay. All graphs share one memory pool (replays are
    sequential on one stream). Off CUDA (tests) the same step runs eagerly."""

    def __init__(self, model, sp):
        self.model, self.sp = model, sp
        self.graphs = {}
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None

    def step(self, rows, width, ids, pos, mask, cache, col, step, uniforms):
        key = (rows, width)
        if key not in self.graphs:
            args = (self.model, ids[:rows], pos[:rows], mask[:rows, :width], _cache_view(cache, rows),
                    col, step, uniforms, self.sp)
            if not self.cuda:
                return _decode_step(*args)
            # Warm-up on a side stream (cuBLAS handles, lazy inits). The step is idempotent:
            # it rewrites the same cache column from the same inputs, so running it here
            # and replaying it below gives the same result.
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                _decode_step(*args)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = _decode_step(*args)
            self.graphs[key] = (graph, out)
        graph, out = self.graphs[key]
        graph.replay()
        return out
