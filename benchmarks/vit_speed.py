"""Forward+backward speed of our ViT-S/16 against timm's `VisionTransformer` with the same configuration.

Purpose: check that `dino_from_scratch.vit` costs no more than the reference implementation (goal: ours/timm <= 1.0).

Before timing it proves the comparison is apples to apples:
  * both models have the same parameter count (asserted);
  * both call `F.scaled_dot_product_attention` once per block (timm's `fused_attn` is forced True; calls are counted);
  * after copying our weights into timm (explicit key mapping, strict load) the CLS outputs agree within 1e-4
    at 224 px in float32 (the max abs diff is printed).

Timing: one step = forward, loss = out.float().pow(2).mean(), backward, zero grads (set_to_none), with
torch.cuda.synchronize on CUDA. The machine may be shared with other jobs, so the two models are measured
interleaved step by step: for each of --rounds rounds, each model runs --warmup untimed steps, then --steps timed
pairs in which the two models run back to back in alternating (ABBA) order, so both see the same load. Reported:
median ms per step over all timed steps (and the per-round medians), images/s, the ratio ours/timm of the medians,
the median of the per-pair ratios, the ratio of the fastest steps, and the ratio of median process CPU time per step (time.process_time, all
threads: less sensitive to being descheduled by other jobs, still sensitive to cache/memory contention).

Configurations: fp32 at each --batch on every device; on CUDA also bf16 autocast at --bf16-batch (default 128).

Command line (from the repository root):

    .venv/bin/python benchmarks/vit_speed.py

Options: --device auto|cpu|cuda, --batch 16 (comma-separated list allowed, e.g. 8,16), --img-size 224,
--steps 5, --warmup 2, --rounds 3, --bf16-batch 128, --threads N, --json PATH, --profile [--profile-steps 3]
(torch.profiler op comparison of the two models, CPU activities, printed after the timings).

The last line on stdout is the results as one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, if not installed

import torch
import torch.nn.functional as F
import timm
from timm.models.vision_transformer import VisionTransformer as TimmViT

from dino_from_scratch.vit import vit_small, VisionTransformer, ViTConfig, n_params  # noqa: F401

TOL = 1e-4


# ----------------------------------------------------------------------------------------------------------- models
def make_ours(img_size: int) -> VisionTransformer:
    return vit_small(16, drop_path_rate=0.0, img_size=img_size)


def make_timm(img_size: int) -> TimmViT:
    m = TimmViT(img_size=img_size, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
                num_classes=0, global_pool="token", drop_path_rate=0.0, class_token=True, dynamic_img_size=False)
    n_fused = 0
    for mod in m.modules():  # timm decides at construction via timm.layers.use_fused_attn(); force the SDPA path
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = True
            n_fused += 1
    assert n_fused == 12, f"expected 12 timm Attention modules with fused_attn, found {n_fused}"
    return m


def key_map(depth: int = 12) -> dict[str, str]:
    "Our state_dict key -> timm's. For the plain ViT the names coincide; written out so a divergence is caught."
    m = {k: k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                        "norm.weight", "norm.bias")}
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                m[f"blocks.{i}.{sub}.{p}"] = f"blocks.{i}.{sub}.{p}"
    return m


@torch.no_grad()
def copy_ours_into_timm(ours: torch.nn.Module, tm: torch.nn.Module) -> None:
    src, dst = ours.state_dict(), tm.state_dict()
    km = key_map(len(ours.blocks))
    assert set(km) == set(src), f"our keys differ from the mapping: {sorted(set(km) ^ set(src))}"
    assert set(km.values()) == set(dst), f"timm keys differ from the mapping: {sorted(set(km.values()) ^ set(dst))}"
    new = {}
    for k_ours, k_timm in km.items():
        assert src[k_ours].shape == dst[k_timm].shape, f"{k_ours} {tuple(src[k_ours].shape)} vs {k_timm} {tuple(dst[k_timm].shape)}"
        new[k_timm] = src[k_ours].clone()
    tm.load_state_dict(new, strict=True)


@contextlib.contextmanager
def count_sdpa():
    "Count calls of F.scaled_dot_product_attention (both models look it up on torch.nn.functional at call time)."
    orig, counter = F.scaled_dot_product_attention, {"n": 0}
    def wrapped(*a, **k):
        counter["n"] += 1
        return orig(*a, **k)
    F.scaled_dot_product_attention = wrapped
    try:
        yield counter
    finally:
        F.scaled_dot_product_attention = orig


def verify(ours, tm, device, img_size) -> float:
    "Same parameter count, SDPA used by both, outputs equal within TOL after the weight copy. Returns max abs diff."
    po, pt = n_params(ours), n_params(tm)
    assert po == pt, f"parameter count differs: ours {po:,} vs timm {pt:,}"
    copy_ours_into_timm(ours, tm)
    ours.eval(); tm.eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact fp32 for the check
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, img_size, img_size, generator=g).to(device)
        with torch.no_grad():
            with count_sdpa() as c_ours: yo = ours(x)
            with count_sdpa() as c_timm: yt = tm(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert c_ours["n"] == 12, f"our model called F.scaled_dot_product_attention {c_ours['n']} times, expected 12"
    assert c_timm["n"] == 12, f"timm called F.scaled_dot_product_attention {c_timm['n']} times, expected 12"
    assert yo.shape == yt.shape == (2, 384), f"output shapes {tuple(yo.shape)} vs {tuple(yt.shape)}"
    diff = (yo - yt).abs().max().item()
    assert diff <= TOL, f"outputs differ: max abs diff {diff:.3e} > {TOL:g}"
    ours.train(); tm.train()
    return diff


# ----------------------------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def step(model, x, amp_dtype):
    ctx = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with ctx:
        out = model(x)
    loss = out.float().pow(2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def timed_steps(model, x, amp_dtype, n, cpu_times: list | None = None) -> list[float]:
    "Wall ms of each of `n` steps; if `cpu_times` is given, append this process's CPU ms (all threads) per step."
    dev, times = x.device, []
    for _ in range(n):
        sync(dev); t0, c0 = time.perf_counter(), time.process_time()
        step(model, x, amp_dtype)
        sync(dev); times.append((time.perf_counter() - t0) * 1e3)
        if cpu_times is not None: cpu_times.append((time.process_time() - c0) * 1e3)
    return times


def bench_config(models: dict, device, batch, img_size, amp_dtype, steps, warmup, rounds) -> dict:
    """Per round: `warmup` untimed steps per model, then `steps` timed pairs. Within a pair the two models run
    back to back, in ABBA order (ours,timm / timm,ours / ...), so both see the same background load; the
    starting order also flips between rounds."""
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1)).to(device)
    names = list(models)
    all_t = {n: [] for n in names}
    round_med = {n: [] for n in names}
    pair_ratio = []
    cpu_t = {n: [] for n in names}  # process CPU ms per step: a second, less scheduling-sensitive view on CPU
    k = 0
    for r in range(rounds):
        for i in range(warmup):
            for n in (names if (r + i) % 2 == 0 else names[::-1]): timed_steps(models[n], x, amp_dtype, 1)
        rt = {n: [] for n in names}
        for _ in range(steps):
            for n in (names if k % 2 == 0 else names[::-1]): rt[n] += timed_steps(models[n], x, amp_dtype, 1, cpu_t[n])
            pair_ratio.append(rt["ours"][-1] / rt["timm"][-1])
            k += 1
        for n in names:
            all_t[n] += rt[n]
            round_med[n].append(statistics.median(rt[n]))
        print(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n} {round_med[n][-1]:8.1f} ms" for n in names)
              + f"  ratio {round_med['ours'][-1] / round_med['timm'][-1]:.3f}", flush=True)
    med = {n: statistics.median(all_t[n]) for n in names}
    res = {"dtype": "bf16-autocast" if amp_dtype is not None else "fp32", "batch": batch, "img_size": img_size}
    for n in names:
        res[f"{n}_ms"] = round(med[n], 3)
        res[f"{n}_img_s"] = round(batch / med[n] * 1e3, 2)
        res[f"{n}_round_ms"] = [round(v, 3) for v in round_med[n]]
        res[f"{n}_min_ms"] = round(min(all_t[n]), 3)
        res[f"{n}_cpu_ms"] = round(statistics.median(cpu_t[n]), 3)
    res["ratio"] = round(med["ours"] / med["timm"], 4)                     # ratio of the medians (headline)
    res["ratio_paired_median"] = round(statistics.median(pair_ratio), 4)   # median of back-to-back pair ratios
    res["ratio_min"] = round(res["ours_min_ms"] / res["timm_min_ms"], 4)         # best step vs best step
    res["ratio_cpu_time"] = round(res["ours_cpu_ms"] / res["timm_cpu_ms"], 4)  # ratio of median process CPU ms
    res["ratio_per_round"] = [round(a / b, 4) for a, b in zip(round_med["ours"], round_med["timm"])]
    return res


# ----------------------------------------------------------------------------------------------------------- profile
def profile(models: dict, device, batch, img_size, steps=3, top=25):
    """torch.profiler (CPU activities) over `steps` fwd+bwd steps per model, profiled one step at a time and
    interleaved (ABBA) like the timing so both see the same load. Prints, per model, the top ops by self CPU time,
    then every op whose time or call count differs, largest |ours - timm| first."""
    from torch.profiler import profile as tprofile, ProfilerActivity
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(2)).to(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    names = list(models)
    per = {n: {} for n in names}   # op -> [self CPU ms summed over steps, calls summed over steps]
    wall = {n: [] for n in names}
    for n in names: timed_steps(models[n], x, None, 1)
    for i in range(steps):
        for n in (names if i % 2 == 0 else names[::-1]):
            with tprofile(activities=acts) as prof:
                sync(device); t0 = time.perf_counter()
                step(models[n], x, None)
                sync(device); wall[n].append((time.perf_counter() - t0) * 1e3)
            for e in prof.key_averages():
                acc = per[n].setdefault(e.key, [0.0, 0])
                acc[0] += e.self_cpu_time_total / 1e3; acc[1] += e.count
    per = {n: {k: (v[0] / steps, v[1] // steps) for k, v in d.items()} for n, d in per.items()}
    for n in names:
        tot = sum(v[0] for v in per[n].values())
        print(f"\n=== profile: {n} (batch {batch}, {steps} steps; per step: wall median {statistics.median(wall[n]):.1f} ms, "
              f"self CPU total {tot:.1f} ms) ===")
        print(f"{'op':<60}{'self ms':>10}{'%':>7}{'calls':>7}")
        for k, (t, c) in sorted(per[n].items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"{k[:59]:<60}{t:>10.2f}{100 * t / tot:>7.1f}{c:>7}")
    keys = sorted(set(per["ours"]) | set(per["timm"]),
                  key=lambda k: -abs(per["ours"].get(k, (0, 0))[0] - per["timm"].get(k, (0, 0))[0]))
    print(f"\n=== op diff (self CPU ms per step, calls per step), largest |ours - timm| first ===")
    print(f"{'op':<60}{'ours ms':>10}{'timm ms':>10}{'diff':>10}{'ours #':>8}{'timm #':>8}")
    for k in keys[:top]:
        (a, ca), (b, cb) = per["ours"].get(k, (0.0, 0)), per["timm"].get(k, (0.0, 0))
        print(f"{k[:59]:<60}{a:>10.2f}{b:>10.2f}{a - b:>+10.2f}{ca:>8}{cb:>8}")
    diff_calls = [k for k in keys if per["ours"].get(k, (0, 0))[1] != per["timm"].get(k, (0, 0))[1]]
    print("\nops whose call count per step differs: " + (", ".join(
        f"{k} {per['ours'].get(k, (0, 0))[1]} vs {per['timm'].get(k, (0, 0))[1]}" for k in diff_calls) or "none"))


# ----------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", default="16", help="fp32 batch size(s), comma-separated (default 16)")
    ap.add_argument("--bf16-batch", type=int, default=128, help="batch for the bf16 autocast run (CUDA only)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the JSON results line to this path")
    ap.add_argument("--profile", action="store_true", help="after timing, profile both models (fp32, first batch)")
    ap.add_argument("--profile-steps", type=int, default=3, help="profiled steps per model (with --profile)")
    args = ap.parse_args(argv)

    if args.threads: torch.set_num_threads(args.threads)
    dev_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    dev_desc = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())

    print(f"torch {torch.__version__}  timm {timm.__version__}  python {platform.python_version()}")
    print(f"device {device} ({dev_desc})  threads {torch.get_num_threads()}  cpu_count {os.cpu_count()}  "
          f"timm use_fused_attn() {timm.layers.use_fused_attn()} (forced True on the model)")

    torch.manual_seed(0)
    ours = make_ours(args.img_size).to(device)
    tm = make_timm(args.img_size).to(device)
    verify_size = 224
    if args.img_size != verify_size:  # the check is specified at 224 px: build 224-px twins for it
        o2, t2 = make_ours(verify_size).to(device), make_timm(verify_size).to(device)
        max_diff = verify(o2, t2, device, verify_size); del o2, t2
        copy_ours_into_timm(ours, tm)
    else:
        max_diff = verify(ours, tm, device, verify_size)
    P = n_params(ours)
    print(f"params: ours {P:,} == timm {n_params(tm):,}   SDPA calls per forward: 12 == 12")
    print(f"max |ours - timm| on the CLS output (fp32, {verify_size} px, batch 2): {max_diff:.3e}  (tol {TOL:g})  OK")

    models = {"ours": ours, "timm": tm}
    configs = [(b, None) for b in batches]
    if device.type == "cuda": configs.append((args.bf16_batch, torch.bfloat16))
    results = []
    for b, amp in configs:
        tag = "bf16-autocast" if amp is not None else "fp32"
        print(f"\n{tag}, batch {b}, {args.img_size} px: {args.rounds} rounds x ({args.warmup} warmup + {args.steps} timed) "
              f"steps per model, interleaved", flush=True)
        results.append(bench_config(models, device, b, args.img_size, amp, args.steps, args.warmup, args.rounds))

    print("\nforward+backward, median ms per step over all timed steps; ours/timm = ratio of the medians, "
          "paired = median ratio of back-to-back steps, best = fastest step vs fastest step, cpu-time = ratio of median process CPU time per step")
    hdr = (f"{'dtype':<14}{'batch':>6}{'ours ms':>10}{'timm ms':>10}{'ours img/s':>12}{'timm img/s':>12}{'ours/timm':>11}"
           f"{'paired':>8}{'best':>7}{'cpu-time':>10}   per-round ratio")
    print(hdr); print("-" * len(hdr))
    for r in results:
        print(f"{r['dtype']:<14}{r['batch']:>6}{r['ours_ms']:>10.1f}{r['timm_ms']:>10.1f}{r['ours_img_s']:>12.1f}"
              f"{r['timm_img_s']:>12.1f}{r['ratio']:>11.3f}{r['ratio_paired_median']:>8.3f}{r['ratio_min']:>7.3f}{r['ratio_cpu_time']:>10.3f}   {r['ratio_per_round']}")
    worst = max(r["ratio"] for r in results)
    verdict = "met" if worst <= 1.0 else "within the 3% noise band" if worst <= 1.03 else "NOT met (profile with --profile)"
    print(f"goal ours/timm <= 1.0: {verdict} (worst ratio of medians {worst:.3f})")

    if args.profile:
        profile(models, device, batches[0], args.img_size, steps=args.profile_steps)

    out = {"benchmark": "vit_speed", "model": "vit_small/16", "torch": torch.__version__, "timm": timm.__version__,
           "device": str(device), "device_name": dev_desc, "threads": torch.get_num_threads(), "params": P,
           "max_abs_diff": max_diff, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
           "results": results}
    line = json.dumps(out)
    if args.json:
        with open(args.json, "w") as f: f.write(line + "\n")
    print(line)
    return out


if __name__ == "__main__":
    main()
