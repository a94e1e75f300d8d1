"""Train a tiny DINOv3 recipe with every random term on for a few steps and dump what this rank saw (tests/test_ddp_equality.py).

usage: [accelerate launch ...] tests/scripts/ddp_equality_step.py OUT_DIR DATA_DIR MAX_STEPS BATCH_PER_RANK [SET ...]

iBOT block masks, KoLeo over the global batch (loss.koleo_group=0), Sinkhorn-Knopp centering, drop-path 0.2 (DINOv2's
batch-subset form), RoPE jitter + rescale: all on; gradient clipping off (see the overrides). Writes OUT_DIR/rank{r}.json
(world size, rank, per-step local loss terms); the run directory OUT_DIR/run holds the final checkpoint (weights, loss state, optimizer state).
The environment variable DDP_EQ_BREAK breaks one piece on purpose, to see the test fail: "sum" (gradients summed over
processes instead of averaged), "rank_draws" (masks and drop-path drawn from the position in the process's own batch),
"local_koleo" (KoLeo within each process's batch).
"""
import json, os, sys
from pathlib import Path

import torch

from dino_from_scratch import config, data, cli, train, dinov2

out, data_dir, max_steps, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
extra = sys.argv[5:]
brk = os.environ.get("DDP_EQ_BREAK", "")

recipe = config.override(config.tiny_v3(), [
    f"data.batch_size={batch}", "data.num_workers=0", "data.crops.n_local=2", "model.depth=2", "model.embed_dim=64",
    "model.num_heads=2", "model.drop_path_rate=0.2", "model.rope_jitter=1.5", "model.rope_rescale=2.0",
    "head.out_dim=64", "head.hidden_dim=64", "head.bottleneck_dim=32", "ibot.out_dim=64",
    "loss.koleo_weight=0.1", "loss.koleo_group=0", "loss.centering=sinkhorn", "ibot.centering=sinkhorn",
    "optim.epochs=2", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
    # no gradient clipping: at 3.0 (the recipe's) every module of this tiny model is clipped, and clipping takes a
    # summed (doubled) gradient back to the same norm, so the summing bug below would pass unseen
    "optim.clip_grad=0",
    "run.log_every=1", "run.ckpt_every=100", "run.mixed_precision=no", *extra])
if brk == "local_koleo": recipe = config.override(recipe, ["loss.koleo_group=1"])
if brk == "sum":
    train.Trainer.backward = lambda self, loss: self.acc.backward(loss * self.acc.num_processes)
if brk == "rank_draws":
    train.Trainer.global_positions = lambda self, b: list(range(b))
ds = data.ImageDataset.from_folder(data_dir, "train")
tr = cli.make_trainer(recipe, out=out / "run", dataset=ds, verbose=False)
assert isinstance(tr, dinov2.DINOv2Trainer), type(tr)
rank, world = tr.acc.process_index, tr.acc.num_processes
hist = tr.fit(max_steps=max_steps, progress=False)
terms = ("loss", "dino_loss", "ibot_loss", "koleo_loss")
(out / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world": world, "step": tr.step,
    **{t: [m[t] for m in hist] for t in terms},
    "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None}))
tr.acc.wait_for_everyone()
if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()
