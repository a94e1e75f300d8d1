"""Run several `tiny_v1_knn.py` proxies side by side (a hyper-parameter sweep) and collect their results.

Each line of the plan file is `NAME [--recipe R] FIELD=VALUE ...`; blank lines and `#` comments are skipped.
Every run trains for the fixed number of epochs its overrides give (pass `optim.epochs=N`), so results do not
depend on the machine's speed and a sweep on a many-core GPU machine ranks configurations for the 2-core CPU
budget (convert with each configuration's CPU images/s, measured separately). Results are appended, one JSON
line per run, to `<out>/sweep.jsonl`.

    python benchmarks/sweep.py plan.txt --data DIR --parallel 6 --threads 2 --out benchmarks/out/sweep
"""
import argparse, json, os, shlex, subprocess, sys, time
from pathlib import Path


def parse_plan(text: str) -> list[tuple[str, list[str]]]:
    runs = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line: continue
        name, *args = shlex.split(line)
        runs.append((name, args))
    names = [n for n, _ in runs]
    if len(set(names)) != len(names): raise ValueError(f"duplicate run names in the plan: {names}")
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plan")
    p.add_argument("--data", default=os.environ.get("DINO_DATA", "../shared/data/imagenette2-128"))
    p.add_argument("--out", default="benchmarks/out/sweep")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    a = p.parse_args()
    runs, out = parse_plan(Path(a.plan).read_text()), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONUNBUFFERED="1")
    todo, live = list(runs), []
    while todo or live:
        while todo and len(live) < a.parallel:
            name, args = todo.pop(0)
            recipe = []
            if "--recipe" in args:
                i = args.index("--recipe"); recipe = args[i:i + 2]; args = args[:i] + args[i + 2:]
            cmd = [sys.executable, str(Path(__file__).parent / "tiny_v1_knn.py"), "--minutes", "1000", *recipe,
                   "--data", a.data, "--out", str(out / name), "--set", *args]
            log = open(out / f"{name}.log", "w")
            live.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
        time.sleep(2)
        for item in list(live):
            name, proc, t0 = item
            if proc.poll() is None: continue
            live.remove(item)
            res_file = out / name / "result.json"
            res = json.loads(res_file.read_text()) if proc.returncode == 0 and res_file.exists() else {"error": proc.returncode}
            res.update(name=name, wall_s=round(time.time() - t0, 1))
            with open(out / "sweep.jsonl", "a") as f: f.write(json.dumps(res) + "\n")
            print(f"{name:24s} knn {res.get('knn_top1')} random {res.get('knn_top1_random_init')} "
                  f"gain {res.get('gain_points')} ({res['wall_s']} s)", flush=True)


if __name__ == "__main__":
    main()
