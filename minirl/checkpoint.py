"""Hugging Face folders <-> minirl models.

load_model: config.json + model.safetensors (or shards listed in model.safetensors.index.json).
The model is built on the meta device and the loaded tensors are assigned to it, so the
weights exist once in memory. Every key and shape is checked before anything is assigned.

save_model: config.json, generation_config.json, safetensors (sharded with an index above
`max_shard_bytes`) and the tokenizer files, written under a temporary name and renamed, so
a crash never leaves a folder that looks complete. transformers loads the result unchanged.
Nothing is ever unpickled: weights are safetensors only.
"""
import json
import os

import torch
from safetensors.torch import save_file

from minirl.common import AtomicDir, MinirlError, default_device, default_dtype, parse_dtype
from minirl.model import ModelConfig, Transformer, rope_inverse_frequencies

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_model_path(path: str) -> str:
    """A local folder as is; otherwise a hub id downloaded with huggingface_hub if installed."""
    path = str(path)
    if os.path.isdir(path):
        return path
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise MinirlError(f"{path}: model folder not found")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MinirlError(
            f"{path}: not a local folder, and huggingface_hub is not installed to fetch it from the "
            f"hub. Either `pip install minirl[hub]`, or download the folder yourself "
            f"(`huggingface-cli download {path} --local-dir DIR`) and pass DIR") from None
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
    except Exception as e:  # network, auth, missing repo: one clear line
        raise MinirlError(f"{path}: could not download from the hub ({type(e).__name__}: {e})") from None


def read_config(folder: str) -> ModelConfig:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise MinirlError(f"{cfg_path}: file not found (a model folder needs config.json)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise MinirlError(f"{cfg_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return ModelConfig.from_hf(d, source=cfg_path)


def weight_files(folder: str) -> list:
    """The safetensors files of a folder, checked to exist."""
    index = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, n) for n in names]
        for p in files:
            if not os.path.exists(p):
                raise MinirlError(f"{p}: shard listed in {index} is missing")
        return files
    single = os.path.join(folder, SINGLE_NAME)
    if not os.path.exists(single):
        raise MinirlError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} found")
    return [single]


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors_header(path: str) -> tuple:
    """(header dict name -> {dtype, shape, data_offsets}, byte offset of the data) of a
    safetensors file: 8 bytes little-endian header length, a JSON header, then the data.
    Checks that the file is long enough for every tensor (a truncated download fails here)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise MinirlError(f"{path}: unreadable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise MinirlError(f"{path}: {name} has unsupported dtype {info.get('dtype')}")
        if start + info["data_offsets"][1] > size:
            raise MinirlError(f"{path}: file is truncated ({name} ends past the end of the file)")
    return header, start


def read_tensor(f, info: dict, data_start: int) -> torch.Tensor:
    """Read one tensor with a plain file read into fresh memory: no memory map, so the
    page cache is not counted twice and the weights exist once."""
    t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else None
    if buf is not None:
        f.seek(data_start + begin)
        if f.readinto(memoryview(buf)) != end - begin:
            raise MinirlError(f"{f.name}: short read (truncated file?)")
    return t


def load_model(path, device=None, dtype=None) -> Transformer:
    """Load an HF folder (or hub id) into a minirl Transformer on `device` in `dtype`
    (defaults: GPU + bf16 when available, else CPU + fp32)."""
    folder = resolve_model_path(path)
    cfg = read_config(folder)
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files = weight_files(folder)
    headers = {path_: read_safetensors_header(path_) for path_ in files}
    found = {name: (path_, info["shape"]) for path_, (h, _) in headers.items() for name, info in h.items()}
    if cfg.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise MinirlError(f"{folder}: weights do not match config.json: " + "; ".join(parts))
    for name, (path_, shape) in found.items():
        if tuple(shape) != expected[name]:
            raise MinirlError(f"{path_}: {name} has shape {tuple(shape)}, config.json implies {expected[name]}")
    state = {}
    for path_, (header, data_start) in headers.items():
        with open(path_, "rb") as f:
            for name, info in header.items():
                if name in expected:
                    state[name] = read_tensor(f, info, data_start).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.inv_freq = rope_inverse_frequencies(cfg).to(device)  # buffers are not in the file
    model.source_folder = folder
    return model.eval()


def save_model(model: Transformer, out_dir, tokenizer=None, max_shard_bytes: int = 2 * 1024**3,
               dtype=None):
    """Write an HF folder that transformers' from_pretrained loads with identical logits."""
    dtype = parse_dtype(dtype)
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        if not torch.isfinite(t).all():
            raise MinirlError(f"refusing to save {out_dir}: {name} has non-finite values")
        state[name] = t.to("cpu").contiguous()
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)

    cfg = model.config.to_hf()
    cfg["dtype"] = DTYPE_NAMES.get(next(iter(state.values())).dtype, "float32")
    gen = {k: v for k, v in (("bos_token_id", model.config.bos_token_id),
                             ("eos_token_id", model.config.eos_token_id),
                             ("pad_token_id", model.config.pad_token_id)) if v is not None}
    with AtomicDir(out_dir) as tmp:
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, SINGLE_NAME), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                for name, t in shard.items():
                    weight_map[name] = fname
                    total += t.numel() * t.element_size()
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return str(out_dir)
