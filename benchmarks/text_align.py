"""dino.txt at CPU scale (chapter 27): trained vs random-init frozen backbone, with and without the patch half.

Four arms, each `text.tiny_align_config()` (batch 128, 240 steps = 5 epochs, 128 px, one intra-op thread) on captions-mini
train: {the trained `tiny` backbone (runs/tiny, `dino-train --recipe tiny`), the same architecture at random init (seed 0)}
x {CLS + mean patch (dino.txt), CLS only (LiT)}. Each is evaluated on
  * captions-mini val retrieval (1,000 photos, 5,000 captions; R@1/5/10 both ways),
  * Imagenette val zero-shot top-1 (2,000 images, prompt ensembling; CLIP's ImageNet class names and the same classes
    named in the captions' words, `text.IMAGENETTE_CAPTION_NAMES`),
  * CamVid val open-vocabulary mIoU and pointing game at 96x128 and 192x256 (the patch tokens against the patch half
    of the text vector, dino.txt's way; as a diagnostic also against the CLS half), and CamVid train at 96x128.
Also measured: training images/s (wall clock and per CPU-second) with cached frozen tokens, against running the frozen
backbone in every step (the reason for the cache), and the mIoU of constant predictions (the floor). It draws the
open-vocabulary maps of the two CLS + patch arms on one CamVid frame (`--save`: data/runs/text_align_maps.png).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_align.py --backbone runs/tiny --save     # ~13 CPU min of training + ~8 of evaluation
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_align.py --arms trained:cls_patch --steps 20 --out /tmp/ta  # smoke

Writes `<out>/result.json` and, with `--save`, data/runs/text_align_result.json (what the chapter shows, with the exact
command). Each arm's run directory `<out>/<arm>` holds metrics.jsonl and checkpoints; an arm that already finished is
resumed (no retraining: exact resume, the same weights as an uninterrupted run).
"""
import argparse, json, os, shlex, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def find_backbone() -> Path:
    for c in (os.environ.get("DINO_ALIGN_BACKBONE"), REPO / "runs/tiny", REPO.parent / "shared_runs/tiny"):
        if c and Path(c).is_dir() and list(Path(c).glob("checkpoints/step_*.safetensors")): return Path(c)
    sys.exit("no trained tiny run found: train one (dino-train --recipe tiny) or pass --backbone / set DINO_ALIGN_BACKBONE")


def cache_speed(trainer, data, steps: int = 3) -> dict:
    "Images/CPU-s of train steps over cached tokens vs the same steps also running the frozen backbone on decoded images."
    from dino_from_scratch.text import load_square, normalize_images
    n = trainer.cfg.batch_size
    def step_with_backbone():
        idx = torch.randint(len(data.sources), (n,))
        x = normalize_images(torch.stack([load_square(data.sources[i], trainer.cfg.image_size) for i in idx]))
        with torch.no_grad(): trainer.model.visual_model.backbone_tokens(x)
    t = {"cached": 0.0, "backbone": 0.0}
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt = trainer.opt.optimizer.state_dict()
    s0 = trainer.step
    for _ in range(steps):                                   # interleaved: both see the same background load
        t0 = time.process_time(); trainer.train_step(); t["cached"] += time.process_time() - t0
        t0 = time.process_time(); step_with_backbone(); trainer.train_step(); t["backbone"] += time.process_time() - t0
    trainer.model.load_state_dict(state); trainer.opt.optimizer.load_state_dict(opt); trainer.step = s0
    return {"img_per_cpu_s_cached": steps * n / t["cached"], "img_per_cpu_s_backbone_each_step": steps * n / t["backbone"],
            "speedup": t["backbone"] / t["cached"], "batch": n, "steps": steps}


def seg_scores(T, model, tok, tokens, seg, size, part) -> dict:
    from dino_from_scratch.dense import miou
    _, patches = T.embed_tokens(model, tokens)
    grid = (size[0] // 16, size[1] // 16)
    classes = T.class_embeddings(model, tok, T.CAMVID_NAMES, T.PROMPT_TEMPLATES, part)
    s = miou(T.segment(patches, classes, grid, seg.masks.shape[-2:]), seg.masks, len(T.CAMVID_NAMES), seg.ignore_index)
    return {"miou": s["miou"] * 100, "pixel_acc": s["pixel_acc"] * 100, "part": part,
            "per_class": {n: (None if v != v else round(v * 100, 1)) for n, v in zip(T.CAMVID_NAMES, s["per_class"])},
            "pointing": T.pointing_game(patches, classes, seg.masks, grid, T.CAMVID_NAMES)}


def evaluate(T, model, tok, cache, segs) -> dict:
    "Retrieval, zero-shot (two namings, ensembled and one template) and open-vocabulary segmentation of one arm."
    from dino_from_scratch.data import ImageDataset
    bb, size, r = model.visual_model.backbone, model.cfg.image_size, {}
    val = T.load_captions(None, "val")
    t, ok = T.cached_tokens(bb, val.sources, size, cache)
    caps = [val.captions[i] for i in ok.tolist()]
    owner = torch.tensor([i for i, cs in enumerate(caps) for _ in cs])
    r["retrieval"] = T.retrieval_metrics(T.embed_tokens(model, t)[0], T.embed_texts(model, tok, [c for cs in caps for c in cs]), owner)
    r["retrieval"] |= {"n_images": len(caps), "n_captions": len(owner)}
    ds = ImageDataset.from_folder(T.default_imagenette(), "val")
    t, ok = T.cached_tokens(bb, ds.sources, size, cache)
    labels = torch.tensor(ds.labels)[ok]
    r["zero_shot"] = T.zero_shot_accuracy(model, tok, t, labels) | {"n_images": len(labels)}
    r["zero_shot_caption_names"] = T.zero_shot_accuracy(model, tok, t, labels, T.IMAGENETTE_CAPTION_NAMES)
    both = model.cfg.use_cls and model.cfg.use_patches
    for (split, hw), seg in segs.items():
        toks, _ = T.cached_tokens(bb, seg.images, hw, cache, batch_size=16)
        key = f"{'segmentation' if split == 'val' else 'camvid_train'}_{hw[0]}x{hw[1]}"
        r[key] = seg_scores(T, model, tok, toks, seg, hw, "patch" if both else "all")
        if both and split == "val": r[key + "_cls_half"] = seg_scores(T, model, tok, toks, seg, hw, "cls")
    return r


def maps_figure(T, arms_models: dict, seg, path, size=(192, 256), words=("sky", "road", "building", "tree", "car")):
    "Per CLS + patch arm: a CamVid frame, the cosine map of each word's patch half, the segmentation from the 11 names."
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dino_from_scratch.dense import colorize as camvid_colors
    k = int((seg.masks == 0).flatten(1).float().mean(1).argmax())          # the frame with the most sky
    fig, axs = plt.subplots(len(arms_models), 3 + len(words), figsize=(2.0 * (3 + len(words)), 1.75 * len(arms_models)), squeeze=False)
    for row, (name, (model, tok)) in zip(axs, arms_models.items()):
        toks, _ = T.backbone_tokens(model.visual_model.backbone, seg.images[k:k + 1], size)
        _, patches = T.embed_tokens(model, toks)
        grid = (size[0] // 16, size[1] // 16)
        row[0].imshow(seg.images[k].permute(1, 2, 0)); row[0].set_title(f"{seg.names[k]}", fontsize=7)
        row[0].set_ylabel(name, fontsize=8)
        for ax, w, v in zip(row[1:], words, T.class_embeddings(model, tok, list(words), part="patch")):
            ax.imshow((F.normalize(patches[0], dim=-1) @ v).reshape(grid), cmap="inferno"); ax.set_title(f"{name.split(':')[0]}: '{w}'", fontsize=7)
        pred = T.segment(patches, T.class_embeddings(model, tok, T.CAMVID_NAMES, part="patch"), grid, seg.masks.shape[-2:])
        row[-2].imshow(camvid_colors(pred[0])); row[-2].set_title("from the 11 class names", fontsize=7)
        row[-1].imshow(camvid_colors(seg.masks[k])); row[-1].set_title("ground truth", fontsize=7)
        for ax in row: ax.set_xticks([]); ax.set_yticks([])
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
    return seg.names[k]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default=None, help="trained dino-train run directory (default runs/tiny)")
    p.add_argument("--out", default=str(REPO / "runs/text_align"))
    p.add_argument("--cache", default=str(REPO / "runs/text_cache"))
    p.add_argument("--arms", default="trained:cls_patch,random:cls_patch,trained:cls,random:cls")
    p.add_argument("--steps", type=int, default=None, help="override the steps of tiny_align_config (smoke runs)")
    p.add_argument("--save", action="store_true", help="also write data/runs/text_align_result.json and text_align_maps.png")
    args = p.parse_args()
    torch.set_num_threads(1)
    from dino_from_scratch.eval import load_backbone, random_backbone
    from dino_from_scratch import text as T
    from dino_from_scratch.dense import load_seg_folder, miou
    src = Path(args.backbone) if args.backbone else find_backbone()
    trained, recipe = load_backbone(src)
    backbones = {"trained": (trained, str(src)), "random": (random_backbone(recipe, seed=0), f"random init of {src} (seed 0)")}
    data = T.load_captions(None, "train")
    out = Path(args.out)
    res = {"command": "OMP_NUM_THREADS=1 python benchmarks/text_align.py " + " ".join(map(shlex.quote, sys.argv[1:])),
           "backbone": str(src), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "arms": {},
           "config": T.tiny_align_config(**({"steps": args.steps} if args.steps else {})).__dict__}
    segs = {(s, hw): load_seg_folder(None, s) for s, hw in (("val", (96, 128)), ("val", (192, 256)), ("train", (96, 128)))}
    models = {}
    for arm in args.arms.split(","):
        which, variant = arm.split(":")
        cfg = T.tiny_align_config(use_patches=variant == "cls_patch", **({"steps": args.steps} if args.steps else {}))
        bb, source = backbones[which]
        tr = T.AlignTrainer(cfg, bb, data, out / f"{which}_{variant}", resume=True, cache_dir=args.cache, backbone_source=source,
                            progress=False)
        t0 = time.time()
        tr.fit(progress=False)
        print(f"[{arm}] {tr.step} steps, {tr.train_seconds:.0f} s wall, {tr.cpu_seconds:.0f} s CPU "
              f"({time.time() - t0:.0f} s this call)", flush=True)
        hist = [json.loads(l) for l in (out / f"{which}_{variant}" / "metrics.jsonl").read_text().splitlines()]
        r = {"steps": tr.step, "train_seconds": tr.train_seconds, "cpu_seconds": tr.cpu_seconds,
             "img_per_s": tr.step * cfg.batch_size / max(tr.train_seconds, 1e-9),
             "img_per_cpu_s": tr.step * cfg.batch_size / max(tr.cpu_seconds, 1e-9), "final_loss": hist[-1]["loss"],
             "final_temperature": hist[-1]["temperature"], "loss_curve": [(m["step"], round(m["loss"], 4)) for m in hist]}
        r |= evaluate(T, tr.model.eval(), tr.tokenizer, args.cache, segs)
        if arm == "trained:cls_patch": res["cache_speed"] = cache_speed(tr, data)
        if variant == "cls_patch": models[arm] = (tr.model.eval(), tr.tokenizer)
        res["arms"][arm] = r
        rr, z, zc, s = r["retrieval"], r["zero_shot"], r["zero_shot_caption_names"], r["segmentation_96x128"]
        print(f"[{arm}] i2t R@1/5/10 {rr['i2t_r1']:.1f}/{rr['i2t_r5']:.1f}/{rr['i2t_r10']:.1f}  t2i {rr['t2i_r1']:.1f}/"
              f"{rr['t2i_r5']:.1f}/{rr['t2i_r10']:.1f}  zero-shot {z['top1']:.1f} (caption names {zc['top1']:.1f})  "
              f"mIoU 96x128 {s['miou']:.2f}, 192x256 {r['segmentation_192x256']['miou']:.2f}  pointing {s['pointing']['mean']:.1f}",
              flush=True)
        (out / "result.json").write_text(json.dumps(res, indent=1))
    seg = segs[("val", (96, 128))]
    res["segmentation_constant"] = {c: miou(torch.full_like(seg.masks, k), seg.masks)["miou"] * 100
                                    for c, k in (("sky", 0), ("building", 1), ("road", 3))}
    if models and args.save: res["maps_frame"] = maps_figure(T, models, segs[("val", (192, 256))], REPO / "data/runs/text_align_maps.png")
    (out / "result.json").write_text(json.dumps(res, indent=1))
    if args.save: (REPO / "data/runs/text_align_result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "arms"}, indent=1))


if __name__ == "__main__":
    main()
