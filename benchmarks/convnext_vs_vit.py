"""A CPU-sized ConvNeXt trained from scratch with the DINOv2 trainer vs the tiny ViT (tiny_v2) at the same step.

The ConvNeXt arm uses the tiny_v2 recipe unchanged (read from the ViT checkpoint's metadata: data, crops, heads,
losses, schedules, seed); only the backbone differs. The library's `DINOv2Trainer` builds ViTs from `recipe.model`,
so this script subclasses its `build_models` (no library code is edited). Both arms are then evaluated the same way:
k-NN (Imagenette val, 64 px), CamVid linear segmentation mIoU and the NYU linear depth probe (both at 192x256), and
inference speed (CPU time per image, interleaved rounds, ratio ConvNeXt / ViT measured in the same run).

    PYTHONPATH=. .venv/bin/python benchmarks/convnext_vs_vit.py --vit-ckpt RUN_OR_FILE --steps 500 \
        --out runs/convnext_scratch --json data/runs/convnext_vs_vit.json [--vit-final /path/to/tiny_v2]
"""
import argparse, json, os, sys, time
from pathlib import Path

import torch

from dino_from_scratch.config import override, recipe_from_dict
from dino_from_scratch.convnext import ConvNeXt, ConvNeXtConfig, build_backbone, build_v2_models_any
from dino_from_scratch.dense import depth_eval, seg_eval
from dino_from_scratch.dinov2 import DINOv2Trainer
from dino_from_scratch.eval import knn_eval, load_backbone, random_backbone
from dino_from_scratch.checkpoint import latest_good_checkpoint, read_checkpoint

# the CPU-sized ConvNeXt: ConvNeXt-T's design (official stem 4, 4 stages, 7x7 depthwise, 4x MLP, LayerScale 1e-6) at half
# its widths and 6 blocks instead of 18. Its last map has stride 32 (2x2 at 64 px); with the official pseudo patch size 16
# the map is resampled to the ViT/16's 4x4 grid, where the trainer draws the iBOT masks (the mask token sits in the stem).
# (A stem of stride 2 gives a native 4x4 map but costs 10x the ViT's forward+backward on one CPU thread; stem 4: 3.5x.)
CPU_CONVNEXT = ConvNeXtConfig(depths=(1, 1, 3, 1), dims=(48, 96, 192, 384), stem_stride=4, patch_size=16,
                              drop_path_rate=0.0, mask_token=True)


class ConvNeXtV2Trainer(DINOv2Trainer):
    "Chapter 12's trainer with a ConvNeXt student and teacher: only `build_models` changes (heads sized by the backbone)."
    backbone_cfg: ConvNeXtConfig = CPU_CONVNEXT

    def build_models(self):
        p = ConvNeXt(self.backbone_cfg).patch_size
        if p != self.recipe.model.patch_size:   # DINOv2Trainer draws the iBOT masks on crop // recipe.model.patch_size
            raise ValueError(f"the ConvNeXt's patch grid ({p} px) must equal recipe.model.patch_size ({self.recipe.model.patch_size})")
        return build_v2_models_any(self.recipe, self.backbone_cfg)


def load_convnext_run(out, cfg: ConvNeXtConfig, which: str = "teacher") -> ConvNeXt:
    found = latest_good_checkpoint(out)
    if found is None: raise FileNotFoundError(f"no checkpoint under {out}/checkpoints")
    _, tensors, meta = found
    pre = f"{which}.backbone."
    model = ConvNeXt(cfg)
    model.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    return model.eval(), meta["step"]


def median_cpu_per_step(tr, n: int = 6) -> float:
    "CPU seconds per train step of a built trainer, data loading included (median of steps 2..n: step 1 warms up)."
    ts, c0 = [], time.process_time()
    for i, (crops, _, _) in enumerate(tr.loader()):
        tr.train_step(crops)
        ts.append(time.process_time() - c0); c0 = time.process_time()
        if i + 1 == n: break
    return sorted(ts[1:])[len(ts[1:]) // 2]


def cpu_per_step(cls, recipe, n: int = 6) -> float:
    "CPU seconds per train step, data loading included (num_workers=0), of a trainer class (median of steps 2..n)."
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        return median_cpu_per_step(cls(recipe, d, verbose=False), n)


@torch.no_grad()
def cpu_seconds_per_image(models: dict, size, batch: int, rounds: int = 3, reps: int = 2) -> dict:
    "Median CPU seconds per image of forward_features at `size`, models interleaved round by round (same background load)."
    x = torch.randn(batch, 3, *size)
    for m in models.values(): m.eval(); m.forward_features(x)           # warm-up
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            t0 = time.process_time()
            for _ in range(reps): m.forward_features(x)
            times[k].append((time.process_time() - t0) / (reps * batch))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vit-ckpt", required=True, help="the ViT arm: a tiny_v2 run directory or checkpoint file (its step is the budget)")
    ap.add_argument("--vit-final", default=None, help="optional: a finished tiny_v2 run, evaluated as a reference")
    ap.add_argument("--steps", type=int, default=None,
                    help="ConvNeXt training steps (default: as many as the ViT's steps cost in CPU time, from a pilot of both)")
    ap.add_argument("--out", default="runs/convnext_scratch")
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-evals", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    p = Path(args.vit_ckpt)
    if p.is_dir(): src, _, meta = latest_good_checkpoint(p)
    else: _, meta = read_checkpoint(p); src = p
    recipe = override(recipe_from_dict(meta["recipe"]), ["data.num_workers=0"])   # one process, one thread
    out = Path(args.out)
    res = {"recipe": recipe.name, "vit_ckpt": str(src), "vit_step": meta["step"],
           "convnext": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(CPU_CONVNEXT).items()}}
    steps = args.steps
    if steps is None and latest_good_checkpoint(out, verbose=False) is None:
        res["pilot_cpu_s_per_step"] = pilot = {"vit": cpu_per_step(DINOv2Trainer, recipe), "convnext": cpu_per_step(ConvNeXtV2Trainer, recipe)}
        steps = int(meta["step"] * pilot["vit"] / pilot["convnext"])
        print(f"[pilot] CPU s/step {pilot}: {meta['step']} ViT steps cost as much as {steps} ConvNeXt steps", flush=True)
    elif steps is None: steps = latest_good_checkpoint(out, verbose=False)[2]["step"]
    res["steps"] = steps
    recipe = override(recipe, [f"name={recipe.name}_convnext", f"run.ckpt_every={steps}"])

    # 1. train the ConvNeXt arm (skipped if a checkpoint at this step exists)
    done = latest_good_checkpoint(out, verbose=False)
    if done is None or done[2]["step"] < steps:
        tr = ConvNeXtV2Trainer(recipe, out, resume=done is not None)
        n_params = sum(q.numel() for q in tr.student.backbone.parameters())
        print(f"[convnext] {n_params / 1e6:.2f} M backbone parameters; training to step {steps}", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        tr.fit(max_steps=steps, progress=False)
        (out / "convnext.json").write_text(json.dumps(res["convnext"]))
        res["train"] = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                        "final_loss": tr.history[-1]["loss"] if tr.history else None}
        print(f"[convnext] trained: {res['train']}", flush=True)
    cnx, cnx_step = load_convnext_run(out, CPU_CONVNEXT)
    vit, _ = load_backbone(src)
    torch.manual_seed(0)
    models = {"vit_random": random_backbone(recipe, 0), f"vit_step{meta['step']}": vit,
              "convnext_random": ConvNeXt(CPU_CONVNEXT).eval(), f"convnext_step{cnx_step}": cnx}
    if args.vit_final:
        fin, _ = load_backbone(args.vit_final); models["vit_final"] = fin
        res["vit_final_step"] = read_checkpoint(latest_good_checkpoint(Path(args.vit_final))[0])[1]["step"]
    res["params"] = {k: sum(q.numel() for q in m.parameters()) for k, m in models.items()}

    # 2. speed: CPU seconds per image (1 thread), interleaved
    pair = {"vit": vit, "convnext": cnx}
    for name, size, batch in (("64px", (64, 64), 64), ("192x256", (192, 256), 8)):
        s = cpu_seconds_per_image(pair, size, batch)
        res[f"img_per_cpu_s_{name}"] = {k: round(1 / v, 1) for k, v in s.items()} | {"ratio_convnext_over_vit": round(s["vit"] / s["convnext"], 3)}
        print(f"[speed] {name}: {res[f'img_per_cpu_s_{name}']}", flush=True)

    # 3. evaluations
    cached_knn = {}   # dino-train already measured the finished run's k-NN and its random init (same recipe, seed 0)
    ej = Path(args.vit_final or "/nonexistent") / "eval.json"
    if ej.exists():
        j = json.loads(ej.read_text())
        cached_knn = {"vit_final": j["knn"]["top1"], "vit_random": j["knn_random_init"]["top1"]}
        res["knn_from_eval_json"] = sorted(cached_knn)
    if not args.skip_evals:
        res["evals"] = {}
        for k, m in models.items():
            c0 = time.process_time()
            e = {"knn": cached_knn.get(k) if k in cached_knn else knn_eval(m, recipe, progress=False)["top1"],
                 "camvid_miou": seg_eval(m, size=(192, 256))["miou"]}
            d = depth_eval(m, size=(192, 256))
            e |= {"depth_rmse": d["rmse"], "depth_abs_rel": d["abs_rel"], "depth_delta1": d["delta1"], "cpu_s": round(time.process_time() - c0, 1)}
            res["evals"][k] = e
            print(f"[eval] {k}: " + json.dumps({a: round(b, 4) for a, b in e.items()}), flush=True)
            if args.json: Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    if args.json: Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
