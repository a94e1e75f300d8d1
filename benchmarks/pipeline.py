"""Images/s of the data pipeline alone and of full tiny_v1 / tiny_v2 train steps, today's PIL loader and defaults
against the uint8 cache + batched multi-crop (chapter 00, section 3), side by side in one run.

Arms (a backend, DataLoader workers, torch threads, CPU bf16 autocast); the first five change one thing at a time:
  today        PIL MultiCrop in 2 workers, 2 torch threads, fp32 (the tiny recipes' settings before issue 12)
  pil_1t       the same loader, 1 torch thread
  pil_1t_bf16  the same loader, 1 torch thread + bf16 autocast (settings only)
  new          batched in 1 worker, 1 torch thread, bf16 autocast
  b_1w_1t      batched in 1 worker, 1 torch thread, fp32
  model_only   one fixed in-memory batch (no data loading), 1 thread, bf16: the ceiling of the model step
  b_0w_2t, b_0w_2t_bf16  (not run by default) batched in the main process with 2 torch threads
The machine is shared, so absolute numbers move: every arm runs in short blocks that are interleaved (arm order
reversed every round), each block starting its own loader (workers included) and timing only after `--warmup`
steps, and the ratios compare medians over rounds. Each step is timed in parts with simple timers: data (waiting
for the next batch + moving it to the device), forward (teacher and student), backward, optimizer (AdamW step), EMA
(teacher update), other (loss, schedules, clipping: the rest).

    .venv/bin/python benchmarks/pipeline.py                        # both recipes, default arms
    .venv/bin/python benchmarks/pipeline.py --recipes tiny_v1 --arms today,new --rounds 3
    .venv/bin/python benchmarks/pipeline.py --data-only            # the data pipelines alone
    .venv/bin/python benchmarks/pipeline.py --extras compile,channels_last --recipes tiny_v1

Prints tables and writes one JSON (`--json`, default data/runs/pipeline_benchmark.json).
"""
import argparse, contextlib, json, os, platform, statistics, tempfile, time, warnings
from collections import defaultdict
from pathlib import Path

import torch

from dino_from_scratch.config import get_recipe, override
from dino_from_scratch.data import resolve_data, multicrop_data, crop_loader, CachedMultiCrop, ImageCache
from dino_from_scratch.cli import make_trainer
from dino_from_scratch.train import StepBatches
from dino_from_scratch import train as train_module

ARMS = {
    "today":        dict(backend="pil", workers=2, threads=2, bf16=False),
    "pil_1t":       dict(backend="pil", workers=2, threads=1, bf16=False),
    "pil_1t_bf16":  dict(backend="pil", workers=2, threads=1, bf16=True),
    "b_1w_1t":      dict(backend="batched", workers=1, threads=1, bf16=False),
    "new":          dict(backend="batched", workers=1, threads=1, bf16=True),
    "b_0w_2t":      dict(backend="batched", workers=0, threads=2, bf16=False),
    "b_0w_2t_bf16": dict(backend="batched", workers=0, threads=2, bf16=True),
    "model_only":   dict(backend=None, workers=0, threads=1, bf16=True),
}
PARTS = ("data", "forward", "backward", "optimizer", "ema", "other")


class Timers:
    "Wall-clock seconds per named part, accumulated by wrapping methods (CPU: no device synchronisation needed)."
    def __init__(self): self.t = defaultdict(float)
    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        try: yield
        finally: self.t[name] += time.perf_counter() - t0
    def wrap(self, obj, attr, name):
        f = getattr(obj, attr)
        def timed(*a, **k):
            with self(name): return f(*a, **k)
        setattr(obj, attr, timed)


TIMERS = Timers()
TIMERS.wrap(train_module, "ema_update", "ema")   # `Trainer.optimizer_step` calls the module-level function


def instrument(tr, timers=TIMERS):
    "Time the parts of `tr.train_step` without editing it: forward of teacher and student, backward, AdamW step (+ EMA above)."
    timers.wrap(tr.teacher, "forward", "forward")
    timers.wrap(tr.student_ddp, "forward", "forward")
    timers.wrap(tr, "backward", "backward")
    timers.wrap(tr.opt, "step", "optimizer")


def run_block(tr, arm, data, warmup, steps, timers, fixed=None):
    "`warmup` + `steps` train steps fed by `arm`; returns (images/s, seconds per step per part) over the timed steps."
    torch.set_num_threads(arm["threads"])
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if arm["bf16"] else contextlib.nullcontext()
    it = None
    if fixed is None:
        r = tr.recipe
        sampler = StepBatches(len(data), r.data.batch_size, seed=r.run.seed, start_step=tr.step)
        it = iter(crop_loader(data, sampler, arm["workers"]))
    n_img, t0 = 0, None
    for k in range(warmup + steps):
        if k == warmup: timers.t.clear(); t0 = time.perf_counter(); n_img = 0
        with timers("data"):
            crops = fixed if fixed is not None else [c.to(tr.acc.device) for c in next(it)[0]]
        with timers("step"), amp: tr.train_step(crops)
        n_img += crops[0].shape[0]
    dt = time.perf_counter() - t0
    del it                                   # shuts the workers down before the next arm runs
    t = dict(timers.t)
    parts = {p: t.get(p, 0.0) / steps for p in PARTS[:-1]}
    parts["other"] = max(0.0, t.get("step", 0.0) / steps - sum(parts[p] for p in PARTS[1:-1]))
    return n_img / dt, parts


def bench_recipe(name, ds, cache, arms, rounds, warmup, steps, extras, log):
    r = override(get_recipe(name), ["run.eval_at_end=false", "data.num_workers=0"])
    with tempfile.TemporaryDirectory() as out:
        torch.manual_seed(0)
        tr = make_trainer(r, out=out, dataset=ds, verbose=False)
        timers = TIMERS; instrument(tr)
        datas = {"pil": multicrop_data(ds, r.data.crops, seed=r.run.seed, verbose=False)}
        datas["batched"] = CachedMultiCrop(ds, r.data.crops, seed=r.run.seed, cache=cache)
        fixed = [c.to(tr.acc.device) for c in datas["batched"].__getitems__([(0, i) for i in range(r.data.batch_size)])[0]]
        res = defaultdict(list)
        for rnd in range(rounds):
            for a in (arms if rnd % 2 == 0 else arms[::-1]):
                ips, parts = run_block(tr, ARMS[a], datas.get(ARMS[a]["backend"]), warmup, steps, timers,
                                       fixed if ARMS[a]["backend"] is None else None)
                res[a].append((ips, parts, os.getloadavg()[0]))
                log(f"  {name} round {rnd + 1} {a:13s} {ips:7.1f} img/s  " + " ".join(f"{p} {1e3 * v:.0f}" for p, v in parts.items()) + " ms/step")
        out_rows = {}
        for a, runs in res.items():
            med = statistics.median(x[0] for x in runs)
            out_rows[a] = {"img_per_s": round(med, 1), "all_img_per_s": [round(x[0], 1) for x in runs],
                           "load_avg": [round(x[2], 1) for x in runs], **ARMS[a],
                           "ms_per_step": {p: round(1e3 * statistics.median(x[1][p] for x in runs), 1) for p in PARTS}}
        if "today" in res:   # ratios within each round (the two blocks ran minutes apart at most), then their median
            for a, row in out_rows.items():
                row["x_today_paired"] = round(statistics.median(x[0] / t[0] for x, t in zip(res[a], res["today"])), 2)
        extra_rows = bench_extras(tr, fixed, extras, warmup, steps, timers, log, rounds) if extras else {}
    return {"arms": out_rows, "batch_size": r.data.batch_size, "extras": extra_rows}


def bench_extras(tr, fixed, extras, warmup, steps, timers, log, rounds=3):
    """Model-side levers on one fixed in-memory batch, 1 torch thread, interleaved like the arms: fp32 vs bf16
    autocast, channels-last input, `torch.compile` of both backbones (compiled once up front; the eager and compiled
    callables are swapped between blocks, so all variants share the weights and the rounds)."""
    variants = {"eager_fp32": (False, False, False), "eager_bf16": (True, False, False)}
    if "channels_last" in extras: variants["channels_last_bf16"] = (True, True, False)
    rows, backbones = {}, (tr.student.backbone, tr.teacher.backbone)
    if "compile" in extras:
        variants |= {"compiled_fp32": (False, False, True), "compiled_bf16": (True, False, True)}
        t0 = time.perf_counter()
        for m in backbones: m.compile()
        for bf16 in (True, False):      # compile for both dtypes and both crop sizes, forward and backward
            run_block(tr, dict(backend=None, workers=0, threads=1, bf16=bf16), None, 2, 1, timers, fixed)
        rows["compile_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  compiled in {rows['compile_seconds']} s (two dtypes)")
    compiled = [m._compiled_call_impl for m in backbones]
    cl = [c.contiguous(memory_format=torch.channels_last) for c in fixed]
    res = defaultdict(list)
    for rnd in range(rounds):
        for v in (list(variants) if rnd % 2 == 0 else list(variants)[::-1]):
            bf16, channels_last, comp = variants[v]
            for m, c in zip(backbones, compiled): m._compiled_call_impl = c if comp else None
            res[v].append(run_block(tr, dict(backend=None, workers=0, threads=1, bf16=bf16), None, warmup, steps, timers,
                                    cl if channels_last else fixed)[0])
            log(f"  extras round {rnd + 1} {v:18s} {res[v][-1]:6.1f} img/s")
    for m in backbones: m._compiled_call_impl = None
    for v, r in res.items():
        rows[v] = round(statistics.median(r), 1)
        rows[v + "_x_eager_fp32"] = round(statistics.median(a / b for a, b in zip(r, res["eager_fp32"])), 2)
    log("  extras: " + ", ".join(f"{k} {v}" for k, v in rows.items()))
    return rows


def bench_data_only(ds, cache, recipe, rounds, batches, log):
    "Images/s of the loaders alone: PIL in 2 workers (today) against batched in the main process (1 thread) and in 1 worker."
    r = get_recipe(recipe)
    arms = {"pil_2w": ("pil", 2, 1), "batched_0w_1t": ("batched", 0, 1), "batched_1w": ("batched", 1, 1)}
    datas = {"pil": multicrop_data(ds, r.data.crops, seed=0, verbose=False), "batched": CachedMultiCrop(ds, r.data.crops, cache=cache)}
    res = defaultdict(list)
    for rnd in range(rounds):
        for a in (list(arms) if rnd % 2 == 0 else list(arms)[::-1]):
            backend, nw, threads = arms[a]
            torch.set_num_threads(threads)
            it = iter(crop_loader(datas[backend], StepBatches(len(ds), r.data.batch_size, start_step=100 * rnd), nw))
            for _ in range(max(2, 2 * nw)): next(it)                       # workers started and their queues filled once
            t0, n = time.perf_counter(), 0
            for _ in range(batches): n += next(it)[0][0].shape[0]
            res[a].append(n / (time.perf_counter() - t0)); del it
            log(f"  data-only round {rnd + 1} {a:14s} {res[a][-1]:7.1f} img/s")
    return {a: {"img_per_s": round(statistics.median(v), 1), "all": [round(x, 1) for x in v]} for a, v in res.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="tiny_v1,tiny_v2")
    p.add_argument("--arms", default="today,pil_1t,pil_1t_bf16,new,b_1w_1t,model_only")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (blocks per arm)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each block (worker start-up, queue fill)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per block")
    p.add_argument("--data-only", action="store_true", help="only the data pipelines, no train steps")
    p.add_argument("--data-batches", type=int, default=12)
    p.add_argument("--no-data-only", action="store_true", help="skip the data-pipeline-alone measurement")
    p.add_argument("--extras", default="", help="comma list: channels_last, compile (model-side levers on a fixed batch)")
    p.add_argument("--data", default=os.environ.get("DINO_DATA"))
    p.add_argument("--json", default=str(Path(__file__).resolve().parent.parent / "data/runs/pipeline_benchmark.json"))
    a = p.parse_args()
    warnings.filterwarnings("ignore", message=".*skipping unreadable image.*")
    log = lambda s: print(s, flush=True)
    ds, where = resolve_data(a.data, "train", verbose=False)
    log(f"data: {where} ({len(ds):,} images); torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    t_start = time.perf_counter()
    cache = ImageCache(ds.sources)              # decoded once, shared by every batched arm
    cache_s = round(time.perf_counter() - t_start, 1)
    log(f"uint8 cache built in {cache_s} s")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "load_before": round(os.getloadavg()[0], 2),
              "settings": {k: v for k, v in vars(a).items() if k != "json"}, "cache_build_s": cache_s}
    if not a.no_data_only:
        result["data_only"] = d = bench_data_only(ds, cache, a.recipes.split(",")[0], a.rounds, a.data_batches, log)
        log(f"data pipeline alone: batched (main process, 1 thread) / PIL (2 workers) = "
            f"{d['batched_0w_1t']['img_per_s'] / d['pil_2w']['img_per_s']:.2f}x")
    if not a.data_only:
        arms = a.arms.split(",")
        for name in a.recipes.split(","):
            result[name] = bench_recipe(name, ds, cache, arms, a.rounds, a.warmup, a.steps, [e for e in a.extras.split(",") if e], log)
            rows = result[name]["arms"]
            ref = rows.get("today", {}).get("img_per_s")
            log(f"\n{name} (batch {result[name]['batch_size']}; medians of {a.rounds} interleaved blocks of {a.steps} steps)")
            log(f"{'arm':14s} {'img/s':>7s} {'x today':>8s} {'paired':>7s}  " + " ".join(f"{p:>9s}" for p in PARTS) + "  (ms per step)")
            for arm, row in rows.items():
                log(f"{arm:14s} {row['img_per_s']:7.1f} {row['img_per_s'] / ref if ref else float('nan'):7.2f}x "
                    f"{row.get('x_today_paired', float('nan')):6.2f}x  " + " ".join(f"{row['ms_per_step'][p]:9.1f}" for p in PARTS))
    result["load_after"] = round(os.getloadavg()[0], 2)
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    log(f"wrote {a.json} ({result['wall_seconds']} s)")


if __name__ == "__main__":
    main()
