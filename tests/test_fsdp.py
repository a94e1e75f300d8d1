"""FSDP2 sharding (chapter 23): real 2-process runs on CPU (gloo) under `accelerate launch`, a 7B model sharded over a
fake 8-rank world on the `meta` device, and the per-block pieces (activation checkpointing, init after sharding).

The 2-process runs use tests/scripts/fsdp_step.py: a tiny DINOv3 recipe (Gram term on) with every rank-dependent
random draw switched off, so 2 ranks x 4 images must reproduce 1 rank x 8 images.
"""
import json, subprocess, sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import REPO_ROOT, VENV_BIN, cli_env, launch_ranks, make_small_folder, one_thread  # noqa: E402,F401

from dino_from_scratch import sharding, cli  # noqa: E402
from dino_from_scratch.sharding import ShardConfig  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_step.py"
N_7B = 6_716_043_264          # DINOv3 ViT-7B/16 parameters (DESIGN.md section 3)


def _launch(out: Path, folder: Path, world: int, steps: int, batch: int, *extra: str) -> list[dict]:
    "Run fsdp_step.py on `world` processes (accelerate, gloo) or in this interpreter's venv directly (world 1)."
    return launch_ranks(SCRIPT, out, world, folder, steps, batch, *extra)


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    "One process on batches of 8; two processes on 4 each (5 straight steps; 3 steps, then resumed for 2 more)."
    tmp = tmp_path_factory.mktemp("fsdp")
    folder = make_small_folder(shared_data, tmp / "data")      # 36 train images: 4 steps of 8 per epoch
    single = _launch(tmp / "single", folder, 1, 5, 8)
    straight = _launch(tmp / "straight", folder, 2, 5, 4)
    first = _launch(tmp / "resumed", folder, 2, 3, 4)
    resumed = _launch(tmp / "resumed", folder, 2, 5, 4, "--resume")
    return dict(tmp=tmp, single=single, straight=straight, first=first, resumed=resumed)


def _ckpt(run_dir: Path, step: int):
    return sharding.read_sharded_checkpoint(run_dir / "run" / "checkpoints" / f"step_{step:07d}.dcp")


def test_each_rank_holds_half_of_the_parameters(runs):
    r0, r1 = runs["straight"]
    assert (r0["world"], r1["world"], r0["backend"]) == (2, 2, "gloo")
    n = r0["numel"]
    assert n == runs["single"][0]["numel"] == runs["single"][0]["local_numel"]      # one process holds everything
    assert r0["local_numel"] + r1["local_numel"] == n                                # the shards tile the model
    for r in (r0, r1):
        assert 0.45 < r["local_numel"] / n < 0.55, r["local_numel"] / n
        assert r["teacher_local_numel"] == r["local_numel"]                          # the EMA teacher is sharded alike


def test_two_ranks_reproduce_one_process_on_the_global_batch(runs):
    single, (r0, r1) = runs["single"][0], runs["straight"]
    assert len(single["losses"]) == len(r0["losses"]) == 5
    # each rank's loss is the mean over its 4 images, so the mean over ranks is the loss over the 8 images
    for s, a, b in zip(single["losses"], r0["losses"], r1["losses"]):
        assert abs((a + b) / 2 - s) < 1e-5, (s, a, b)
    assert r0["losses"] != r1["losses"]                                              # the ranks saw different images
    gram = [(a + b) / 2 for a, b in zip(r0["gram_losses"], r1["gram_losses"])]
    assert gram[0] == 0 and all(g > 0 for g in gram[1:])                             # the (sharded) Gram teacher ran
    for s, g in zip(single["gram_losses"], gram): assert abs(s - g) < 1e-6
    # and the weights after 5 steps agree (same initial weights on both world sizes, same updates)
    one, _ = _ckpt(runs["tmp"] / "single", 5)
    two, _ = _ckpt(runs["tmp"] / "straight", 5)
    assert one.keys() == two.keys()
    for k in (k for k in one if k.startswith(("student.", "teacher."))):
        torch.testing.assert_close(one[k], two[k], atol=1e-6, rtol=0, msg=k)


def test_sharded_checkpoint_resumes_bit_identically(runs):
    assert [r["start"] for r in runs["resumed"]] == [3, 3] and [r["step"] for r in runs["resumed"]] == [5, 5]
    for a, b in zip(runs["straight"], runs["resumed"]):   # steps 4 and 5, per rank
        assert b["losses"] == a["losses"][3:], (a["losses"], b["losses"])
    straight, _ = _ckpt(runs["tmp"] / "straight", 5)
    resumed, meta = _ckpt(runs["tmp"] / "resumed", 5)
    assert meta["step"] == 5 and straight.keys() == resumed.keys()
    assert any(k.startswith("optim.") for k in straight) and any(k.startswith("loss.gram.backbone.") for k in straight)
    for k in straight: assert torch.equal(straight[k], resumed[k]), k              # bit-identical, optimizer included
    # the frozen prototypes had no optimizer step before the checkpoint at step 3 (freeze = 4 steps) and none after
    first, _ = _ckpt(runs["tmp"] / "resumed", 3)
    assert len([k for k in first if k.startswith("optim.")]) < len([k for k in straight if k.startswith("optim.")])


def test_consolidated_checkpoint_is_evaluated_like_a_full_one(runs):
    from dino_from_scratch.eval import load_backbone
    run = runs["tmp"] / "straight" / "run"
    path = sharding.consolidate_checkpoint(run)
    assert path == run / "checkpoints" / "step_0000005.safetensors"
    model, recipe = load_backbone(run)
    assert recipe.shard.strategy == "fsdp"
    tensors, _ = _ckpt(runs["tmp"] / "straight", 5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors["teacher.backbone." + k]), k
    out = model.forward_features(torch.randn(1, 3, 64, 64))
    assert out["patches"].shape == (1, 16, 64) and torch.isfinite(out["cls"]).all()


META_7B = r"""
import json, resource, sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import init_device_mesh
from dino_from_scratch.vit_v3 import dinov3_vit
from dino_from_scratch import sharding
rank = int(sys.argv[1])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
model = dinov3_vit("vit7b16", device="meta")
shapes = [tuple(p.shape) for p in model.parameters()]
sharding.shard_model(model, sharding.ShardConfig(strategy="fsdp", checkpointing="selective"),
                     init_device_mesh("cpu", (8,)), "cpu")
print(json.dumps({"numel": sum(p.numel() for p in model.parameters()), "local": sharding.local_numel(model),
                  "shapes": shapes, "meta": all(p.is_meta for p in model.parameters()),
                  "dtensor": all(hasattr(p, "to_local") for p in model.parameters()),
                  "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("rank", [0, 7])
def test_vit7b_shards_over_8_fake_ranks_without_memory(rank):
    p = subprocess.run([str(VENV_BIN / "python"), "-c", META_7B, str(rank)], capture_output=True, text=True,
                       timeout=120, env=cli_env(), cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["numel"] == N_7B and r["meta"] and r["dtensor"]
    # FSDP2 splits dim 0 of every tensor in 8 chunks of ceil(rows / 8) (torch.chunk): rank r's rows, computed by hand
    expect = 0
    for shape in r["shapes"]:
        rows, rest = shape[0], (torch.Size(shape[1:]).numel() if len(shape) > 1 else 1)
        c = -(-rows // 8)
        expect += max(0, min(rows, (rank + 1) * c) - rank * c) * rest
    assert r["local"] == expect
    assert abs(r["local"] / (N_7B / 8) - 1) < 1e-4, r["local"] / (N_7B / 8)          # 1/8 up to uneven small tensors
    assert r["rss_growth_mb"] < 200        # 6.7 B fp32 parameters would be 27 GB; 1/8 of them 3.4 GB


# ------------------------------------------------------------------ single-process pieces
@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _small_vit(**kw):
    from dino_from_scratch.vit import VisionTransformer, ViTConfig
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kw))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_values_and_gradients(mode):
    ref, ck = _small_vit(drop_path_rate=0.2, drop_path_mode="linear"), _small_vit(drop_path_rate=0.2, drop_path_mode="linear")
    ref.train(); ck.train()
    for b in ck.blocks: sharding.checkpoint_block(b, mode)
    assert ck.state_dict().keys() == ref.state_dict().keys()                         # no wrapper prefix in the keys
    x = torch.randn(3, 3, 32, 32)
    outs = []
    for m in (ref, ck):
        torch.manual_seed(1)                                                          # the same drop-path draws
        y = m.forward_features(x)["patches"].square().mean()
        y.backward()
        outs.append((y.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for g0, g1 in zip(outs[0][1], outs[1][1]): torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)
    assert ck.blocks[0]._checkpointing == mode


def test_checkpointing_saves_activation_memory():
    "Bytes still allocated after a forward pass (profiler memory events): full < selective < none."
    def held(mode):
        m = _small_vit()
        for b in m.blocks: sharding.checkpoint_block(b, mode)
        x = torch.randn(8, 3, 32, 32)
        n, out = sharding.held_bytes(lambda: m.forward_features(x)["patches"])
        assert out.requires_grad
        return n
    none, sel, full = held("none"), held("selective"), held("full")
    assert full < sel < none, (none, sel, full)
    assert full < none / 3                          # only block inputs are kept


def test_init_after_sharding_matches_the_unsharded_init():
    "World of 1 (a notebook): meta -> fully_shard -> to_empty -> seeded init == meta -> to_empty -> seeded init."
    import torch.distributed as dist
    from dino_from_scratch.vit_v3 import dinov3_vit
    ref = sharding.materialize(dinov3_vit("vits16", device="meta", depth=2), "cpu", seed=3)
    if dist.is_initialized(): pytest.skip("a process group already exists in this test process")
    try:
        m = dinov3_vit("vits16", device="meta", depth=2)
        sharding.shard_model(m, ShardConfig(strategy="fsdp"), sharding.device_mesh("cpu"), "cpu")
        sharding.materialize(m, "cpu", seed=3)
        for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
            assert torch.equal(p.full_tensor(), q), n
        assert ref.rope.periods.abs().sum() > 0 and torch.equal(m.rope.periods, ref.rope.periods)   # buffer rebuilt
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():   # eval mode: no RoPE augmentation draw
            torch.testing.assert_close(m.eval().forward_features(x)["cls"], ref.eval().forward_features(x)["cls"])
    finally:
        dist.destroy_process_group()


def test_shard_config_rejects_bad_values():
    with pytest.raises(ValueError, match="shard.strategy"): ShardConfig(strategy="zero3")
    with pytest.raises(ValueError, match="shard.checkpointing"): ShardConfig(strategy="fsdp", checkpointing="some")
    with pytest.raises(ValueError, match="shard.param_dtype"): ShardConfig(strategy="fsdp", param_dtype="fp8")
    with pytest.raises(ValueError, match="shard.strategy=fsdp"): ShardConfig(checkpointing="full")
    assert ShardConfig(strategy="fsdp", checkpointing=False).checkpointing == "none"   # YAML `no`
    assert ShardConfig().dtypes("cpu") == (torch.float32, torch.float32)
    assert ShardConfig(strategy="fsdp").dtypes("cuda") == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="checkpointing mode"): sharding.checkpoint_block(torch.nn.Linear(2, 2), "half")


def test_recipe_has_a_shard_section_and_rejects_double_mixed_precision():
    from dino_from_scratch.config import tiny_v3, override
    r = tiny_v3()
    assert r.shard == ShardConfig()                                                  # DDP stays the default
    r = override(r, ["shard.strategy=fsdp", "shard.checkpointing=selective"])
    assert (r.shard.strategy, r.shard.checkpointing) == ("fsdp", "selective")
    with pytest.raises(ValueError, match="run.mixed_precision"):
        override(tiny_v3(), ["shard.strategy=fsdp", "run.mixed_precision=bf16"])
    with pytest.raises((KeyError, ValueError), match="shard"): override(tiny_v3(), ["shard.strategy=deepspeed"])


ACC = REPO_ROOT / "configs" / "accelerate"


def test_accelerate_configs_launch_what_their_names_say():
    "Each launch config parses with Accelerate's own code and resolves to the intended process layout."
    from accelerate.commands.launch import launch_command_parser, _validate_launch_command
    from accelerate.utils.launch import prepare_multi_gpu_env
    want = {"cpu_single": (False, 1, 1), "cpu_2proc": (True, 2, 1), "gpu8_ddp": (True, 8, 1), "gpu8_fsdp": (True, 8, 1),
            "fsdp_vit7b_32nodes": (True, 256, 32)}
    assert {p.stem for p in ACC.glob("*.yaml")} == set(want)
    for name, (multi, procs, machines) in want.items():
        text = (ACC / f"{name}.yaml").read_text()
        assert "accelerate launch --config_file configs/accelerate/" + name + ".yaml" in text   # its command is in the file
        argv = ["--config_file", str(ACC / f"{name}.yaml")]
        if machines > 1: argv += ["--machine_rank", "5", "--main_process_ip", "10.0.0.1"]
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv + ["x.py"]))
        assert (bool(args.multi_gpu), args.num_processes, args.num_machines) == (multi, procs, machines), name
        if multi:
            prepare_multi_gpu_env(args)
            assert int(args.nproc_per_node) == procs // machines, name                    # 8 GPUs per node for the 7B run
            if "fsdp" in name: assert args.mixed_precision == "no"                     # FSDP's own policy casts
    for name in ("gpu8_fsdp", "fsdp_vit7b_32nodes", "cpu_2proc"):
        assert "shard.strategy=fsdp" in (ACC / f"{name}.yaml").read_text()
    assert "data.batch_size=16" in (ACC / "fsdp_vit7b_32nodes.yaml").read_text()      # 16 images per GPU, as in the paper


def test_fsdp_trainer_matches_the_ddp_trainer_in_one_process(shared_data, tmp_path):
    """One process, the full tiny_v3 objective (iBOT, KoLeo, Gram): the FSDP trainer (sharded over a world of 1,
    selective checkpointing) and the default trainer, started from the same weights, take the same 4 steps."""
    import torch.distributed as dist
    from dino_from_scratch import config, data, train
    if dist.is_initialized(): pytest.skip("a process group already exists in this test process")
    folder = make_small_folder(shared_data, tmp_path / "data")
    ds = data.ImageDataset.from_folder(folder, "train")
    fresh = lambda: data.ImageDataset(ds.sources, ds.labels, classes=ds.classes, name=ds.name)
    sets = ["data.batch_size=8", "data.num_workers=0", "data.crops.n_local=2", "model.depth=2", "model.embed_dim=64",
            "model.num_heads=2", "head.out_dim=64", "head.hidden_dim=64", "head.bottleneck_dim=32", "ibot.out_dim=64",
            "optim.epochs=2", "optim.freeze_last_layer_epochs=1", "run.log_every=1", "gram.it_first_update=1",
            "gram.update_frequency=2", "run.mixed_precision=no"]   # both in fp32 (auto: bf16 on a CPU with native bf16)
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v
    try:
        tf = cli.make_trainer(config.override(config.tiny_v3(), sets + ["shard.strategy=fsdp", "shard.checkpointing=selective"]),
                                out=tmp_path / "fsdp", dataset=fresh(), verbose=False)
        assert tf.sharded and all(hasattr(p, "to_local") for p in tf.student.parameters())
        init = {k: full(v).clone() for k, v in tf.student.state_dict().items()}
        td = cli.make_trainer(config.override(config.tiny_v3(), sets), out=tmp_path / "ddp", dataset=fresh(), verbose=False)
        assert not td.sharded and type(tf) is sharding.sharded(type(td))   # the same trainer, with the FSDP mixin
        td.student.load_state_dict(init); td.teacher.load_state_dict(init)
        td.loss_fn["gram"].backbone.load_state_dict(td.teacher.backbone.state_dict())
        hf, hd = tf.fit(max_steps=4, progress=False), td.fit(max_steps=4, progress=False)
        assert [m["loss"] for m in hf] == pytest.approx([m["loss"] for m in hd], abs=1e-6)
        assert hf[-1]["gram_loss"] > 0 and hf[-1]["ibot_loss"] > 0
        for k, v in td.student.state_dict().items():
            torch.testing.assert_close(full(tf.student.state_dict()[k]), v, atol=1e-6, rtol=0, msg=k)
        assert (tmp_path / "fsdp" / "checkpoints" / "step_0000004.dcp" / "meta.json").exists()
    finally:
        dist.destroy_process_group()


def test_consolidate_names_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="no sharded checkpoint"): sharding.main(["consolidate", str(tmp_path)])
    (tmp_path / "checkpoints" / "step_0000001.dcp").mkdir(parents=True)        # an interrupted save: no meta.json
    assert sharding.list_sharded_checkpoints(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="meta.json"):
        sharding.read_sharded_checkpoint(tmp_path / "checkpoints" / "step_0000001.dcp")
