"""minirl/sft.py planning and accounting against their documented rules, on small random cases.

Packing against a direct first-fit simulation, micro-batch budgets at their boundary, the
held-out split and epoch order as functions of their seeds, the too-long boundary, and the
FLOP and context counts against an enumeration of the model's matrices and the causal mask.
"""
import random

import numpy as np
import pytest
import torch

from minirl.common import MinirlError
from minirl.model import ModelConfig, Transformer
from minirl.sft import (Sequence, drop_too_long, encode_pair, epoch_order, heldout_loss, mean_causal_context,
                        micro_batches, model_flops_per_token, pack_rows, split_heldout)
from minirl.tokenizer import char_tokenizer


def first_fit(order, lengths, max_len, window):
    """The documented packing, written out: each example goes into the oldest open row with
    room; a row that cannot take the shortest example is closed; at most `window` rows are
    open (the oldest is closed when a new one would exceed that)."""
    shortest = min(lengths[i] for i in order)
    open_rows, closed = [], []  # open rows: [examples, room]
    for i in order:
        row = next((r for r in open_rows if lengths[i] <= r[1]), None)
        if row is None:
            row = [[], max_len]
            open_rows.append(row)
        row[0].append(i)
        row[1] -= lengths[i]
        if row[1] < shortest:
            open_rows.remove(row)
            closed.append(row[0])
        elif len(open_rows) > window:
            closed.append(open_rows.pop(0)[0])
    return closed + [r[0] for r in open_rows]


@pytest.mark.parametrize("window", [1, 2, 3, 64])
def test_pack_rows_is_windowed_first_fit(window):
    rng = random.Random(window)
    for trial in range(40):
        n, max_len = rng.randint(1, 30), rng.randint(8, 40)
        lengths = [rng.randint(1, max_len) for _ in range(n)]
        if trial % 4 == 0:  # exact fits: rows of max_len made of equal pieces
            lengths = [max_len // 2] * n
        order = list(range(n))
        rng.shuffle(order)
        rows = pack_rows(order, lengths, max_len, window=window)
        assert rows == first_fit(order, lengths, max_len, window), (lengths, max_len, order)
        assert sorted(i for r in rows for i in r) == list(range(n))
        assert all(sum(lengths[i] for i in r) <= max_len for r in rows)


def test_exactly_full_rows():
    assert pack_rows([0, 1, 2, 3], [5, 5, 5, 5], 10) == [[0, 1], [2, 3]]


def test_padded_micro_batches_fill_the_token_budget_exactly():
    rows = [[0], [1, 2], [3]]
    assert micro_batches(rows, [8, 8, 8, 8], False, 64, 32) == [[[0], [1], [2], [3]]]     # 4 x 8 = 32 fits
    assert micro_batches(rows, [8, 8, 8, 9], False, 64, 32) == [[[3], [0], [1]], [[2]]]   # longest first
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 20) for _ in range(12)]
        budget = rng.randint(20, 80)
        mbs = micro_batches([[i] for i in range(12)], lengths, False, 64, budget)
        for a, mb in enumerate(mbs):
            longest = lengths[mb[0][0]]
            assert all(lengths[r[0]] <= longest for r in mb)
            assert len(mb) == 1 or len(mb) * longest <= budget
            if a + 1 < len(mbs):  # greedy: the next example would not have fitted
                assert (len(mb) + 1) * longest > budget
    # Packed rows: tokens_per_micro_batch // max_len rows per micro-batch.
    assert micro_batches([[0], [1], [2]], [4] * 3, True, 16, 32) == [[[0], [1]], [[2]]]


def seqs_of(lengths, groups=None):
    return [Sequence(list(range(n)), [0] + [1] * (n - 1), str(g), f"ex {i}")
            for i, (n, g) in enumerate(zip(lengths, groups or range(len(lengths))))]


def test_too_long_boundary():
    seqs = seqs_of([7, 8, 9])
    kept, dropped = drop_too_long(seqs, 8, "skip")
    assert [len(s) for s in kept] == [7, 8] and dropped == 1
    with pytest.raises(MinirlError, match="ex 2: example has 9 tokens, more than --max-len 8"):
        drop_too_long(seqs, 8, "fail")


def test_heldout_split_by_group_and_seed():
    seqs = seqs_of([3] * 60, groups=[i // 3 for i in range(60)])  # 20 groups of 3 examples
    splits = {}
    for seed in range(4):
        train, val = split_heldout(seqs, 0.3, seed)
        assert len(val) == 18 and len(train) == 42          # round(0.3 * 20) = 6 groups
        assert not {s.group for s in train} & {s.group for s in val}
        assert split_heldout(seqs, 0.3, seed) == (train, val)
        splits[seed] = frozenset(s.group for s in val)
    assert len(set(splits.values())) == 4                     # the seed chooses the groups


def test_epoch_order_depends_on_seed_and_epoch():
    orders = {(s, e): tuple(epoch_order(30, s, e)) for s in range(2) for e in range(3)}
    assert all(sorted(o) == list(range(30)) for o in orders.values())
    assert len(set(orders.values())) == 6
    assert tuple(epoch_order(30, 1, 2)) == orders[(1, 2)]


def test_pair_eos_once():
    tok = char_tokenizer("ab=?")
    eos = tok.eos_token_ids[0]
    s = encode_pair(tok, "a=?", "ab", eos, "g", "w")
    assert s.ids[-1] == eos and s.ids.count(eos) == 1
    assert s.mask == [0] * len(tok.encode("a=?")) + [1] * 3
    s2 = encode_pair(tok, "a=?", "ab<eos>", eos, "g", "w")
    assert s2.ids == s.ids and s2.mask == s.mask


def tiny_config():
    return ModelConfig.from_hf(dict(model_type="llama", vocab_size=31, hidden_size=16, intermediate_size=24,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def test_heldout_loss_keeps_the_training_mode():
    model = Transformer(tiny_config())
    model.init_weights(0.1, generator=torch.Generator().manual_seed(0))
    seqs = seqs_of([5, 6, 7])
    for training in (False, True):
        model.train(training)
        loss = heldout_loss(model, seqs, 16, 32, 0, "cpu")
        assert np.isfinite(loss) and model.training == training


def test_flops_count_every_matrix_once():
    cfg = tiny_config()
    model = Transformer(cfg)
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = cfg.vocab_size * cfg.hidden_size  # tied or not, the head is one [V, H] matmul
    q = cfg.num_attention_heads * cfg.head_dim
    for frac in (0.25, 1.0):
        assert model_flops_per_token(cfg, 0.0, frac) == pytest.approx(3 * 2 * (matrices - head + frac * head))
    # Attention: scores and values, 2 FLOPs x 2 matmuls x context x (heads x head_dim) per layer.
    extra = model_flops_per_token(cfg, 10.0) - model_flops_per_token(cfg, 0.0)
    assert extra == pytest.approx(3 * cfg.num_hidden_layers * 4 * 10.0 * q)


def test_mean_causal_context_by_enumeration():
    rng = random.Random(1)
    for _ in range(20):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 5))]
        keys = [t + 1 for n in lengths for t in range(n)]  # query t of an example sees keys 0..t
        assert mean_causal_context(lengths) == pytest.approx(np.mean(keys))
