"""Time and peak memory to load an HF folder: minirl.load_model vs transformers'
from_pretrained, measured in the same run, each load in a fresh subprocess.

    python benchmarks/bench_load.py [--model DIR] [--repeats 3]

Peak memory: on CPU the process's peak resident set (ru_maxrss) minus its resident set
after imports (an upper bound on what loading adds: the high-water mark may come from the
imports themselves); on CUDA max_memory_allocated. Goal: minirl no
slower, and at most one copy of the weights plus 10%.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
which, path, device = sys.argv[1], sys.argv[2], sys.argv[3]
if which == "minirl":
    import minirl
else:
    import transformers
def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
# Warm up torch first: the first meta-device module pulls in ~150 MB of torch's own Python
# modules (meta registrations), which is not loading weights.
with torch.device("meta"):
    torch.nn.Embedding(8, 8)
    torch.nn.Linear(8, 8)
(1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))).sum()
base = current_rss()
t0 = time.perf_counter()
if which == "minirl":
    m = minirl.load_model(path, device=device, dtype=torch.float32)
else:
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device)
if device == "cuda":
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
# Touch every weight once: a lazily mapped file only becomes resident when read, and a
# model is loaded to be used.
with torch.no_grad():
    for p_ in m.parameters():
        p_.sum()
peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss() - base
uniq = {p.data_ptr(): p.numel() * p.element_size() for p in m.parameters()}
print(json.dumps({"seconds": dt, "peak_bytes": peak, "weight_bytes": sum(uniq.values())}))
"""


def measure(which, path, device):
    out = subprocess.run([sys.executable, "-c", CHILD, which, path, device], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.path.expanduser("~/.cache/minirl-tests/smollm2-135m-instruct"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not os.path.exists(args.model):
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from conftest import build_smollm2_folder
        build_smollm2_folder(args.model)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from minirl.common import device_description
    print(f"device: {device_description(device)} | model: {args.model}")
    results = {}
    for which in ("minirl", "transformers"):
        runs = [measure(which, args.model, device) for _ in range(args.repeats)]
        results[which] = {"seconds": statistics.median(r["seconds"] for r in runs),
                          "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
                          "weight_bytes": runs[0]["weight_bytes"]}
    w = results["minirl"]["weight_bytes"]
    for which, r in results.items():
        print(f"{which:>12}: load {r['seconds']:.3f} s (median of {args.repeats}), peak +{r['peak_bytes'] / 2**20:.0f} MiB "
              f"= {r['peak_bytes'] / w:.2f} x weights ({w / 2**20:.0f} MiB)")
    m, t = results["minirl"], results["transformers"]
    print(f"ratio minirl/transformers: time {m['seconds'] / t['seconds']:.2f}x, peak memory "
          f"{m['peak_bytes'] / t['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
