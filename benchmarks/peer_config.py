"""Our trainer at the established library's DINO configuration (issue 12): images/s, and the accuracy effect of bf16.

The configuration (the peer's DINO example): ViT-tiny/8 (width 192, depth 12, 3 heads, patch 8) at 64 px, 32 px local
crops, 4,096 prototypes, batch 64, 2 global + 6 local crops, DINOv1's objective (`tiny_v1`'s recipe otherwise). The
peer ran it at 14.06 images/s on this CPU (issue 12, fp32); that number is context, printed beside ours, not measured
here. Arms, each a whole `dino-train` process (benchmarks/throughput.py's `run_arm`), interleaved over rounds:

  before   the old defaults: PIL multi-crop in 2 loader workers, 2 torch threads, fp32
  fp32     the batched pipeline (chapter 00), 1 loader worker, threads chosen by the trainer, fp32
  auto     the same with `run.mixed_precision=auto`: bf16 autocast where `data.cpu_plan` says it pays (width >= 64
           on a CPU with native bf16), and every core as torch threads (width >= 192: this configuration)

`--accuracy-steps N` then trains the fp32 and the bf16 arm for N steps each from the same seed and prints the k-NN
top-1 (64 px) of both teachers and the largest difference between their logged losses: the accuracy effect of the
precision change at this configuration.

    .venv/bin/python benchmarks/peer_config.py --rounds 2 --steps 40
    .venv/bin/python benchmarks/peer_config.py --rounds 0 --accuracy-steps 300
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput                                                       # noqa: E402  (its run_arm and ARMS)

ROOT = Path(__file__).resolve().parent.parent
PEER = ["model.embed_dim=192", "model.depth=12", "model.num_heads=3", "model.patch_size=8", "head.out_dim=4096",
        "data.batch_size=64", "data.crops.n_local=6"]
PEER_IMG_PER_S = 14.06   # the peer library on this CPU, fp32 (issue 12)
ARMS = {"before": throughput.ARMS["before"] + PEER + ["run.mixed_precision=no"],
        "fp32": throughput.ARMS["batched_1p"] + PEER + ["run.mixed_precision=no"],
        "auto": throughput.ARMS["batched_1p"] + PEER + ["run.mixed_precision=auto"]}


def knn_of(out: Path, data: str) -> float:
    from dino_from_scratch.config import override
    from dino_from_scratch.eval import knn_eval, load_backbone
    model, recipe = load_backbone(out)
    return knn_eval(model, override(recipe, ["data.eval_size=64"]), data, progress=False)["top1"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default="before,fp32,auto")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=10, help="steps excluded from the rate (start-up)")
    p.add_argument("--accuracy-steps", type=int, default=0, help="train fp32 and bf16 this many steps each, then k-NN")
    p.add_argument("--data", default=os.environ.get("DINO_DATA", str(ROOT.parent / "shared/data/imagenette2-128")))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    throughput.ARMS.update({f"peer_{k}": v for k, v in ARMS.items()})
    arms, res = a.arms.split(","), {"peer_img_per_s": PEER_IMG_PER_S}
    with tempfile.TemporaryDirectory() as tmp:
        rates = {arm: [] for arm in arms}
        for r in range(a.rounds):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                rates[arm].append(throughput.run_arm("tiny_v1", f"peer_{arm}", a.steps, a.skip, a.data, Path(tmp)))
                print(f"round {r} {arm:8s} {rates[arm][-1]:7.2f} img/s", flush=True)
        if a.rounds:
            res["throughput"] = {arm: {"img_per_s": round(statistics.median(v), 2), "x_peer": round(statistics.median(v) / PEER_IMG_PER_S, 2),
                                       "rounds": [round(x, 2) for x in v]} for arm, v in rates.items()}
            print(f"\n{'arm':8s} {'img/s':>7s} {'x peer (14.06)':>14s}")
            for arm, v in res["throughput"].items(): print(f"{arm:8s} {v['img_per_s']:7.2f} {v['x_peer']:14.2f}")
        if a.accuracy_steps:
            acc = {}
            for arm, prec in (("fp32", "no"), ("bf16", "bf16")):
                out = Path(tmp) / f"acc_{arm}"
                cmd = [str(Path(sys.executable).parent / "dino-train"), "--recipe", "tiny_v1", "--data", a.data, "--out", str(out),
                       "--overwrite", "--max-steps", str(a.accuracy_steps), "--no-eval", "--set", *ARMS["fp32"][:-1],
                       f"run.mixed_precision={prec}", "run.log_every=10", f"run.ckpt_every={a.accuracy_steps}"]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
                acc[arm] = {"seconds": round(time.perf_counter() - t0, 1), "knn_64px": round(knn_of(out, a.data), 2),
                            "losses": [round(r["loss"], 4) for r in rows]}
                print(arm, acc[arm]["knn_64px"], acc[arm]["seconds"], "s", flush=True)
            diff = max(abs(x - y) for x, y in zip(acc["fp32"]["losses"], acc["bf16"]["losses"]))
            res["accuracy"] = {"steps": a.accuracy_steps, "max_abs_loss_difference": round(diff, 4)} | {
                k: {kk: vv for kk, vv in v.items() if kk != "losses"} | {"final_loss": v["losses"][-1]} for k, v in acc.items()}
            print(json.dumps(res["accuracy"]))
    print(json.dumps(res))
    if a.json: Path(a.json).write_text(json.dumps({"cpus": os.cpu_count(), **res}, indent=1))


if __name__ == "__main__":
    main()
