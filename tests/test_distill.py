"""Distillation (chapter 25): a frozen teacher, an unmasked student, one teacher forward for several students,
exact resume, and student groups across 2 real processes (gloo)."""
import json, socket, subprocess, sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import REPO_ROOT, VENV_BIN, cli_env, make_small_folder, optimizer_of, read_metrics, one_thread  # noqa: E402,F401

from dino_from_scratch import data, train, cli, checkpoint  # noqa: E402
from dino_from_scratch.config import tiny_v2, override  # noqa: E402
from dino_from_scratch.dinov2 import DINOv2Trainer  # noqa: E402
from dino_from_scratch.distill import (DistillConfig, DistillTrainer, MultiDistillTrainer, load_teacher,  # noqa: E402
                                       rank_groups, student_recipes)
from dino_from_scratch.eval import load_backbone  # noqa: E402
from dino_from_scratch.vit import VisionTransformer, ViTConfig  # noqa: E402

SMALL_V2 = ["data.batch_size=8", "data.num_workers=0", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
            "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "ibot.out_dim=64", "optim.epochs=2",
            "optim.warmup_epochs=0", "run.log_every=1", "run.ckpt_every=2", "data.crops.n_local=2"]


def small_v2(*extra):
    return override(tiny_v2(), SMALL_V2 + list(extra))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "One intra-op thread (shared 2-core machine)."


@pytest.fixture(scope="module")
def images(shared_data):
    "16 real training images: batch 8 -> 2 steps per epoch."
    return data.ImageDataset.from_folder(shared_data / "imagenette2-128", "train").subset(16)


def fresh(ds):
    return data.ImageDataset(ds.sources, ds.labels, classes=ds.classes, name=ds.name)


@pytest.fixture(scope="module")
def teacher_run(images, tmp_path_factory):
    "A tiny DINOv2 run (2 steps) to distil from: our checkpoint format, with trained DINO and iBOT heads."
    out = tmp_path_factory.mktemp("teacher") / "run"
    DINOv2Trainer(small_v2(), out=out, dataset=fresh(images), verbose=False).fit(max_steps=2, progress=False)
    return out


def student_recipe(*extra):
    return small_v2("model.embed_dim=16", *extra)   # a smaller student than the teacher (32)


def cfg(teacher_run, **kw):
    return DistillConfig(enabled=True, teacher=str(teacher_run), **kw)


# ------------------------------------------------------------------ config
def test_config_validation():
    with pytest.raises(ValueError, match="distill.teacher"): DistillConfig(enabled=True)
    with pytest.raises(ValueError, match="teacher_source"): DistillConfig(teacher_source="hub")
    with pytest.raises(ValueError, match="name"): DistillConfig(students=[{"model": {}}])
    with pytest.raises(KeyError, match="embd"): DistillConfig(students=[{"name": "a", "model": {"embd": 1}}])
    with pytest.raises(KeyError, match="size"): DistillConfig(students=[{"name": "a", "size": 1}])
    with pytest.raises(ValueError, match="unique"): DistillConfig(students=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="ranks"): DistillConfig(students=[{"name": "a", "ranks": [2, 1]}])
    DistillConfig()   # off by default: no teacher needed


def test_rank_groups():
    two = DistillConfig(students=[{"name": "s"}, {"name": "b"}])
    assert rank_groups(two, 4) == [[0, 1], [2, 3]]
    assert rank_groups(two, 2) == [[0], [1]]
    assert rank_groups(DistillConfig(), 3) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="evenly"): rank_groups(two, 3)
    given = DistillConfig(students=[{"name": "s", "ranks": [0, 1]}, {"name": "b", "ranks": [1, 4]}])
    assert rank_groups(given, 4) == [[0], [1, 2, 3]]               # DINOv3 ranks_range: unequal groups
    with pytest.raises(ValueError, match="exactly once"): rank_groups(given, 5)
    overlap = DistillConfig(students=[{"name": "s", "ranks": [0, 2]}, {"name": "b", "ranks": [1, 3]}])
    with pytest.raises(ValueError, match="exactly once"): rank_groups(overlap, 3)
    with pytest.raises(ValueError, match="every student or for none"):
        rank_groups(DistillConfig(students=[{"name": "s", "ranks": [0, 1]}, {"name": "b"}]), 2)


def test_student_recipes():
    r = student_recipe()
    assert student_recipes(r, DistillConfig()) == [(None, r)]
    (n1, r1), (n2, r2) = student_recipes(r, DistillConfig(students=[{"name": "a", "model": {"depth": 2}}, {"name": "b"}]))
    assert (n1, r1.model.depth, r1.model.embed_dim, r1.name) == ("a", 2, 16, r.name + "-a")
    assert (n2, r2.model) == ("b", r.model)


# ------------------------------------------------------------------ the teacher
def test_teacher_from_our_run_keeps_its_heads(teacher_run):
    model, note = load_teacher(teacher_run, student_recipe(), verbose=False)
    tensors, _ = checkpoint.read_checkpoint(checkpoint.list_checkpoints(teacher_run)[0])
    sd = model.state_dict()
    assert {k for k in sd} == {k[len("teacher."):] for k in tensors if k.startswith("teacher.")}
    assert all(torch.equal(sd[k], tensors["teacher." + k]) for k in sd)            # backbone AND both heads as trained
    assert model.ibot_head is not None and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    st, _ = load_teacher(teacher_run, student_recipe(), weights="student", verbose=False)
    assert not torch.equal(st.head.mlp[0].weight, model.head.mlp[0].weight)        # the other network of the file
    assert "step 2" in note


def test_teacher_student_mismatch_errors(teacher_run):
    with pytest.raises(ValueError, match="prototypes"):
        load_teacher(teacher_run, student_recipe("head.out_dim=32"), verbose=False)
    with pytest.raises(ValueError, match="prototypes"):
        load_teacher(teacher_run, student_recipe("ibot.out_dim=32"), verbose=False)
    with pytest.raises(ValueError, match="patch size"):
        load_teacher(teacher_run, student_recipe("model.patch_size=8"), verbose=False)
    with pytest.raises(FileNotFoundError):
        load_teacher(teacher_run / "nothing", student_recipe(), verbose=False)


def test_official_backbone_gets_new_seeded_heads(tmp_path):
    "Official files hold a backbone only: the heads are new, frozen, and reproducible from `head_seed`."
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2))
    torch.save(vit.state_dict(), tmp_path / "dino_hub.pth")                        # our names are DINOv1 hub names
    r = student_recipe()
    a, note = load_teacher(tmp_path / "dino_hub.pth", r, head_seed=3, arch={"num_heads": 2}, verbose=False)
    b, _ = load_teacher(tmp_path / "dino_hub.pth", r, head_seed=3, arch={"num_heads": 2}, verbose=False)
    c, _ = load_teacher(tmp_path / "dino_hub.pth", r, head_seed=4, arch={"num_heads": 2}, verbose=False)
    assert "heads: new" in note
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.backbone(x), vit.eval()(x))
    assert all(torch.equal(p, q) for p, q in zip(a.head.parameters(), b.head.parameters()))
    assert not torch.equal(a.head.mlp[0].weight, c.head.mlp[0].weight)
    assert a.head.last_layer.weight.shape[0] == r.head.out_dim and a.ibot_head.last_layer.weight.shape[0] == r.ibot.out_dim


# ------------------------------------------------------------------ one student
def test_distillation_moves_the_student_not_the_teacher(teacher_run, images, tmp_path):
    tr = DistillTrainer(student_recipe(), out=tmp_path / "d", dataset=fresh(images), distill=cfg(teacher_run), verbose=False)
    teacher0 = {k: v.clone() for k, v in tr.distill_teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in tr.student.state_dict().items()}
    ema0 = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    seen = []
    tr.student.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("masks")), with_kwargs=True)
    hist = tr.fit(max_steps=2, progress=False)
    assert all(torch.equal(v, tr.distill_teacher.state_dict()[k]) for k, v in teacher0.items())   # frozen
    moved = lambda sd0, m: [k for k, v in m.state_dict().items() if not torch.equal(v, sd0[k])]
    assert "backbone.blocks.0.attn.qkv.weight" in moved(student0, tr.student)
    assert "ibot_head.mlp.0.weight" in moved(student0, tr.student)                  # the iBOT term reaches the student
    assert "backbone.blocks.0.attn.qkv.weight" in moved(ema0, tr.teacher)           # the EMA follows the student
    assert seen == [None, None]                                                     # the student is never masked ...
    assert torch.equal(tr.student.backbone.mask_token, student0["backbone.mask_token"])
    assert all(m["n_masked"] > 0 and m["ibot_loss"] > 0 for m in hist)              # ... yet has iBOT targets
    # the checkpoint: the student and its EMA, not the frozen teacher; the evaluation tools read the student's EMA
    tensors, meta = checkpoint.read_checkpoint(checkpoint.list_checkpoints(tmp_path / "d")[0])
    assert {k.split(".")[0] for k in tensors} == {"student", "teacher", "loss", "optim"}
    assert meta["distill"]["teacher"] == str(teacher_run)
    backbone, recipe = load_backbone(tmp_path / "d")
    assert recipe.model.embed_dim == 16 and torch.equal(backbone.cls_token, tr.teacher.backbone.cls_token)


def test_masked_student_option(teacher_run, images, tmp_path):
    "mask_student=True (not DINOv3's choice) masks the student's global crops: the mask token then learns."
    tr = DistillTrainer(student_recipe(), out=tmp_path / "m", dataset=fresh(images),
                        distill=cfg(teacher_run, mask_student=True), verbose=False)
    seen, tok0 = [], tr.student.backbone.mask_token.clone()
    tr.student.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("masks")), with_kwargs=True)
    tr.fit(max_steps=1, progress=False)
    assert seen[0] is not None and seen[0].any()
    assert not torch.equal(tok0, tr.student.backbone.mask_token)


def test_resume_is_bit_identical(teacher_run, images, tmp_path):
    c = cfg(teacher_run)
    straight = DistillTrainer(student_recipe(), out=tmp_path / "a", dataset=fresh(images), distill=c, verbose=False)
    assert len(straight.sched) == 4
    straight.fit(max_steps=4, progress=False)
    first = DistillTrainer(student_recipe(), out=tmp_path / "b", dataset=fresh(images), distill=c, verbose=False)
    first.fit(max_steps=2, progress=False)
    del first
    second = DistillTrainer(student_recipe(), out=tmp_path / "b", dataset=fresh(images), distill=c, resume=True, verbose=False)
    assert second.step == 2
    second.fit(max_steps=4, progress=False)
    for name in ("student", "teacher"):
        sa, sb = getattr(straight, name).state_dict(), getattr(second, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    oa, ob = optimizer_of(straight).state_dict(), optimizer_of(second).state_dict()
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]


# ------------------------------------------------------------------ several students, one process
def test_one_teacher_forward_feeds_every_student(teacher_run, images, tmp_path):
    c = cfg(teacher_run, students=[{"name": "small", "model": {}}, {"name": "shallow", "model": {"embed_dim": 32, "depth": 2}}])
    mt = MultiDistillTrainer(student_recipe(), out=tmp_path / "multi", dataset=fresh(images), distill=c, verbose=False)
    t = mt.trainers[0].distill_teacher
    assert all(tr.distill_teacher is t for tr in mt.trainers)                      # one teacher in memory
    calls = []
    inner = t.backbone.forward_features
    t.backbone.forward_features = lambda x, **kw: calls.append(x.shape[0]) or inner(x, **kw)
    mt.fit(max_steps=2, progress=False)
    assert calls == [2 * 8, 2 * 8]                                                  # one forward per step (2 global crops x 8)
    assert {p.name for p in (tmp_path / "multi").iterdir()} == {"small", "shallow"}
    assert load_backbone(tmp_path / "multi" / "shallow")[1].model.depth == 2
    # the first student learns exactly what it learns alone (same data, masks and targets)
    alone = DistillTrainer(student_recipe(), out=tmp_path / "alone", dataset=fresh(images), distill=cfg(teacher_run), verbose=False)
    alone.fit(max_steps=2, progress=False)
    sa, sb = alone.student.state_dict(), mt.trainers[0].student.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # resume: both students continue from their own checkpoints at the same step
    again = MultiDistillTrainer(student_recipe(), out=tmp_path / "multi", dataset=fresh(images), distill=c, resume=True, verbose=False)
    assert [tr.step for tr in again.trainers] == [2, 2]


# ------------------------------------------------------------------ student groups across 2 processes
SCRIPT = r'''
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from dino_from_scratch import data
from dino_from_scratch.config import tiny_v2, override
from dino_from_scratch.cli import make_trainer
out, folder, teacher, sets = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
r = override(tiny_v2(), sets + ["distill.enabled=true", f"distill.teacher={teacher}",
                                "distill.students=[{name: a, model: {}}, {name: b, model: {depth: 2}}]"])
ds = data.ImageDataset.from_folder(folder, "train")
tr = make_trainer(r, out=out / "run", dataset=ds, verbose=False)
assert type(tr).__name__ == "DistillTrainer"   # under accelerate launch: one student per process group
rank = tr.acc.process_index
record = {"teacher_batches": [], "student_batches": []}
inner = tr.distill_teacher.backbone.forward_features
tr.distill_teacher.backbone.forward_features = lambda x, **kw: record["teacher_batches"].append(x.shape[0]) or inner(x, **kw)
tr.student.register_forward_pre_hook(lambda m, a, kw: record["student_batches"].append(sum(c.shape[0] for c in a[0])), with_kwargs=True)
dump = {}
targets = tr.targets
def spy(feats, seed, part=None, total=None):
    t = targets(feats, seed, part, total)
    if "p_cls" not in dump: dump.update(p_cls=t["p_cls"].clone(), feats_cls=feats["cls"].clone())
    return t
tr.targets = spy
shared = tr.shared_batch
def spy_batch(crops):
    res = shared(crops)
    if "crops0" not in dump: dump.update(crops0=res[0][0].clone(), crops1=res[0][1].clone())
    return res
tr.shared_batch = spy_batch
tr.fit(max_steps=2, progress=False)
save_file({k: v.contiguous() for k, v in dump.items()}, str(out / f"rank{rank}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps(record | {"rank": rank, "group": tr.group, "out": str(tr.out), "step": tr.step}))
torch.distributed.barrier()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_student_groups_over_two_processes(teacher_run, shared_data, tmp_path):
    """2 processes, 2 students: each process runs the teacher on ITS 4 images, the features are gathered, and each
    student (a group of one process) trains on the whole global batch of 8, with Sinkhorn-Knopp over that batch."""
    folder = make_small_folder(shared_data, tmp_path / "data")
    script = tmp_path / "groups.py"
    script.write_text(SCRIPT)
    sets = [s for s in SMALL_V2 if not s.startswith("data.batch_size")] + ["data.batch_size=4", "model.embed_dim=16"]
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(script), str(tmp_path), str(folder), str(teacher_run), json.dumps(sets)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env() | {"ACCELERATE_USE_CPU": "true"}, cwd=REPO_ROOT)
    assert p.returncode == 0, f"accelerate launch failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["group"] for i in info] == [[0], [1]] and [i["step"] for i in info] == [2, 2]
    for i in info:
        assert i["teacher_batches"] == [2 * 4, 2 * 4]           # the teacher sees this process's share only ...
        assert i["student_batches"] == [2 * 8, 2 * 8]           # ... the student the global batch (2 global crops x 8)
    # each student writes its own run directory, with its own architecture
    assert load_backbone(tmp_path / "run" / "a")[1].model.depth == 1
    assert load_backbone(tmp_path / "run" / "b")[1].model.depth == 2
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "b")] == [1, 2]
    # both groups got the same gathered batch and targets; the targets equal a one-process Sinkhorn-Knopp over it
    d0, d1 = (load_file_(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    for k in d0: assert torch.equal(d0[k], d1[k]), k
    model, _ = load_teacher(teacher_run, override(tiny_v2(), sets), verbose=False)
    from dino_from_scratch.dino import DINOLoss
    with torch.no_grad():
        f = model.backbone.forward_features(torch.cat([d0["crops0"], d0["crops1"]]))
        assert torch.allclose(f["cls"], d0["feats_cls"], atol=1e-5)
        r = override(tiny_v2(), sets)
        p = DINOLoss(r.head.out_dim, r.loss).teacher_probs(model.head(f["cls"]).view(2, 8, -1), r.loss.teacher_temp)
    assert torch.allclose(p, d0["p_cls"], atol=1e-5)


def load_file_(path):
    from safetensors.torch import load_file
    return load_file(str(path))


# ------------------------------------------------------------------ the recipe's distill section and dino-train
def test_recipe_section_picks_the_trainer(teacher_run, images, tmp_path):
    from dino_from_scratch.config import save_recipe, load_recipe, get_recipe
    r = override(student_recipe(), ["distill.enabled=true", f"distill.teacher={teacher_run}"])
    tr = cli.make_trainer(r, out=tmp_path / "one", dataset=fresh(images), verbose=False)
    assert type(tr).__name__ == "DistillTrainer" and tr.cfg == r.distill
    r2 = override(r, ["distill.students=[{name: a, model: {depth: 2}}, {name: b}]"])
    mt = cli.make_trainer(r2, out=tmp_path / "two", dataset=fresh(images), verbose=False)
    assert type(mt).__name__ == "MultiDistillTrainer" and [t.out.name for t in mt.trainers] == ["a", "b"]
    save_recipe(r2, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == r2                                    # the section survives YAML
    # an unmasked distilled student needs no mask token; a masked one does; enabled needs a teacher
    assert not override(r, ["model.mask_token=false"]).model.mask_token
    with pytest.raises(ValueError, match="mask token"): override(r, ["model.mask_token=false", "distill.mask_student=true"])
    with pytest.raises(ValueError, match="distill.teacher"): override(student_recipe(), ["distill.enabled=true"])
    with pytest.raises(KeyError, match="distill.teachr"): override(r, ["distill.teachr=x"])
    # the presets
    tiny, big = get_recipe("distill_tiny"), get_recipe("distill_vits16_from_vitl16")
    assert tiny.distill.enabled and tiny.model.embed_dim == 64 and tiny.distill.teacher == "runs/tiny_v2"
    assert (big.model.embed_dim, big.model.depth, big.model.patch_size, big.distill.teacher_source) == (384, 12, 16, "official")
    assert (big.head.out_dim, big.ibot.out_dim, big.gram.loss_weight, big.model.drop_path_rate) == (262144, 98304, 0.0, 0.0)


def test_dino_train_distills_and_resumes(teacher_run, shared_data, tmp_path):
    folder = make_small_folder(shared_data, tmp_path / "data")                     # 36 images: 4 steps per epoch
    sets = SMALL_V2 + ["model.embed_dim=16", "distill.enabled=true", f"distill.teacher={teacher_run}"]
    args = ["--recipe", "tiny_v2", "--data", str(folder), "--out", str(tmp_path / "run"), "--no-eval"]
    cli.main(args + ["--max-steps", "2", "--set", *sets])
    cli.main(args + ["--max-steps", "3", "--resume", "--set", *sets])
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    _, meta = checkpoint.read_checkpoint(checkpoint.list_checkpoints(tmp_path / "run")[0])
    assert meta["step"] == 3 and meta["recipe"]["distill"]["enabled"] and meta["recipe"]["model"]["embed_dim"] == 16


# ------------------------------------------------------------------ convolutional students (chapter 28)
def tiny_convnext(**kw):
    from dino_from_scratch.convnext import ConvNeXtConfig
    return ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), **kw)       # stride 32


def test_convnext_and_vit_students_from_one_teacher_forward(teacher_run, images, tmp_path):
    """A ViT student and a ConvNeXt student (pseudo patch size 16: its map on the ViT/16 grid) trained side by side on
    real images: ONE teacher forward per step, both students (and their EMAs) move, the frozen teacher does not."""
    from dino_from_scratch.convnext import ConvNeXt
    from dino_from_scratch.distill import load_student
    c = cfg(teacher_run, students=[{"name": "vit"}, {"name": "cnx"}])
    mt = MultiDistillTrainer(student_recipe(), out=tmp_path / "mix", dataset=fresh(images), distill=c, verbose=False,
                             backbones={"cnx": tiny_convnext(patch_size=16)})
    vit_tr, cnx_tr = mt.trainers
    assert isinstance(cnx_tr.student.backbone, ConvNeXt) and isinstance(vit_tr.student.backbone, VisionTransformer)
    assert cnx_tr.student.head.mlp[0].in_features == 32 and cnx_tr.teacher_resize is None
    t = vit_tr.distill_teacher
    assert cnx_tr.distill_teacher is t
    t0 = {k: v.clone() for k, v in t.state_dict().items()}
    s0 = [{k: v.clone() for k, v in tr.student.state_dict().items()} for tr in mt.trainers]
    calls, inner = [], t.backbone.forward_features
    t.backbone.forward_features = lambda x, **kw: calls.append(tuple(x.shape)) or inner(x, **kw)
    seen = []
    cnx_tr.student.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("masks")), with_kwargs=True)
    hists = mt.fit(max_steps=3, progress=False)
    assert calls == [(2 * 8, 3, 64, 64)] * 3                                        # one teacher forward per step, at 64 px
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in t0.items())           # the teacher is frozen
    for tr, sd0, key in zip(mt.trainers, s0, ["backbone.blocks.0.attn.qkv.weight", "backbone.stages.2.0.pwconv1.weight"]):
        sd = tr.student.state_dict()
        assert not torch.equal(sd[key], sd0[key]), (tr.name, key)                   # each student's backbone moved
        assert not torch.equal(sd["ibot_head.mlp.0.weight"], sd0["ibot_head.mlp.0.weight"])   # iBOT reached both
        assert not torch.equal(tr.teacher.state_dict()[key], sd0[key])              # and its EMA followed
    assert all(m["n_masked"] > 0 and m["ibot_loss"] > 0 for h in hists for m in h)
    assert [m["n_masked"] for m in hists[0]] == [m["n_masked"] for m in hists[1]]   # the same iBOT positions for both
    assert seen == [None] * 3                                                       # the ConvNeXt student is not masked
    back, meta = load_student(tmp_path / "mix" / "cnx")                              # its run directory rebuilds it
    assert isinstance(back, ConvNeXt) and meta["distill"]["student_backbone"]["arch"] == "convnext"
    assert torch.equal(back.norm.weight, cnx_tr.teacher.backbone.norm.weight)
    assert isinstance(load_student(tmp_path / "mix" / "vit")[0], VisionTransformer)


def test_convnext_student_of_native_stride_gets_a_resized_teacher(teacher_run, images, tmp_path):
    """DINOv3's alignment: a stride-32 ConvNeXt student under a ViT/16 teacher; the student sees 128 px global crops, the
    teacher the same crops at half size (64 px, DINOv3's teacher_to_student_resolution_scale 2), so the teacher's 4x4
    tokens cover the student's 4x4 cells and the iBOT positions are shared."""
    tr = DistillTrainer(student_recipe("data.crops.global_size=128"), out=tmp_path / "c", dataset=fresh(images),
                        distill=cfg(teacher_run), verbose=False, backbone=tiny_convnext())
    assert tr.teacher_resize == (16, 32) and tr.student.backbone.patch_size == 32
    calls, inner = [], tr.distill_teacher.backbone.forward_features
    tr.distill_teacher.backbone.forward_features = lambda x, **kw: calls.append(tuple(x.shape)) or inner(x, **kw)
    w0 = tr.student.backbone.stages[3][0].dwconv.weight.clone()
    seen = []
    tr.student.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(a[0][0].shape[-2:])), with_kwargs=True)
    hist = tr.fit(max_steps=2, progress=False)
    assert calls == [(16, 3, 64, 64)] * 2 and seen == [(128, 128)] * 2                  # teacher at 64 px, student at 128 px
    assert not torch.equal(w0, tr.student.backbone.stages[3][0].dwconv.weight)
    assert all(0 < m["n_masked"] <= 16 * 4 * 4 and m["ibot_loss"] > 0 for m in hist)   # positions on the shared 4x4 grid


def test_backbone_registry_builds_registered_families_only():
    "Chapter 25's registry of backbone families (chapter 28 registers the ConvNeXt): a toy family and the ViT."
    from dataclasses import dataclass
    from dino_from_scratch.distill import BACKBONES, BackboneFamily, arch_dict, build_backbone, model_config, register_backbone

    @dataclass
    class ToyConfig:
        width: int = 4
        arch: str = "toy"

    class Toy(torch.nn.Module):
        def __init__(self, cfg, **over):
            super().__init__(); self.cfg = ToyConfig(**{**cfg.__dict__, **over}); self.embed_dim = self.cfg.width

    saved = dict(BACKBONES)
    try:
        register_backbone(BackboneFamily("toy", ToyConfig, Toy, lambda n, **kw: ToyConfig(width=int(n.split("_")[1]), **kw), ("toy_12",)))
        assert [build_backbone(c).embed_dim for c in (ToyConfig(5), "toy_12", {"arch": "toy", "width": 7})] == [5, 12, 7]
        assert build_backbone({"arch": "toy_12"}, width=3).embed_dim == 3                     # overrides win over the size
        assert arch_dict(ToyConfig(6)) == {"width": 6, "arch": "toy"} and model_config(arch_dict(ToyConfig(6))) == ToyConfig(6)
        with pytest.raises(ValueError, match=r"names already taken: \['toy_12'\]"):
            register_backbone(BackboneFamily("other", ToyConfig, Toy, names=("toy_12",)))
    finally:
        BACKBONES.clear(); BACKBONES.update(saved)
    with pytest.raises(KeyError, match="unknown model.arch 'toy'"):
        build_backbone({"arch": "toy"})
    with pytest.raises(TypeError, match="no registered backbone family has the config class ToyConfig"):
        build_backbone(ToyConfig())
    vit = build_backbone({"depth": 1, "embed_dim": 32, "num_heads": 2})                        # no arch: a ViT
    assert isinstance(vit, VisionTransformer) and arch_dict(vit.cfg)["arch"] == "vit"


def test_students_on_different_grids_or_bad_backbones_are_refused(teacher_run, images, tmp_path):
    c = cfg(teacher_run, students=[{"name": "vit"}, {"name": "cnx"}])
    with pytest.raises(ValueError, match="one teacher forward gives one token grid.*'vit': 16, 'cnx': 32"):
        MultiDistillTrainer(student_recipe(), out=tmp_path / "a", dataset=fresh(images), distill=c, verbose=False,
                            backbones={"cnx": tiny_convnext()})
    with pytest.raises(KeyError, match="unknown students \\['resnet'\\]"):
        MultiDistillTrainer(student_recipe(), out=tmp_path / "b", dataset=fresh(images), distill=c, verbose=False,
                            backbones={"resnet": tiny_convnext()})
    with pytest.raises(ValueError, match="does not divide the student's patch size"):
        DistillTrainer(student_recipe(), out=tmp_path / "c", dataset=fresh(images), distill=cfg(teacher_run), verbose=False,
                       backbone=tiny_convnext(stem_stride=3))
    with pytest.raises(ValueError, match="layerwise_decay=0.9 counts ViT blocks"):
        DistillTrainer(student_recipe("optim.layerwise_decay=0.9"), out=tmp_path / "d", dataset=fresh(images),
                       distill=cfg(teacher_run), verbose=False, backbone=tiny_convnext())
