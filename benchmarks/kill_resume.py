"""Kill a tiny `dino-train` run with SIGKILL at random moments (some while a checkpoint is being written), resume it
each time with `--resume`, and compare the final weights with an uninterrupted run of the same recipe: they must be
bit-identical. Prints one line per kill and a JSON summary line.

    .venv/bin/python benchmarks/kill_resume.py                       # 10 kills
    .venv/bin/python benchmarks/kill_resume.py --kills 3 --steps 12  # the short version the tests run

Kill moments: kill k waits until step (k + 1) * steps / (kills + 1) is logged, then either (every other kill) waits
for a checkpoint's temporary file (`*.tmp`) to appear and kills at once (a kill during a save; whether it really
landed inside the write is measured: the `.tmp` is still there after the kill), or kills after a random delay of up
to 0.3 s (about one step of the tiny model on one CPU thread).
"""
from __future__ import annotations
import argparse, json, os, random, signal, subprocess, sys, tempfile, time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SMALL = ["data.batch_size=8", "data.num_workers=0", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
         "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "run.log_every=1", "run.ckpt_every=1",
         "data.crops.n_local=2", "run.keep_checkpoints=2"]


def small_folder(dest: Path, shared: Path) -> Path:
    "dest/train/<class>/ with symlinks to 8 images of 2 classes of imagenette2-128 (16 images: 2 steps per epoch)."
    src = shared / "imagenette2-128" / "train"
    for c in sorted(p for p in src.iterdir() if p.is_dir())[:2]:
        (dest / "train" / c.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(c.iterdir())[:8]: (dest / "train" / c.name / f.name).symlink_to(f)
    return dest


def command(data: Path, out: Path, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "dino_from_scratch.cli", "--recipe", "tiny_v1", "--data", str(data), "--out", str(out),
            "--no-eval", "--set", *SMALL, f"optim.epochs={steps // 2}"] + (["--resume"] if resume else [])


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{e['PYTHONPATH']}" if e.get("PYTHONPATH") else str(REPO)
    return e


def final_tensors(out: Path, steps: int) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "checkpoints" / f"step_{steps:07d}.safetensors"))


def n_logged(out: Path) -> int:
    try: return len((out / "metrics.jsonl").read_text().splitlines())
    except OSError: return 0


def run(kills: int = 10, steps: int = 24, seed: int = 0, shared: Path | None = None, work: Path | None = None,
        verbose: bool = True) -> dict:
    shared = Path(shared or os.environ.get("DINO_SHARED", REPO.parent / "shared" / "data"))
    if not (shared / "imagenette2-128").is_dir(): shared = Path("/work/shared/data")
    work = Path(work or tempfile.mkdtemp(prefix="kill_resume_"))
    data = small_folder(work / "data", shared)
    rng = random.Random(seed)
    say = print if verbose else (lambda *a, **k: None)

    t0 = time.perf_counter()                                          # the uninterrupted reference run
    p = subprocess.run(command(data, work / "straight", steps, False), capture_output=True, text=True, env=env())
    if p.returncode != 0: raise RuntimeError(f"reference run failed:\n{p.stderr[-3000:]}")
    ref_seconds = time.perf_counter() - t0
    ref = final_tensors(work / "straight", steps)

    out, log, resume = work / "killed", [], False
    while True:
        proc = subprocess.Popen(command(data, out, steps, resume), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env())
        k = len(log)
        if k < kills:
            mode = "save" if k % 2 == 0 else "random"
            # the kills are spread over the run: kill k waits for at least step (k + 1) * steps / (kills + 1) to be logged
            target = max(n_logged(out) + 1, int((k + 1) * steps / (kills + 1)))
            while proc.poll() is None and n_logged(out) < target: time.sleep(0.002)
            if mode == "random": time.sleep(rng.uniform(0, 0.3))   # within about one step of the target
            else:
                while proc.poll() is None:
                    d = out / "checkpoints"
                    if d.is_dir() and any(n.endswith(".tmp") for n in os.listdir(d)): break
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL); proc.wait()
                d = out / "checkpoints"
                ck = sorted(d.glob("step_*.safetensors")) if d.is_dir() else []
                tmp = sorted(p.name for p in d.glob("*.tmp")) if d.is_dir() else []
                rec = {"kill": k + 1, "mode": mode, "newest_checkpoint": ck[-1].name if ck else None,
                       "tmp_left": tmp, "lines_logged": n_logged(out)}
                log.append(rec)
                say(f"kill {k + 1:2d} ({mode:6s}): {rec['lines_logged']} steps logged, newest checkpoint "
                    f"{rec['newest_checkpoint']}, temporary files left {tmp or '-'}")
                resume = True
                continue
            say(f"the run finished before kill {k + 1}")
        proc.communicate(timeout=600)
        if proc.returncode != 0: raise RuntimeError(f"resumed run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        break

    got = final_tensors(out, steps)
    differ = sorted(k for k in ref if k not in got or not torch.equal(ref[k], got[k]))
    steps_logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {"kills": len(log), "during_save": sum(bool(r["tmp_left"]) for r in log), "steps": steps,
               "bit_identical": not differ and ref.keys() == got.keys(), "tensors_differ": differ[:5],
               "metrics_steps_ok": steps_logged == list(range(1, steps + 1)), "reference_seconds": round(ref_seconds, 1),
               "work": str(work), "log": log}
    say(json.dumps({k: v for k, v in summary.items() if k != "log"}))
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=24, help="steps of the tiny run (even: 2 steps per epoch)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s = run(a.kills, a.steps, a.seed)
    sys.exit(0 if s["bit_identical"] and s["metrics_steps_ok"] else 1)
