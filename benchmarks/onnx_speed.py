"""Inference speed of an exported backbone: onnxruntime (CPU) against PyTorch eager on the same weights, same threads.

Exports the model with `dino_from_scratch.export.export_onnx` (which first checks onnxruntime against PyTorch at three
sizes within 1e-4), then times the two runtimes interleaved (pairs in alternating order over `--rounds`, so both see
the same background load) at each `--size`, and reports the median ms per batch, images/s and the ratio ort/torch
(< 1: onnxruntime faster). Ends with one JSON line.

    .venv/bin/python benchmarks/onnx_speed.py                          # ViT-S/16 (DINOv1 shape), 224 and 160x288, batch 8
    .venv/bin/python benchmarks/onnx_speed.py --arch dinov3_vits16 --threads 2
"""
import argparse, json, statistics, tempfile, time
from pathlib import Path

import torch

from dino_from_scratch.export import OnnxBackbone, export_onnx
from dino_from_scratch.vit import vit_small
from dino_from_scratch.vit_v3 import dinov3_vit

ARCHS = {"vit_small": lambda: vit_small(), "dinov3_vits16": lambda: dinov3_vit("vits16")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small", choices=list(ARCHS))
    p.add_argument("--size", default="224x224,160x288", help="comma-separated HxW (multiples of 16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = ARCHS[a.arch]().eval()
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.size.split(",")]
    with tempfile.TemporaryDirectory() as d:
        rep = export_onnx(model, Path(d) / "m.onnx", size=sizes[0])
        ob = OnnxBackbone(rep["path"], threads=a.threads)
        out = {"arch": a.arch, "batch": a.batch, "threads": a.threads, "check": {k: max(v.values()) for k, v in rep["check"].items()}}
        for hw in sizes:
            x = torch.randn(a.batch, 3, *hw)
            run = {"torch": lambda: model.forward_features(x), "ort": lambda: ob.forward_features(x)}
            with torch.no_grad():
                for f in run.values(): f()                       # warm-up
                times = {k: [] for k in run}
                for r in range(a.rounds):
                    for _ in range(a.steps):
                        for k in (("torch", "ort") if r % 2 == 0 else ("ort", "torch")):
                            t0 = time.perf_counter(); run[k](); times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1000 for k, v in times.items()}
            out[f"{hw[0]}x{hw[1]}"] = {"torch_ms": round(med["torch"], 1), "ort_ms": round(med["ort"], 1),
                                       "torch_img_s": round(a.batch / med["torch"] * 1000, 1), "ort_img_s": round(a.batch / med["ort"] * 1000, 1),
                                       "ratio_ort_over_torch": round(med["ort"] / med["torch"], 3)}
            print(f"{hw[0]}x{hw[1]}: torch {med['torch']:.1f} ms, onnxruntime {med['ort']:.1f} ms per batch of {a.batch} "
                  f"(ratio ort/torch {med['ort'] / med['torch']:.2f})", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
