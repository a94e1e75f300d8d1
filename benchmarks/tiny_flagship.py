"""The flagship recipe end to end, as a newcomer runs it: `dino-train` (the `tiny` recipe by default), timed from the
command to its report, then the dense evaluations of the trained teacher against random initialisation.

    .venv/bin/python benchmarks/tiny_flagship.py                       # train + evaluate (about 14 + 8 minutes)
    .venv/bin/python benchmarks/tiny_flagship.py --skip-train --out runs/tiny   # only the evaluations of a run

Measured (each for the trained teacher and for the same architecture at random initialisation, seed 0):
- weighted k-NN top-1 (k=20, T=0.07) on `imagenette2-128/val` at the recipe's `data.eval_size` (from `eval.json`,
  what `dino-train` writes) and at 64 px (the resolution of the older tiny results in LOG.md);
- CamVid val mIoU of the linear probe on frozen patch tokens (`dense.seg_eval` defaults, chapter 13);
- DAVIS J&F of label propagation on the shared sequences (`davis.davis_eval` defaults, chapter 15: DINO's 480 px short
  side), per sequence, beside the copy-the-first-mask baseline (the first frame's mask predicted for every frame), and
  again at `--davis-compare` px (default 320: the project's default before 2026-12-03, about 1/3 of the time).
Writes `<out>/flagship.json` and, with `--json`, a copy for the repository (data/runs/tiny_flagship.json).
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

import torch

from dino_from_scratch.config import override
from dino_from_scratch.eval import knn_eval, load_backbone, random_backbone
from dino_from_scratch.dense import seg_eval
from dino_from_scratch.davis import davis_eval, list_sequences, load_sequence, score_sequence, default_davis

ROOT = Path(__file__).resolve().parent.parent


def copy_first_mask(root=None) -> dict:
    "J&F per sequence when every frame is predicted as the first frame's mask: the floor a tracker must beat."
    out = {}
    for name in list_sequences(root):
        seq = load_sequence(root, name)
        out[name] = round(score_sequence(seq.masks, seq.masks[:1].expand_as(seq.masks).clone())["J&F"], 4)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--data", default=os.environ.get("DINO_DATA", str(ROOT.parent / "shared/data/imagenette2-128")))
    p.add_argument("--out", default="benchmarks/out/tiny_flagship")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="recipe overrides passed to dino-train")
    p.add_argument("--skip-train", action="store_true", help="only evaluate the run in --out")
    p.add_argument("--json", default=None, help="also write the result here (e.g. data/runs/tiny_flagship.json)")
    p.add_argument("--davis-compare", type=int, default=320, help="also DAVIS J&F at this short side (0: skip)")
    a = p.parse_args()
    out, res = Path(a.out), {"recipe": a.recipe, "overrides": a.set}
    if not a.skip_train:
        cmd = [str(Path(sys.executable).parent / "dino-train"), "--recipe", a.recipe, "--data", a.data, "--out", str(out),
               "--overwrite"] + (["--set", *a.set] if a.set else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        res["command_seconds"] = round(time.perf_counter() - t0, 1)     # cache + training + k-NN + report
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    res |= {"steps": rows[-1]["step"], "epochs": round(rows[-1]["epoch"], 2),
            "img_per_s_median": round(sorted(r["img_per_s"] for r in rows)[len(rows) // 2], 1),
            "final_loss": round(rows[-1]["loss"], 4), "teacher_entropy": round(rows[-1]["teacher_entropy"], 3)}
    ev = json.loads((out / "eval.json").read_text())
    res["knn"] = {"eval_size": ev["knn"]["eval_size"], "trained": round(ev["knn"]["top1"], 2),
                  "random_init": round(ev["knn_random_init"]["top1"], 2)}
    if (out / "knn_curve.json").exists(): res["knn_curve_2000"] = json.loads((out / "knn_curve.json").read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    model, recipe = load_backbone(out)
    rand = random_backbone(recipe)
    r64 = override(recipe, ["data.eval_size=64"])
    res["knn_64px"] = {"trained": round(knn_eval(model, r64, a.data, progress=False)["top1"], 2),
                       "random_init": round(knn_eval(rand, r64, a.data, progress=False)["top1"], 2)}
    print("k-NN", res["knn"], "at 64 px", res["knn_64px"], flush=True)
    seg = {n: seg_eval(m) for n, m in (("trained", model), ("random_init", rand))}
    res["camvid_miou"] = {n: round(100 * s["miou"], 2) for n, s in seg.items()}
    print("CamVid mIoU", res["camvid_miou"], flush=True)
    dv = {n: davis_eval(m) for n, m in (("trained", model), ("random_init", rand))}
    base = copy_first_mask()
    res["davis"] = {"J&F": {n: round(d["J&F"], 4) for n, d in dv.items()} | {"copy_first_mask": round(sum(base.values()) / len(base), 4)},
                    "per_sequence": {s: {"trained": dv["trained"]["per_sequence"][s]["J&F"],
                                         "random_init": dv["random_init"]["per_sequence"][s]["J&F"], "copy_first_mask": base[s]}
                                     for s in base}}
    print("DAVIS", json.dumps(res["davis"], indent=1), flush=True)
    if a.davis_compare:      # the same propagation at another short side (320 px: a 20x35 grid for patch 16)
        dvc = {n: davis_eval(m, size=a.davis_compare) for n, m in (("trained", model), ("random_init", rand))}
        res[f"davis_{a.davis_compare}px"] = {"J&F": {n: round(d["J&F"], 4) for n, d in dvc.items()},
                                            "per_sequence": {s: {n: d["per_sequence"][s]["J&F"] for n, d in dvc.items()} for s in base}}
        print(f"DAVIS at {a.davis_compare} px", res[f"davis_{a.davis_compare}px"], flush=True)
    (out / "flagship.json").write_text(json.dumps(res, indent=1))
    if a.json: Path(a.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
