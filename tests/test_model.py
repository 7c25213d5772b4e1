"""The model against transformers: tiny random models of every family, real SmolLM2 weights,
round trips through save/load, left padding, packing, and the errors a user can cause."""
import json
import os

import pytest
import torch

import minirl
from minirl import MinirlError, load_model, load_tokenizer, save_model
from conftest import rel_err

transformers = pytest.importorskip("transformers")




def tiny_hf_model(family: str, **overrides):
    """A random transformers model of `family`, with every parameter (biases and norms too)
    perturbed so that no feature hides behind a zero or a one."""
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    common.update(overrides)
    if family in ("llama", "llama3"):
        cls = transformers.LlamaConfig
        if family == "llama3":
            common["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
            common["rope_theta"] = 500000.0
    elif family == "qwen2":
        cls = transformers.Qwen2Config
    elif family == "qwen3":
        cls = transformers.Qwen3Config
        common.setdefault("head_dim", 24)  # head_dim != hidden / heads
    cfg = cls(**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


FAMILIES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama3", {}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
]


@pytest.mark.parametrize("family,overrides", FAMILIES)
def test_tiny_models_match_transformers(tmp_path, family, overrides):
    hf = tiny_hf_model(family, **overrides)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (3, 50), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits.float()
        out = model(ids)
    assert out.dtype == torch.float32 and out.shape == (3, 50, 211)
    assert rel_err(out, ref) < 1e-5
    # Gradients flow to every parameter.
    model.train()
    model(ids[:, :10]).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_llama3_rope_scaling_changes_the_result(tmp_path):
    """Guard that rope_scaling is read at all: scaled and unscaled models differ."""
    hf = tiny_hf_model("llama3")
    hf.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    scaled = load_model(tmp_path, device="cpu")
    assert scaled.config.rope_scaling["rope_type"] == "llama3"
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    plain = load_model(tmp_path, device="cpu")
    ids = torch.arange(100)[None] % 211
    with torch.no_grad():
        assert rel_err(scaled(ids), plain(ids)) > 1e-3


def test_hidden_states_and_logits_agree(tmp_path):
    tiny_hf_model("qwen2").save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    ids = torch.randint(0, 211, (2, 9))
    with torch.no_grad():
        h = model(ids, return_hidden=True)
        assert h.shape == (2, 9, 64)
        torch.testing.assert_close(model.logits(h), model(ids))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_save_roundtrip_sharded(tmp_path, family):
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", device="cpu")
    # A tiny shard limit forces several shards and an index.
    save_model(model, tmp_path / "mine", max_shard_bytes=40_000)
    files = os.listdir(tmp_path / "mine")
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    back_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mine", dtype=torch.float32)
    back_mine = load_model(tmp_path / "mine", device="cpu")
    ids = torch.randint(0, 211, (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(back_hf(ids).logits, ref) < 1e-6
        assert rel_err(back_mine(ids), ref) < 1e-5


def test_left_padding_gives_each_row_its_own_result(tmp_path):
    tiny_hf_model("qwen3").save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 211, (n,), generator=g) for n in (7, 12, 3)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            assert rel_err(batched[i, T - len(r):], alone) < 1e-5


def test_packed_segments_do_not_see_each_other(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    a, b = torch.randint(0, 211, (5,)), torch.randint(0, 211, (8,))
    ids = torch.cat([a, b])[None]
    seg = torch.tensor([[0] * 5 + [1] * 8])
    pos = torch.cat([torch.arange(5), torch.arange(8)])[None]
    with torch.no_grad():
        packed = model(ids, positions=pos, segment_ids=seg)[0]
        assert rel_err(packed[:5], model(a[None])[0]) < 1e-5
        assert rel_err(packed[5:], model(b[None])[0]) < 1e-5


def test_kv_cache_prefill_then_decode_equals_full_forward(tmp_path):
    tiny_hf_model("qwen2").save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    ids = torch.randint(0, 211, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0  # row 0 is left-padded
    cache = minirl.KVCache(model.config, 2, 16, dtype=torch.float32)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        pre = model(ids[:, :8], attention_mask=mask[:, :8], kv_cache=cache, cache_start=0)
        steps = [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache, cache_start=t)
                 for t in range(8, 12)]
    assert rel_err(pre[1], full[1, :8]) < 1e-5
    assert rel_err(pre[0, 4:], full[0, 4:8]) < 1e-5
    assert rel_err(torch.cat(steps, 1), full[:, 8:]) < 1e-5


def test_gradient_checkpointing_same_gradients(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path)
    ids = torch.randint(0, 211, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = load_model(tmp_path, device="cpu").train()
        model.gradient_checkpointing = ckpt
        model(ids).logsumexp(-1).sum().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------- real weights: SmolLM2-135M

@pytest.fixture(scope="module")
def smol(smollm2_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    mine = load_model(smollm2_dir, device="cpu", dtype=torch.float32)
    return hf, mine, load_tokenizer(smollm2_dir), transformers.AutoTokenizer.from_pretrained(smollm2_dir)


PROMPTS = ["What is 17 * 23?", "Write a haiku about the sea.", "The capital of France is"]


def test_smollm2_logits_match(smol):
    hf, mine, tok, _ = smol
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)])
    with torch.no_grad():
        assert rel_err(mine(ids), hf(ids).logits) < 1e-4


def test_smollm2_chat_template_and_encoding_identical(smol):
    _, _, tok, hf_tok = smol
    for q in PROMPTS:
        for msgs in ([{"role": "user", "content": q}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                      {"role": "assistant", "content": "OK."}, {"role": "user", "content": "More?"}]):
            for gen in (True, False):
                ref = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == ref
                text = tok.apply_chat_template(msgs, add_generation_prompt=gen)
                assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_ids == [hf_tok.eos_token_id]


def greedy(model, ids, steps):
    """Full-recompute greedy decoding: the slow definition the sampler is tested against."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def test_smollm2_greedy_32_tokens_identical(smol):
    hf, mine, tok, _ = smol
    for q in PROMPTS:
        ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))])
        # No eos: compare all 32 tokens even past an end-of-turn (min_new_tokens would instead
        # forbid eos and change the argmax).
        hf.generation_config.eos_token_id = None
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                          pad_token_id=tok.pad_token_id)
        assert ref.shape[1] == ids.shape[1] + 32
        assert greedy(mine, ids, 32).tolist() == ref.tolist()


def test_smollm2_left_padded_batch(smol):
    _, mine, tok, _ = smol
    rows = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in PROMPTS]
    T = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = mine(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            assert rel_err(batched[i, T - len(r):], mine(torch.tensor([r]))[0]) < 1e-4


def test_smollm2_roundtrip_through_minirl_save(smol, tmp_path):
    hf, mine, tok, _ = smol
    save_model(mine, tmp_path / "out", tokenizer=tok)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = torch.tensor([tok.encode("Hello there, how are you?")])
    with torch.no_grad():
        assert rel_err(back(ids).logits, hf(ids).logits) < 1e-5
    msgs = [{"role": "user", "content": "hi"}]
    assert back_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs)


# ---------------------------------------------------------------- errors a user can cause

@pytest.fixture()
def good_folder(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_config(tmp_path):
    with pytest.raises(MinirlError, match="config.json"):
        load_model(tmp_path, device="cpu")


def test_missing_folder(tmp_path):
    with pytest.raises(MinirlError, match="not found"):
        load_model(tmp_path / "nope", device="cpu")


def test_unknown_model_type(good_folder):
    cfg = json.load(open(good_folder / "config.json"))
    cfg["model_type"] = "gpt_neox"
    json.dump(cfg, open(good_folder / "config.json", "w"))
    with pytest.raises(MinirlError, match="model_type 'gpt_neox'"):
        load_model(good_folder, device="cpu")


def test_sliding_window_refused(good_folder):
    cfg = json.load(open(good_folder / "config.json"))
    cfg.update(model_type="qwen2", use_sliding_window=True)
    json.dump(cfg, open(good_folder / "config.json", "w"))
    with pytest.raises(MinirlError, match="sliding"):
        load_model(good_folder, device="cpu")


def test_truncated_safetensors(good_folder):
    path = good_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MinirlError, match="model.safetensors"):
        load_model(good_folder, device="cpu")


def test_shape_mismatch_names_key(good_folder):
    cfg = json.load(open(good_folder / "config.json"))
    cfg["intermediate_size"] = 100
    json.dump(cfg, open(good_folder / "config.json", "w"))
    with pytest.raises(MinirlError, match="mlp.*shape"):
        load_model(good_folder, device="cpu")


def test_missing_key_named(good_folder):
    cfg = json.load(open(good_folder / "config.json"))
    cfg["num_hidden_layers"] = 3
    json.dump(cfg, open(good_folder / "config.json", "w"))
    with pytest.raises(MinirlError, match="missing keys.*layers.2"):
        load_model(good_folder, device="cpu")


def test_missing_shard(tmp_path):
    hf = tiny_hf_model("llama")
    model_dir = tmp_path / "m"
    save_model(load_model(_save(hf, tmp_path / "hf"), device="cpu"), model_dir, max_shard_bytes=40_000)
    os.remove(model_dir / "model-00002-of-{:05d}.safetensors".format(
        len([f for f in os.listdir(model_dir) if f.startswith("model-")])))
    with pytest.raises(MinirlError, match="model-00002.*missing"):
        load_model(model_dir, device="cpu")


def _save(hf, path):
    hf.save_pretrained(path)
    return path


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(MinirlError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_save_is_atomic_on_failure(tmp_path, good_folder):
    model = load_model(good_folder, device="cpu")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(MinirlError, match="non-finite"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    class Boom:
        def save(self, d):
            raise RuntimeError("disk full")
    with torch.no_grad():
        model.model.norm.weight[0] = 1.0
    with pytest.raises(RuntimeError):
        save_model(model, tmp_path / "out", tokenizer=Boom())
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_config_defaults_are_transformers_defaults(family):
    # A hand-written config.json may leave out everything but the sizes: each missing key must
    # mean what it means to transformers, or the same weights give another model.
    sizes = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    ours = minirl.ModelConfig.from_hf({"model_type": family, **sizes})
    theirs = transformers.AutoConfig.for_model(family, **sizes)
    rope = getattr(theirs, "rope_parameters", None) or {}
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.rope_theta == rope.get("rope_theta", getattr(theirs, "rope_theta", None))
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    if family == "llama":  # Qwen configs default to 32 KV heads whatever the head count; minirl: no GQA
        assert ours.num_key_value_heads == theirs.num_key_value_heads


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},   # Llama 3.1's values: every band is populated
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 512},
    {"rope_type": "linear", "factor": 3.0}])
def test_rope_frequencies_equal_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from minirl.model import rope_inverse_frequencies
    hf_cfg = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_theta=500000.0,
                                      rope_scaling=dict(scaling), max_position_embeddings=131072)
    ours = rope_inverse_frequencies(minirl.ModelConfig.from_hf(hf_cfg.to_dict()))
    theirs, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    assert ours.shape == theirs.shape == (64,)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    if scaling["rope_type"] == "llama3":  # kept, divided and blended frequencies all present
        ratio = plain / ours
        assert (ratio == 1).any() and (ratio == scaling["factor"]).any()
        assert ((ratio > 1.01) & (ratio < scaling["factor"] - 0.01)).any()
