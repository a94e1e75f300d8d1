"""dino.txt (chapter 27, `dino_from_scratch.text`): captions and bad input, the tokenizer, the towers, the loss by hand,
exact resume, one process = two processes on the same global batch, the official checkpoint layout, `dino-align`."""
import json, math, socket, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dino_test_utils import REPO_ROOT, cli_env, read_metrics, one_thread  # noqa: E402

from dino_from_scratch.config import get_recipe  # noqa: E402
from dino_from_scratch.eval import random_backbone  # noqa: E402
from dino_from_scratch.vit import VisionTransformer, ViTConfig  # noqa: E402
from dino_from_scratch import text as T  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    "One intra-op thread (see dino_test_utils.one_thread)."


def make_caption_folder(shared_data: Path, dest: Path, n_train: int = 24, n_val: int = 8) -> Path:
    "dest/captions.jsonl + dest/{train,val}/ with symlinks to the first records of captions-mini."
    src = shared_data / "captions-mini"
    if not (src / "captions.jsonl").is_file(): pytest.skip(f"{src} not found")
    rows = [json.loads(l) for l in (src / "captions.jsonl").read_text().splitlines()]
    keep = [r for r in rows if r["image"].startswith("train/")][:n_train] + [r for r in rows if r["image"].startswith("val/")][:n_val]
    for r in keep:
        (dest / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (dest / r["image"]).symlink_to(src / r["image"])
    (dest / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    return dest


@pytest.fixture(scope="module")
def folder(shared_data, tmp_path_factory):
    return make_caption_folder(shared_data, tmp_path_factory.mktemp("captions") / "c")


BIN = Path(sys.executable).parent          # the environment running the tests (accelerate is installed beside python)
ALIGN = [sys.executable, "-m", "dino_from_scratch.text"]          # what the `dino-align` console script runs

SMALL = dict(batch_size=8, warmup_steps=2, image_size=64, text_dim=32, text_heads=2, text_layers=1, vocab_size=300,
             context_length=16, log_every=1)


# ------------------------------------------------------------------ captions and bad input
def _write(d: Path, lines, images=("train/a.jpg", "train/b.jpg")):
    (d / "train").mkdir(parents=True, exist_ok=True)
    for i in images: Image.new("RGB", (20, 20), (10, 120, 200)).save(d / i)
    (d / "captions.jsonl").write_bytes(b"\n".join(l if isinstance(l, bytes) else json.dumps(l).encode() for l in lines))
    return d


def test_non_utf8_captions_file_names_line_and_offset(tmp_path):
    good = json.dumps({"image": "train/a.jpg", "captions": ["a dog ."]}).encode()
    bad = b'{"image": "train/b.jpg", "captions": ["na\xefve"]}'                    # latin-1 i-diaeresis
    d = _write(tmp_path, [good, bad])
    with pytest.raises(ValueError) as e: T.load_captions(d, "train")
    msg = str(e.value)
    assert "not UTF-8" in msg and "(line 2)" in msg and f"offset {len(good) + 1 + bad.index(0xef)}" in msg and "\\xef" in msg


def test_malformed_records_are_errors_naming_the_line(tmp_path):
    d = _write(tmp_path, [{"image": "train/a.jpg", "captions": ["ok"]}, b"{not json"])
    with pytest.raises(ValueError, match="line 2 is not JSON"): T.load_captions(d, "train")
    _write(tmp_path, [{"image": "train/a.jpg", "captions": [3, "x"]}])
    with pytest.raises(ValueError, match="line 1: 'captions' must be"): T.load_captions(tmp_path, "train")
    _write(tmp_path, [{"img": "train/a.jpg"}])
    with pytest.raises(ValueError, match="line 1: expected"): T.load_captions(tmp_path, "train")


def test_missing_images_empty_and_uncaptioned_are_counted_skips(tmp_path):
    d = _write(tmp_path, [{"image": "train/a.jpg", "captions": ["a  blue\tsquare .", "", "   "]},
                          {"image": "train/gone.jpg", "captions": ["never seen"]},
                          {"image": "train/b.jpg", "captions": ["", " "]}],
               images=("train/a.jpg", "train/b.jpg", "train/nobody.jpg"))
    with pytest.warns(UserWarning, match="1 records whose image file is missing"):
        cs = T.load_captions(d, "train")
    assert cs.captions == [["a blue square ."]] and [Path(s).name for s in cs.sources] == ["a.jpg"]
    assert cs.skipped["missing_image"] == ["train/gone.jpg"] and cs.skipped["no_captions"] == ["train/b.jpg"]
    assert cs.skipped["uncaptioned_images"] == ["train/nobody.jpg"] and cs.skipped["empty_captions"] == 4
    # nothing usable left: an error that says why
    _write(tmp_path / "e", [{"image": "train/gone.jpg", "captions": ["x"]}, {"image": "train/a.jpg", "captions": [""]}])
    with pytest.raises(ValueError, match="no usable image-caption pair.*1 records whose image file is missing"):
        T.load_captions(tmp_path / "e", "train")
    with pytest.raises(FileNotFoundError, match="no captions file"): T.load_captions(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="no record for split 'val'"): T.load_captions(d, "val")


def test_unreadable_image_is_skipped_in_the_token_cache(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "ok.png")
    bb = random_backbone(get_recipe("tiny_v2"))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        tokens, ok = T.backbone_tokens(bb, [tmp_path / "bad.jpg", tmp_path / "ok.png"], 32)
    assert ok.tolist() == [1] and tokens.shape == (1, 1 + 4, 128)
    with pytest.raises(ValueError, match="none of the 1 images"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            T.backbone_tokens(bb, [tmp_path / "bad.jpg"], 32)


def test_hf_imagefolder_dataset(shared_data, tmp_path, monkeypatch):
    "An HF `imagefolder` with metadata.jsonl captions (built here from captions-mini photos) trains and evaluates."
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    src = make_caption_folder(shared_data, tmp_path / "src", n_train=16, n_val=4)
    rows = [json.loads(l) for l in (src / "captions.jsonl").read_text().splitlines()]
    hf = tmp_path / "hf"
    for split in ("train", "validation"):
        part = [r for r in rows if r["image"].startswith("train/" if split == "train" else "val/")]
        (hf / split).mkdir(parents=True)
        for r in part: (hf / split / Path(r["image"]).name).symlink_to(src / r["image"])
        meta = [{"file_name": Path(r["image"]).name, "captions": r["captions"]} for r in part]
        meta[0]["captions"] = meta[0]["captions"][:2] + ["", " "]                      # two empty captions
        (hf / split / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    with pytest.warns(UserWarning, match="2 empty captions dropped"):
        cs = T.load_caption_data(hf, "train")
    assert len(cs) == 16 and cs.n_captions == 5 * 15 + 2
    by_name = {Path(r["image"]).name: r["captions"] for r in rows}
    ds = datasets.load_dataset("imagefolder", data_dir=str(hf), split="train", cache_dir=str(tmp_path / "c2"))
    for i in (3, 7):                                                   # captions travel with their own image
        name = Path(ds.cast_column("image", datasets.Image(decode=False))[i]["image"]["path"]).name
        assert T.captions_from_hf(ds).captions[i] == by_name[name]
    with pytest.raises(KeyError, match="no caption column 'nope'"): T.captions_from_hf(ds, text_key="nope")
    val = T.load_caption_data(hf, "val")
    assert len(val) == 4
    cfg = T.AlignConfig(**SMALL, steps=2, ckpt_every=2)
    tr = T.AlignTrainer(cfg, random_backbone(get_recipe("tiny_v2")), cs, tmp_path / "run", verbose=False, progress=False)
    tr.fit(progress=False)
    model, tok, _ = T.load_aligned(tmp_path / "run")
    res = T.evaluate_aligned(model, tok, captions=hf, imagenette=tmp_path / "none", camvid=tmp_path / "none")
    assert res["retrieval"]["n_images"] == 4 and res["retrieval"]["n_captions"] == 5 * 3 + 2
    assert "zero_shot_skipped" in res and "segmentation_skipped" in res


# ------------------------------------------------------------------ tokenizer and towers
def test_tokenizer_is_canonical_and_keeps_the_end_token():
    texts = ["A dog runs on the grass .", "Two dogs play in the snow .", "a man rides a bike down the street"] * 5
    a, b = T.CaptionTokenizer.train(texts, 120, 8, min_frequency=1), T.CaptionTokenizer.train(texts, 120, 8, min_frequency=1)
    assert a.to_json() == b.to_json()                                 # ids do not depend on hash order
    ids = a(["a dog", "a man rides a bike down the street with two dogs on the grass"])
    assert ids.shape == (2, 8) and ids[:, 0].tolist() == [a.sot_id] * 2
    assert ids[0].tolist()[:4] == [a.sot_id, *a("a dog")[0, 1:3].tolist(), a.eot_id] and ids[0, 4:].eq(a.pad_id).all()
    assert ids[1, -1] == a.eot_id and (ids[1] != a.pad_id).all()      # cut to 8, [EOT] kept last
    assert a.decode(a("A dog runs")[0]) == "a dog runs"
    assert T.CaptionTokenizer.from_json(a.to_json())("two dogs").tolist() == a("two dogs").tolist()


def test_text_tower_reads_the_end_token_only():
    torch.manual_seed(0)
    tt = T.TextTower(T.TextTransformer(50, 10, 32, 2, 2), 16).eval()
    ids = torch.tensor([[2, 7, 8, 9, 3, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        e = tt(ids)
        assert torch.allclose(tt(torch.tensor([[2, 7, 8, 9, 3, 11, 12, 13, 14, 15]])), e, atol=1e-6)   # after [EOT]: unseen
        assert torch.allclose(tt(ids[:, :5]), e, atol=1e-6)
        assert not torch.allclose(tt(torch.tensor([[2, 7, 40, 9, 3, 0, 0, 0, 0, 0]])), e, atol=1e-4)
    with pytest.raises(ValueError, match="outside the text tower's vocabulary of 50"): tt(torch.tensor([[2, 60, 3]]))
    with pytest.raises(ValueError, match="context length is 10"): tt(torch.zeros(1, 11, dtype=torch.long))


def test_image_embedding_is_cls_then_patch_mean():
    torch.manual_seed(0)
    m = T.DinoTxt(random_backbone(get_recipe("tiny_v2")), T.AlignConfig(image_size=64, head_drop_path=0.0)).eval()
    tokens = torch.randn(3, 17, 128)
    with torch.no_grad():
        emb, patches = m.encode_tokens(tokens, normalize=False)
        t = m.visual_model.head(tokens)
    assert torch.allclose(emb, torch.cat([t[:, 0], t[:, 1:].mean(1)], -1), atol=1e-6)
    assert torch.equal(patches, t[:, 1:])
    cls_only = T.DinoTxt(random_backbone(get_recipe("tiny_v2")), T.AlignConfig(use_patches=False))
    assert cls_only.embed_dim == 128 and cls_only.text_model.head.linear_projection.out_features == 128


# ------------------------------------------------------------------ loss
def test_clip_loss_by_hand_and_its_gradient():
    v = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    t = F.normalize(torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    s = torch.tensor(3.0)
    L = v @ t.T * 3
    by_hand = sum(-L[i, i] + math.log(sum(math.exp(L[i, j]) for j in range(3))) for i in range(3)) / 6 + \
        sum(-L[i, i] + math.log(sum(math.exp(L[j, i]) for j in range(3))) for i in range(3)) / 6
    assert abs(T.contrastive_loss(v, t, s).item() - by_hand) < 1e-6
    assert abs(T.contrastive_loss(v, t, s).item() - T.contrastive_loss(t, v, s).item()) < 1e-6       # symmetric
    # the learnable temperature gets the gradient of the formula
    ls = torch.tensor(math.log(3.0), requires_grad=True)
    T.contrastive_loss(v, t, ls.exp()).backward()
    eps = 1e-3
    num = (T.contrastive_loss(v, t, torch.tensor(math.exp(math.log(3) + eps))) -
           T.contrastive_loss(v, t, torch.tensor(math.exp(math.log(3) - eps)))) / (2 * eps)
    assert abs(ls.grad.item() - num.item()) < 1e-4
    # sigmoid: -(1/n) sum_ij log sigmoid(z_ij (s v_i.t_j + b))
    b = torch.tensor(-1.0)
    z = 2 * torch.eye(3) - 1
    assert abs(T.contrastive_loss(v, t, s, b, "sigmoid").item() - (-F.logsigmoid(z * (L + b)).sum() / 3).item()) < 1e-6
    with pytest.raises(ValueError, match="unknown loss"): T.contrastive_loss(v, t, s, kind="hinge")


def test_patch_loss_by_hand():
    "The per-patch option (not dino.txt): top-k mean of patch cosines per pair, then symmetric InfoNCE; 2 images x 2 patches."
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    P = torch.stack([torch.stack([e1, e1]), torch.stack([e2, -e1])]) * 3.0   # unnormalised: the cosine normalises
    U = torch.stack([e1, -e1])
    assert torch.allclose(T.patch_text_similarity(P, U, 1), torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    assert torch.allclose(T.patch_text_similarity(P, U, 2), torch.tensor([[1.0, -1.0], [-0.5, 0.5]]))
    s = torch.tensor(2.0)
    # k = 1, S = [[1, -1], [0, 1]], scale 2: rows log(1+e^-4), log(1+e^-2); columns log(1+e^-2), log(1+e^-4)
    by_hand = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(-2))) / 2
    assert abs(T.patch_text_loss(P, U, s, 1).item() - by_hand) < 1e-6
    # k = 2, S = [[1, -1], [-0.5, 0.5]]: rows log(1+e^-4), log(1+e^-2); columns log(1+e^-3) twice
    by_hand2 = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(-2))) / 4 + math.log(1 + math.exp(-3)) / 2
    assert abs(T.patch_text_loss(P, U, s, 2).item() - by_hand2) < 1e-6
    with pytest.raises(ValueError, match="needs use_patches"): T.AlignConfig(patch_loss="topk", use_patches=False)
    with pytest.raises(ValueError, match="'none' or 'topk'"): T.AlignConfig(patch_loss="max")


def test_patch_loss_option_changes_training_only_when_set(folder, tmp_path):
    "patch_loss='topk' adds a positive term to the first step's loss; 'none' (the default) is dino.txt's loss alone."
    data, bb = T.load_captions(folder, "train"), random_backbone(get_recipe("tiny_v2"))
    kw = dict(cache_dir=tmp_path / "cache", verbose=False, progress=False)
    plain = T.AlignTrainer(T.AlignConfig(**SMALL, steps=1, ckpt_every=10, head_drop_path=0.0), bb, data, tmp_path / "a", **kw)
    dense = T.AlignTrainer(T.AlignConfig(**SMALL, steps=1, ckpt_every=10, head_drop_path=0.0, patch_loss="topk", patch_loss_topk=2), bb, data,
                           tmp_path / "b", **kw)
    tokens, ids = plain.batch(0)
    img, txt, scale, _, patches = dense.model(tokens, ids)
    extra = T.patch_text_loss(patches, txt[:, txt.shape[1] // 2:], scale, 2).item()
    lp, ld = plain.train_step()["loss"], dense.train_step()["loss"]
    assert extra > 0 and abs(ld - lp - extra) < 1e-3, (lp, ld, extra)       # same init and batch, no drop-path


# ------------------------------------------------------------------ training: exact resume
def _same_state(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa: assert torch.equal(sa[k], sb[k]), f"{k} differs"
    oa, ob = a.opt.optimizer.state_dict(), b.opt.optimizer.state_dict()
    assert len(oa["state"]) > 0 and oa["state"].keys() == ob["state"].keys()
    for pid in oa["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"): assert torch.equal(oa["state"][pid][k], ob["state"][pid][k])


def test_resume_is_bit_identical(folder, tmp_path):
    cfg = T.AlignConfig(**SMALL, steps=6, ckpt_every=3)              # 24 images / batch 8: 3 steps per epoch
    data, bb = T.load_captions(folder, "train"), random_backbone(get_recipe("tiny_v2"))
    kw = dict(cache_dir=tmp_path / "cache", verbose=False, progress=False)
    straight = T.AlignTrainer(cfg, bb, data, tmp_path / "straight", **kw)
    straight.fit(progress=False)
    first = T.AlignTrainer(cfg, bb, data, tmp_path / "split", **kw)
    first.fit(max_steps=3, progress=False)
    at3 = {k: v.clone() for k, v in first.model.state_dict().items()}
    second = T.AlignTrainer(cfg, bb, data, tmp_path / "split", resume=True, **kw)
    assert second.step == 3 and all(torch.equal(at3[k], v) for k, v in second.model.state_dict().items())
    second.fit(progress=False)
    assert second.step == 6 and not all(torch.equal(at3[k], v) for k, v in second.model.state_dict().items())
    _same_state(straight, second)
    ma, mb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    ta, _ = T.read_align_checkpoint(T.list_align_checkpoints(tmp_path / "straight")[0])
    tb, _ = T.read_align_checkpoint(T.list_align_checkpoints(tmp_path / "split")[0])
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # resuming with other settings or another backbone is refused, by name
    with pytest.raises(ValueError, match="other settings.*'lr'"):
        T.AlignTrainer(T.AlignConfig(**SMALL, steps=6, lr=1e-2), bb, data, tmp_path / "split", resume=True, **kw)
    with pytest.raises(ValueError, match="another backbone"):
        T.AlignTrainer(cfg, random_backbone(get_recipe("tiny_v2"), seed=1), data, tmp_path / "split", resume=True, **kw)


def test_fresh_start_in_a_used_run_directory(folder, tmp_path):
    "Without resume, a directory with checkpoints is refused (its later steps would pass for the newest); a log with no checkpoint is dropped."
    cfg = T.AlignConfig(**SMALL, steps=2, ckpt_every=2)
    data, bb = T.load_captions(folder, "train"), random_backbone(get_recipe("tiny_v2"))
    kw = dict(cache_dir=tmp_path / "cache", verbose=False, progress=False)
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")   # a run killed before its first checkpoint
    T.AlignTrainer(cfg, bb, data, tmp_path / "fresh", **kw).fit(progress=False)
    assert [m["step"] for m in read_metrics(tmp_path / "fresh")] == [1, 2]
    with pytest.raises(ValueError, match="already holds a dino.txt run \\(1 checkpoint"):
        T.AlignTrainer(cfg, bb, data, tmp_path / "fresh", **kw)
    assert T.AlignTrainer(cfg, bb, data, tmp_path / "fresh", resume=True, **kw).step == 2


def test_tokenizer_text_tower_mismatch_on_load(folder, tmp_path):
    cfg = T.AlignConfig(**SMALL, steps=1, ckpt_every=1)
    tr = T.AlignTrainer(cfg, random_backbone(get_recipe("tiny_v2")), T.load_captions(folder, "train"), tmp_path / "run",
                        verbose=False, progress=False)
    tr.fit(progress=False)
    model, tok, meta = T.load_aligned(tmp_path / "run")
    assert tok.to_json() == tr.tokenizer.to_json() and model.text_model.backbone.vocab_size == tok.vocab_size
    caps = [c for cs in T.load_captions(folder, "train").captions for c in cs]
    other_size = T.CaptionTokenizer.train(caps, 200, 16)
    with pytest.raises(ValueError, match=f"tokenizer/text-tower mismatch: the tokenizer has a vocabulary of {other_size.vocab_size}"):
        T.load_aligned(tmp_path / "run", tokenizer=other_size)
    d = json.loads(tok.to_json())
    v = d["tokenizer"]["model"]["vocab"]
    a, b = sorted(v, key=v.get)[40:42]
    v[a], v[b] = v[b], v[a]                                            # same size, two words swapped
    swapped = T.CaptionTokenizer.from_json(json.dumps(d))
    assert swapped.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="2 tokens have other ids"): T.load_aligned(tmp_path / "run", tokenizer=swapped)
    longer = T.CaptionTokenizer.from_json(json.dumps({**json.loads(tok.to_json()), "context_length": 40}))
    with pytest.raises(ValueError, match="context 40"): T.load_aligned(tmp_path / "run", tokenizer=longer)
    # a checkpoint whose saved tokenizer does not fit its own text tower (a hand-edited or mixed-up file)
    path = T.list_align_checkpoints(tmp_path / "run")[0]
    tensors, meta = T.read_align_checkpoint(path)
    from safetensors.torch import save_file
    meta["tokenizer"] = other_size.to_json()
    save_file(tensors, str(tmp_path / "mixed.safetensors"), metadata={"meta": json.dumps(meta)})
    with pytest.raises(ValueError, match="tokenizer/text-tower mismatch"): T.load_aligned(tmp_path / "mixed.safetensors")


# ------------------------------------------------------------------ one process = two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss", ["clip", "sigmoid", "clip+topk"])
def test_two_processes_equal_one_on_the_same_global_batch(folder, tmp_path, loss):
    script = Path(__file__).parent / "scripts" / "align_ddp.py"
    env = cli_env() | {"PYTHONPATH": str(REPO_ROOT)}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(folder), loss], capture_output=True,
                         text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                          str(script), str(tmp_path / "two"), str(folder), loss],
                         capture_output=True, text=True, timeout=300, env=env | {"ACCELERATE_USE_CPU": "true"}, cwd=REPO_ROOT)
    assert two.returncode == 0, f"{two.stdout[-2000:]}\n{two.stderr[-4000:]}"
    i1 = json.loads((tmp_path / "one" / "rank0.json").read_text())
    i2 = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert i1["world"] == 1 and [i["world"] for i in i2] == [2, 2]
    assert i1["tokenizer"] == i2[0]["tokenizer"] == i2[1]["tokenizer"]
    for a, b in zip(i1["losses"], i2[0]["losses"]): assert abs(a - b) < 1e-5, (i1["losses"], i2[0]["losses"])
    assert i2[0]["losses"] == i2[1]["losses"]                          # both ranks report the global loss
    s1, (s20, s21) = load_file(str(tmp_path / "one" / "rank0.safetensors")), [load_file(str(tmp_path / "two" / f"rank{r}.safetensors")) for r in (0, 1)]
    assert s1.keys() == s20.keys() == s21.keys()
    grads = [k for k in s1 if k.startswith("grad1.")]
    assert "grad1.logit_scale" in grads and "grad1.text_model.backbone.token_embedding.weight" in grads
    assert any(k.startswith("grad1.visual_model.head.blocks.1.") for k in grads)
    for k in s1:
        assert torch.equal(s20[k], s21[k]), f"{k} differs between the two ranks"
        assert (s1[k] - s20[k]).abs().max().item() < 1e-5, f"{k}: one process vs two differ by {(s1[k] - s20[k]).abs().max().item():.2e}"
    assert max(s1[k].abs().max().item() for k in grads) > 1e-3          # real gradients, not zeros


# ------------------------------------------------------------------ official checkpoint layout
def _official_vision(sd, tokens, heads, n_prefix, nb):
    "Transcription of dinov3 VisionHead.forward (SelfAttentionBlock, SwiGLUFFN w1/w2/w3) + VisionTower pooling."
    x, D = tokens, tokens.shape[-1]
    for i in range(nb):
        p = f"visual_model.head.blocks.{i}."
        h = F.layer_norm(x, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-5)
        B, N, C = h.shape
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T).reshape(B, N, 3, heads, C // heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]) * sd[p + "ls1.gamma"]
        h = F.layer_norm(x, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-5)
        h = F.silu(F.linear(h, sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"])) * F.linear(h, sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"])
        x = x + F.linear(h, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"]) * sd[p + "ls2.gamma"]
    x = F.layer_norm(x, (D,), sd["visual_model.head.ln_final.weight"], sd["visual_model.head.ln_final.bias"], eps=1e-5)
    return torch.cat([x[:, 0], x[:, n_prefix:].mean(1)], -1)


def _official_text(sd, ids, heads, nt):
    "Transcription of dinov3 TextTransformer + TextTower (argmax pooling, linear projection)."
    pre = "text_model.backbone."
    N = ids.shape[1]
    x = sd[pre + "token_embedding.weight"][ids] + sd[pre + "positional_embedding"][:N]
    Dt = x.shape[-1]
    for i in range(nt):
        p = f"{pre}blocks.{i}."
        h = F.layer_norm(x, (Dt,), sd[p + "attention_norm.weight"], sd[p + "attention_norm.bias"])
        B = h.shape[0]
        q, k, v = (h @ sd[p + "attention.qkv.weight"].T).reshape(B, N, 3, heads, Dt // heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + F.linear(a.transpose(1, 2).reshape(B, N, Dt), sd[p + "attention.proj.weight"], sd[p + "attention.proj.bias"])
        h = F.layer_norm(x, (Dt,), sd[p + "ffn_norm.weight"], sd[p + "ffn_norm.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "feed_forward.fc1.weight"], sd[p + "feed_forward.fc1.bias"])),
                         sd[p + "feed_forward.fc2.weight"], sd[p + "feed_forward.fc2.bias"])
    x = F.layer_norm(x, (Dt,), sd[pre + "ln_final.weight"], sd[pre + "ln_final.bias"]) @ sd["text_model.head.linear_projection.weight"].T
    return x[torch.arange(B), ids.argmax(-1)]


def _official_state_dict(D=64, Dt=48, V=100, L=12, nb=2, nt=2, E=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (int(4 * D * 2 / 3) + 63) // 64 * 64
    shapes = {"logit_scale": (1,), "visual_model.head.ln_final.weight": (D,), "visual_model.head.ln_final.bias": (D,),
              "text_model.backbone.token_embedding.weight": (V, Dt), "text_model.backbone.positional_embedding": (L, Dt),
              "text_model.backbone.ln_final.weight": (Dt,), "text_model.backbone.ln_final.bias": (Dt,),
              "text_model.head.linear_projection.weight": (E, Dt)}
    for i in range(nb):
        b = f"visual_model.head.blocks.{i}."
        shapes |= {b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D), b + "attn.proj.weight": (D, D),
                   b + "attn.proj.bias": (D,), b + "ls1.gamma": (D,), b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                   b + "mlp.w1.weight": (h, D), b + "mlp.w1.bias": (h,), b + "mlp.w2.weight": (h, D), b + "mlp.w2.bias": (h,),
                   b + "mlp.w3.weight": (D, h), b + "mlp.w3.bias": (D,), b + "ls2.gamma": (D,)}
    for i in range(nt):
        b = f"text_model.backbone.blocks.{i}."
        shapes |= {b + "attention_norm.weight": (Dt,), b + "attention_norm.bias": (Dt,), b + "attention.qkv.weight": (3 * Dt, Dt),
                   b + "attention.proj.weight": (Dt, Dt), b + "attention.proj.bias": (Dt,), b + "ffn_norm.weight": (Dt,),
                   b + "ffn_norm.bias": (Dt,), b + "feed_forward.fc1.weight": (4 * Dt, Dt), b + "feed_forward.fc1.bias": (4 * Dt,),
                   b + "feed_forward.fc2.weight": (Dt, 4 * Dt), b + "feed_forward.fc2.bias": (Dt,)}
    sd = {}
    for k, s in shapes.items():
        r = torch.randn(s, generator=g)
        if k.endswith("gamma") or ("norm" in k and k.endswith("weight")): sd[k] = 1 + 0.2 * r
        elif len(s) > 1 and "embedding" not in k: sd[k] = r / math.sqrt(s[1])
        else: sd[k] = 0.1 * r if k != "logit_scale" else torch.tensor([2.0])
    return sd


def test_official_layout_loads_with_parity():
    sd = _official_state_dict()
    torch.manual_seed(0)
    bb = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_registers=2))
    model = T.load_official_dinotxt(dict(sd), backbone=bb, text_heads=3)
    assert model.cfg.use_patches and model.embed_dim == 128 and model.text_model.eot_id == 99
    x = torch.randn(2, 3, 32, 48)
    ids = torch.tensor([[98, 5, 17, 33, 99, 0, 0, 0, 0, 0, 0, 0], [98, 64, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        tokens = model.visual_model.backbone_tokens(x)
        ours_img, ours_txt = model.encode_image(x, normalize=False), model.encode_text(ids, normalize=False)
        ref_img = _official_vision(sd, tokens, 4, 1 + 2, 2)
        ref_txt = _official_text(sd, ids, 3, 2)
    assert (ours_img - ref_img).abs().max().item() < 1e-5 and ref_img.abs().max() > 0.1
    assert (ours_txt - ref_txt).abs().max().item() < 1e-5 and ref_txt.abs().max() > 0.1
    assert model.logit_scale.item() == 2.0
    # a file that also holds the backbone: built from its visual_model.backbone.* tensors (pretrained.load_official)
    full = dict(sd) | {f"visual_model.backbone.{k}": v for k, v in bb.state_dict().items()}
    x32 = x[..., :32]                                                  # the stored 4x4 grid: no position resizing
    with torch.no_grad():
        ref32 = _official_vision(sd, model.visual_model.backbone_tokens(x32), 4, 1 + 2, 2)
        got = T.load_official_dinotxt(full, text_heads=3, num_heads=4).encode_image(x32, normalize=False)
    assert (got - ref32).abs().max().item() < 1e-5


def test_official_layout_errors_name_the_problem():
    bb = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4))
    sd = _official_state_dict()
    with pytest.raises(ValueError, match="holds only the vision head"): T.load_official_dinotxt(dict(sd))
    with pytest.raises(ValueError, match="vision head is 64 wide but the backbone is 128"):
        T.load_official_dinotxt(dict(sd), backbone=random_backbone(get_recipe("tiny_v2")))
    bad = dict(sd); bad.pop("visual_model.head.blocks.1.attn.proj.bias")
    with pytest.raises(ValueError, match="missing.*blocks.1.attn.proj.bias"): T.load_official_dinotxt(bad, backbone=bb, text_heads=3)
    bad = dict(sd); bad["visual_model.head.blocks.0.ls1.gamma"] = torch.ones(32)
    with pytest.raises(ValueError, match="shapes.*ls1.gamma"): T.load_official_dinotxt(bad, backbone=bb, text_heads=3)
    bad = dict(sd); bad.pop("visual_model.head.blocks.0.mlp.w2.weight")
    with pytest.raises(ValueError, match="no partner"): T.load_official_dinotxt(bad, backbone=bb, text_heads=3)
    with pytest.raises(ValueError, match="not a dino.txt"): T.dinotxt_config({"logit_scale": torch.zeros(1)})


# ------------------------------------------------------------------ metrics
def test_retrieval_metrics_by_hand():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0, 1.0, 0], [0, 0, 1.0], [0.8, 0.6, 0]])   # captions 0,4 of image 0
    owner = torch.tensor([0, 1, 1, 2, 0])
    r = T.retrieval_metrics(img, txt, owner, ks=(1, 2))
    assert r["i2t_r1"] == 100.0                                        # each image's nearest caption is its own
    # caption 1 ([0, .6, .8]) is nearest to image 2, caption 4 ([.8, .6, 0]) to image 0: 4 of 5 right at R@1
    assert r["t2i_r1"] == pytest.approx(80.0) and r["t2i_r2"] == 100.0


# ------------------------------------------------------------------ the command line
def test_dino_align_cli_trains_resumes_and_evaluates(folder, tmp_path, shared_data):
    out = tmp_path / "run"
    sets = [f"{k}={v}" for k, v in SMALL.items()] + ["ckpt_every=2"]
    def run(*args):
        return subprocess.run(ALIGN + ["--backbone", "tiny_v2", "--random-init", "--data", str(folder),
                               "--out", str(out), "--eval-limit", "8", *args], capture_output=True, text=True, timeout=600,
                              env=cli_env() | {"PYTHONPATH": str(REPO_ROOT), "DINO_DATA": str(shared_data / "imagenette2-128")},
                              cwd=REPO_ROOT)
    p = run("--set", *sets, "steps=4", "--max-steps", "2", "--no-eval")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    p = run("--set", *sets, "steps=4", "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "continuing from" in p.stdout + p.stderr and [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    res = json.loads((out / "eval.json").read_text())
    assert res["step"] == 4 and res["retrieval"]["n_images"] == 8 and res["zero_shot"]["n_images"] == 8
    assert 0 <= res["segmentation"]["miou"] <= 100 and "random init of tiny_v2" in res["backbone"]
    p = run("--set", "bach_size=3")
    assert p.returncode != 0 and "unknown AlignConfig field(s) ['bach_size']" in p.stderr
    p = subprocess.run(ALIGN + ["--backbone", str(tmp_path / "nothing"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=cli_env() | {"PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT)
    assert p.returncode != 0 and "not found" in p.stderr


def test_dino_align_console_script_is_declared(repo_root):
    "settings.ini installs `dino-align` as dino_from_scratch.text:main (what `python -m dino_from_scratch.text` runs above)."
    import configparser
    cp = configparser.ConfigParser(delimiters=["="]); cp.read(repo_root / "settings.ini")
    scripts = dict(s.split("=") for s in cp["DEFAULT"]["console_scripts"].split())
    assert scripts["dino-align"] == "dino_from_scratch.text:main" and callable(T.main)
