"""The memory planner (chapter 24, `dino_from_scratch.plan`): exact parameter counts, the activation model against
autograd's saved tensors, the arithmetic of sharding / precision / checkpointing, the CLI, and the prediction against
a measured CPU training step."""
import json, subprocess, sys, time
from pathlib import Path
from dataclasses import asdict, replace

import pytest
import torch

from dino_from_scratch import plan
from dino_from_scratch.plan import (GiB, block_params, block_saved_per_token, head_params, measure_train_step, plan_memory,
                                    recipe_heads, vit_params)
from dino_from_scratch.config import Recipe, recipe_from_dict, tiny_v3, get_recipe, PRESETS
from dino_from_scratch.dino import DINOHead, HeadConfig
from dino_from_scratch.ibot import IBOTConfig
from dino_from_scratch.data import MultiCropConfig
from dino_from_scratch.vit import ViTConfig, VisionTransformer, n_params
from dino_from_scratch.vit_v2 import dinov2_vit_config
from dino_from_scratch.vit_v3 import dinov3_vit, dinov3_vit_config


def recipe_7b() -> Recipe:
    "The lead's preset when it exists, else DINOv3's 7B pretraining recipe built by hand (dinov3_vit7b16_pretrain.yaml)."
    if "dinov3_vit7b16" in PRESETS: return get_recipe("dinov3_vit7b16")
    from dino_from_scratch.config import DataConfig
    return Recipe(name="dinov3_vit7b16",
                  data=DataConfig(batch_size=16, crops=MultiCropConfig(global_size=256, local_size=112, n_local=8)),
                  model=dinov3_vit_config("vit7b16", img_size=256, drop_path_rate=0.4),
                  head=HeadConfig(out_dim=262144, hidden_dim=8192, bottleneck_dim=512, norm_last_layer=False),
                  ibot=IBOTConfig(loss_weight=1.0, out_dim=98304, separate_head=True, hidden_dim=4096, bottleneck_dim=384))


def meta_count(cfg: ViTConfig) -> int:
    with torch.device("meta"): return n_params(VisionTransformer(cfg))


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", ["vits16", "vitl16", "vit7b16"])
def test_backbone_count_matches_meta_model(name):
    assert vit_params(dinov3_vit_config(name)) == n_params(dinov3_vit(name, device="meta"))


def test_vit7b_count_is_the_official_number():
    assert vit_params(dinov3_vit_config("vit7b16")) == 6_716_043_264   # with the untied local-crop CLS norm
    assert vit_params(dinov3_vit_config("vit7b16", untie_local_cls_norm=False)) == 6_716_043_264 - 2 * 4096


@pytest.mark.parametrize("cfg", [ViTConfig(), dinov2_vit_config("vitg14"), dinov2_vit_config("vitl14", ffn="swiglu"),
                                 ViTConfig(embed_dim=64, depth=2, num_heads=2, qkv_bias=False, num_registers=3, mask_token=True,
                                           layerscale=1e-5, img_size=96, patch_size=8)])
def test_other_backbones_match(cfg):
    assert vit_params(cfg) == meta_count(cfg)


@pytest.mark.parametrize("hc", [HeadConfig(out_dim=96, hidden_dim=48, bottleneck_dim=16),
                                HeadConfig(out_dim=50, hidden_dim=20, bottleneck_dim=8, nlayers=1, norm_last_layer=False),
                                HeadConfig(out_dim=70, hidden_dim=30, bottleneck_dim=12, nlayers=4, norm_last_layer=False)])
def test_head_count_matches_built_head(hc):
    h = DINOHead(40, hc)
    assert head_params(40, hc) == (n_params(h), n_params(h, trainable_only=True))


def test_7b_heads_are_counted_from_the_recipe():
    r = recipe_7b()
    heads = recipe_heads(r)
    assert heads["dino"].out_dim == 262144 and heads["ibot"].out_dim == 98304
    D = r.model.embed_dim
    with torch.device("meta"):   # the heads the trainer builds, without memory
        from dino_from_scratch.ibot import build_ibot_head
        built = build_ibot_head(D, r.head, r.ibot)
    assert head_params(D, heads["ibot"])[0] == n_params(built)
    # by hand: 4096 -> 8192 -> 8192 -> 512 MLP with biases, 262144 x 512 prototypes (no gains: linear last layer)
    mlp = 4096 * 8192 + 8192 + 8192 * 8192 + 8192 + 8192 * 512 + 512
    assert head_params(D, heads["dino"])[0] == mlp + 262144 * 512   # DINOv3: a plain linear last layer, no gains


def test_shared_ibot_head_is_counted_once():
    r = tiny_v3()
    d = r.to_dict(); d["ibot"].update(separate_head=False, out_dim=d["head"]["out_dim"])
    assert list(recipe_heads(recipe_from_dict(d))) == ["dino"]
    assert list(recipe_heads(r)) == ["dino", "ibot"]


# ---------------------------------------------------------------- the activation model
def _saved_bytes_per_token(cfg, B=4, size=64):
    torch.manual_seed(0)
    m = VisionTransformer(cfg).train()
    x = torch.randn(B, 3, size, size)
    tok = m.prepare_tokens(x).detach().requires_grad_()
    weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen = {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights: seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.blocks[0](tok, **m._pos(x))
    rope = 2 * (size // cfg.patch_size) ** 2 * (cfg.embed_dim // cfg.num_heads) * 4 if cfg.pos_embed == "rope" else 0
    return (sum(seen.values()) - rope) / tok.shape[:2].numel()


@pytest.mark.parametrize("cfg", [ViTConfig(embed_dim=64, depth=1, num_heads=2, img_size=64, drop_path_rate=0.0),
                                 dinov3_vit_config("vits16", embed_dim=64, depth=1, num_heads=4, img_size=64),
                                 dinov3_vit_config("vits16", embed_dim=64, depth=1, num_heads=2, img_size=64, ffn="swiglu",
                                                   mlp_ratio=3.0, drop_path_rate=0.5)])
def test_block_saved_tensors_match_autograd(cfg):
    act, f32 = block_saved_per_token(cfg, "none")
    assert _saved_bytes_per_token(cfg) == pytest.approx(4 * (act + f32), rel=0.01)


def test_checkpointing_keeps_less():
    cfg = dinov3_vit_config("vit7b16")
    none, sel, full = (block_saved_per_token(cfg, m)[0] for m in ("none", "selective", "full"))
    assert full == cfg.embed_dim < sel < none
    # selective keeps: block input, qkv, attention out, proj, w12 (2h) and w3: 7 D + 2 h (h = 8192 for the 7B)
    assert sel == 7 * 4096 + 2 * 8192
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        block_saved_per_token(cfg, "partial")


# ---------------------------------------------------------------- the arithmetic of the plan
def test_sharding_divides_the_state_exactly():
    r = recipe_7b()
    p1, p8 = (plan_memory(r, gpus=n, batch_per_gpu=16, checkpointing="selective") for n in (1, 8))
    for k in p1.rows:   # activations, logits and the working set do not depend on the number of GPUs
        if k.startswith(("activations", "heads:", "FSDP")): assert p1.rows[k] == pytest.approx(p8.rows[k])
    state1 = sum(v for k, v in p1.rows.items() if not k.startswith(("activations", "heads:", "FSDP")))
    state8 = sum(v for k, v in p8.rows.items() if not k.startswith(("activations", "heads:", "FSDP")))
    assert state1 == pytest.approx(8 * state8)
    P, Ph = vit_params(r.model), sum(head_params(r.model.embed_dim, h)[0] for h in recipe_heads(r).values())
    # 4 (params) + 4 (grads) + 8 (AdamW) + 4 (EMA teacher) bytes per parameter; no Gram teacher in pretraining
    assert state1 == pytest.approx(20 * (P + Ph))


def test_7b_on_256_gpus_fits_and_ddp_does_not():
    r = recipe_7b()
    p = plan_memory(r, gpus=256, batch_per_gpu=16, checkpointing="selective")
    assert p.fits and 10 * GiB < p.total < 80 * GiB
    ddp = plan_memory(r, gpus=256, batch_per_gpu=16, checkpointing="selective", strategy="ddp")
    assert not ddp.fits and ddp.total > 125 * GiB     # 20 bytes x 6.7 B parameters of state alone


def test_activations_scale_with_batch_and_precision():
    r = recipe_7b()
    act = lambda **kw: next(v for k, v in plan_memory(r, gpus=256, **kw).rows.items() if k.startswith("activations"))
    assert act(batch_per_gpu=8) == pytest.approx(act(batch_per_gpu=16) / 2)
    a16, a32 = act(batch_per_gpu=4, checkpointing="full"), act(batch_per_gpu=4, checkpointing="full", precision="fp32")
    assert 1.9 < a32 / a16 <= 2.0       # everything doubles except the fp32 statistics


def test_gram_teacher_counted_only_when_on():
    r = tiny_v3()
    on = plan_memory(r, precision="fp32", strategy="ddp")
    d = r.to_dict(); d["gram"]["loss_weight"] = 0.0
    off = plan_memory(recipe_from_dict(d), precision="fp32", strategy="ddp")
    gram_on = next(v for k, v in on.rows.items() if k.startswith("Gram teacher"))
    assert gram_on == 4 * vit_params(r.model)
    assert next(v for k, v in off.rows.items() if k.startswith("Gram teacher")) == 0


@pytest.mark.parametrize("kw, msg", [(dict(gpus=0), "gpus must be"), (dict(batch_per_gpu=0), "batch_per_gpu must be"),
                                     (dict(checkpointing="some"), "checkpointing must be"), (dict(precision="fp8"), "precision must be"),
                                     (dict(strategy="zero3"), "strategy must be"), (dict(gpu_memory_gib=0), "gpu_memory_gib")])
def test_bad_input_is_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        plan_memory(tiny_v3(), **kw)


# ---------------------------------------------------------------- the CLI
def test_cli_prints_every_term_and_assumptions(capsys):
    p = plan.main(["--recipe", "tiny_v3", "--gpus", "4", "--batch-per-gpu", "8", "--checkpointing", "full", "--gpu-memory", "16"])
    out = capsys.readouterr().out
    for word in ("parameters (backbone", "gradients", "AdamW states", "EMA teacher", "Gram teacher", "DINO head", "iBOT head",
                 "FSDP working set", "activations", "total", "fits in 16 GiB", "assumptions:", "full checkpointing"):
        assert word in out, word
    assert p.gpus == 4 and p.batch_per_gpu == 8


def test_cli_json_and_does_not_fit(capsys):
    plan.main(["--recipe", "tiny_v3", "--gpu-memory", "0.01", "--json", "--set", "data.batch_size=4"])
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and d["batch_per_gpu"] == 4 and d["total_gib"] > 0.01
    assert d["total_gib"] == pytest.approx(sum(d["gib"].values()))


def test_cli_errors_are_one_line():
    res = subprocess.run([sys.executable, "-m", "dino_from_scratch.plan", "--recipe", "nope"], capture_output=True, text=True)
    assert res.returncode != 0 and "dino-plan: error: unknown recipe 'nope'" in res.stderr
    with pytest.raises(SystemExit, match="gpus must be"):
        plan.main(["--recipe", "tiny_v3", "--gpus", "0"])


# ---------------------------------------------------------------- prediction vs a measured training step
def _check_recipe() -> Recipe:
    "tiny_v3's objective (DINO + iBOT + KoLeo + Gram from step 0) on a DINOv3 ViT-B/16 with 16,384-prototype heads."
    d = tiny_v3().to_dict()
    d["model"] = asdict(dinov3_vit_config("vitb16", img_size=64))
    d["head"].update(out_dim=16384, hidden_dim=2048, bottleneck_dim=256)
    d["ibot"].update(out_dim=16384)
    d["data"]["crops"].update(global_size=64, local_size=32, n_local=2)
    d["gram"].update(it_first_update=0)
    return recipe_from_dict(d)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_prediction_within_5_percent_of_measured_cpu_step(mode):
    "The README's accuracy claim, in every checkpointing mode (measured 2026-12-02: +3.4% none, +3.9% selective, +3.6% full)."
    r = _check_recipe()
    predicted = plan_memory(r, gpus=1, batch_per_gpu=2, precision="fp32", strategy="ddp", checkpointing=mode).total
    assert predicted > 2 * GiB                        # large enough for the allocator's noise not to matter
    m = measure_train_step(r, 2, checkpointing=mode, steps=2)
    assert m["measured"] == pytest.approx(predicted, rel=0.05), (m, predicted)


def test_measure_rejects_bad_mode():
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        measure_train_step(tiny_v3(), 2, checkpointing="half")


def test_console_script_exits_0_and_names_bad_input():
    "`dino-plan` as installed: exit status 0 with the table on stdout; a bad argument exits non-zero with the reason."
    import subprocess, shutil
    exe = shutil.which("dino-plan") or str(Path(sys.executable).parent / "dino-plan")
    ok = subprocess.run([exe, "--recipe", "tiny_v3", "--gpus", "2", "--batch-per-gpu", "4"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "total" in ok.stdout and "MemoryPlan(" not in ok.stdout + ok.stderr
    bad = subprocess.run([exe, "--recipe", "no_such_recipe"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown recipe" in bad.stderr
