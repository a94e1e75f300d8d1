"""Images/s of whole `dino-train` runs, as a user starts them, for several settings side by side in one run.

Each arm is `dino-train --recipe R --max-steps N --no-eval --set ...` in a fresh process (its own cache, loader
workers and, for `run.processes=2`, its own `accelerate launch`); images/s is the median of the logged rates after
the first `--skip` steps (start-up excluded). Arms run in interleaved rounds (order reversed every round) so that a
change in the machine's load hits every arm alike; the ratios compare medians over rounds.

    .venv/bin/python benchmarks/throughput.py                         # tiny_v1 and tiny_v2: before vs after issue 12
    .venv/bin/python benchmarks/throughput.py --recipes tiny --arms batched_1p,head512 --arm head512=batched_1p:head.hidden_dim=512

Arms (fields set on top of the recipe):
  before        the tiny recipes' settings before issue 12: PIL multi-crop in 2 loader workers, 2 torch threads, fp32
  batched_1p    the batched pipeline (chapter 00) in 1 worker, threads and CPU bf16 autocast chosen by the trainer
                (`run.mixed_precision=auto`: 1 thread and bf16 on this 2-core AMX CPU), 1 process
  batched_1p_fp32  the same in fp32 (what the bf16 autocast adds)
  batched_2p    the same in 2 data-parallel processes (gloo) with 1 thread each, the global batch unchanged
  batched_2p_0w the same without loader workers (each process crops its own batch)
"""
import argparse, json, os, statistics, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "before":        ["data.crops.backend=pil", "data.num_workers=2", "run.threads=2", "run.processes=1", "run.mixed_precision=no"],
    "batched_1p":    ["data.crops.backend=batched", "data.num_workers=1", "run.processes=1"],
    "batched_1p_fp32": ["data.crops.backend=batched", "data.num_workers=1", "run.processes=1", "run.mixed_precision=no"],
    "batched_2p":    ["data.crops.backend=batched", "data.num_workers=1", "run.processes=2", "HALF_BATCH"],
    "batched_2p_0w": ["data.crops.backend=batched", "data.num_workers=0", "run.processes=2", "HALF_BATCH"],
}


def run_arm(recipe: str, arm: str, steps: int, skip: int, data: str, tmp: Path) -> float:
    from dino_from_scratch.config import get_recipe
    sets = [s for s in ARMS[arm] if s != "HALF_BATCH"]
    if "HALF_BATCH" in ARMS[arm]: sets.append(f"data.batch_size={get_recipe(recipe).data.batch_size // 2}")
    out = tmp / f"{recipe}_{arm}"
    cmd = [str(Path(sys.executable).parent / "dino-train"), "--recipe", recipe, "--data", data, "--out", str(out), "--overwrite",
           "--max-steps", str(steps), "--no-eval", "--set", *sets, "run.log_every=5", f"run.ckpt_every={10 * steps}"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} | {"TQDM_DISABLE": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    return statistics.median(r["img_per_s"] for r in rows if r["step"] > skip)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="tiny_v1,tiny_v2")
    p.add_argument("--arms", default="before,batched_1p,batched_2p,batched_2p_0w")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=15, help="steps excluded from the rate (start-up)")
    p.add_argument("--data", default=os.environ.get("DINO_DATA", str(ROOT.parent / "shared/data/imagenette2-128")))
    p.add_argument("--arm", action="append", default=[], metavar="NAME=BASE:FIELD=VALUE,...",
                   help="an extra arm: a base arm plus recipe fields, e.g. head512=batched_1p:head.hidden_dim=512")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    for spec in a.arm:
        name, rest = spec.split("=", 1)
        base, _, fields = rest.partition(":")
        ARMS[name] = ARMS[base] + [f for f in fields.split(",") if f]
    arms, res = a.arms.split(","), {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in a.recipes.split(","):
            rates = {arm: [] for arm in arms}
            for r in range(a.rounds):
                for arm in (arms if r % 2 == 0 else arms[::-1]):
                    rates[arm].append(run_arm(recipe, arm, a.steps, a.skip, a.data, Path(tmp)))
                    print(f"{recipe:8s} round {r} {arm:14s} {rates[arm][-1]:7.1f} img/s", flush=True)
            med = {arm: statistics.median(v) for arm, v in rates.items()}
            ref = med.get("before", next(iter(med.values())))
            res[recipe] = {arm: {"img_per_s": round(m, 1), "ratio": round(m / ref, 2), "rounds": [round(x, 1) for x in rates[arm]]}
                           for arm, m in med.items()}
    print(f"\n{'recipe':8s} {'arm':14s} {'img/s':>7s} {'x before':>8s}")
    for recipe, rows in res.items():
        for arm, v in rows.items(): print(f"{recipe:8s} {arm:14s} {v['img_per_s']:7.1f} {v['ratio']:8.2f}")
    print(json.dumps(res))
    if a.json: Path(a.json).write_text(json.dumps({"cpus": os.cpu_count(), **res}, indent=1))


if __name__ == "__main__":
    main()
