"""Every checkpoint layout a user brings loads, and minirl's own folders round-trip.

Layouts written by transformers (tied and untied embeddings, sharded with an index, bf16),
plus the ones other tools write: a tied model that stores a copy of the head anyway, and an
index over a single shard. Each is loaded and compared with transformers' logits; minirl's
save_model output is read back by transformers and by minirl, in fp32 and in bf16.
"""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import rel_err
from minirl import load_model, save_model
from minirl.checkpoint import INDEX_NAME, read_safetensors_header

transformers = pytest.importorskip("transformers")

V = 97


def hf_model(tied, dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


IDS = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))


def hf_logits(model):
    with torch.no_grad():
        return model.float()(IDS).logits.float()


def minirl_logits(model):
    with torch.no_grad():
        return model.float()(IDS)


def weight_dtypes(folder):
    names = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    return {info["dtype"] for f in names for info in read_safetensors_header(os.path.join(folder, f))[0].values()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_layouts_load(tmp_path, tied, sharded):
    hf = hf_model(tied)
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    assert os.path.exists(tmp_path / INDEX_NAME) == sharded
    model = load_model(tmp_path, device="cpu", dtype="fp32")
    assert (model.lm_head is None) == tied
    assert rel_err(minirl_logits(model), hf_logits(hf)) < 1e-5


def test_tied_checkpoint_with_a_stored_copy_of_the_head(tmp_path):
    hf = hf_model(tied=True)
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_model(tmp_path, device="cpu", dtype="fp32")
    assert model.lm_head is None
    assert rel_err(minirl_logits(model), hf_logits(hf)) < 1e-5


def test_index_over_a_single_shard(tmp_path):
    hf = hf_model(tied=False)
    hf.save_pretrained(tmp_path)
    os.rename(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00001.safetensors")
    with safe_open(tmp_path / "model-00001-of-00001.safetensors", "pt") as f:
        keys = list(f.keys())
    with open(tmp_path / INDEX_NAME, "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}, f)
    assert rel_err(minirl_logits(load_model(tmp_path, device="cpu", dtype="fp32")), hf_logits(hf)) < 1e-5


def test_bf16_checkpoint_loads_in_the_dtype_asked(tmp_path):
    hf = hf_model(tied=False, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert weight_dtypes(tmp_path) == {"BF16"}
    fp32 = load_model(tmp_path, device="cpu", dtype="fp32")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    bf16 = load_model(tmp_path, device="cpu", dtype="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    # bf16 values are exactly representable in fp32: the fp32 load is the same model (at the
    # fp32 tolerance of a model against transformers; these weights are not the small random ones).
    assert rel_err(minirl_logits(fp32), hf_logits(hf)) < 1e-4


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype, st_dtype, torch_dtype", [(None, "F32", torch.float32),
                                                          ("bf16", "BF16", torch.bfloat16)])
def test_save_model_round_trips(tmp_path, tied, dtype, st_dtype, torch_dtype):
    hf = hf_model(tied)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", device="cpu", dtype="fp32")
    for name, shard in (("one", 2 * 1024**3), ("shards", 20_000)):
        out = tmp_path / name
        save_model(model, out, max_shard_bytes=shard, dtype=dtype)
        assert weight_dtypes(out) == {st_dtype}
        with open(out / "config.json") as f:
            assert json.load(f)["dtype"] == {"F32": "float32", "BF16": "bfloat16"}[st_dtype]
        files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        if name == "shards":
            with open(out / INDEX_NAME) as f:
                index = json.load(f)["weight_map"]
            assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
            assert sorted(set(index.values())) == files and set(index) == set(model.state_dict())
        else:
            assert files == ["model.safetensors"] and not os.path.exists(out / INDEX_NAME)
        # transformers reads the dtype from config.json ("auto"), and the same weights.
        back_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert {p.dtype for p in back_hf.parameters()} == {torch_dtype}
        back = load_model(out, device="cpu", dtype="fp32")
        tol = 1e-5 if dtype is None else 2e-2
        assert rel_err(minirl_logits(back), hf_logits(hf)) < tol
        assert rel_err(hf_logits(back_hf), hf_logits(hf)) < tol
