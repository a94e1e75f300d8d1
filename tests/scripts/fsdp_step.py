"""Train a tiny DINOv3 recipe with FSDP2 sharding for a few steps and dump what this rank holds (tests/test_fsdp.py).

usage: [accelerate launch ...] tests/scripts/fsdp_step.py OUT_DIR DATA_DIR MAX_STEPS BATCH_PER_RANK [--resume] [SET ...]

Writes OUT_DIR/rank{r}.json: world size, rank, the losses of the steps this process ran, the number of parameter
elements this rank holds (its shards) and the global number; the run itself (sharded checkpoints) is OUT_DIR/run.
"""
import json, sys
from pathlib import Path

import torch

from dino_from_scratch import config, data, sharding, train, cli

out, data_dir, max_steps, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
resume = "--resume" in sys.argv[5:]
extra = [a for a in sys.argv[5:] if a != "--resume"]

# tiny_v3 shrunk, with every rank-dependent random draw switched off so that 2 ranks x B images must reproduce
# 1 rank x 2B images: no iBOT masks (drawn per rank), no KoLeo (a per-rank nearest neighbour), no drop-path, no RoPE
# augmentation (drawn per forward); the Gram teacher is refreshed at step 1 and 3 so the Gram term runs.
recipe = config.override(config.tiny_v3(), [
    f"data.batch_size={batch}", "data.num_workers=0", "data.crops.n_local=2", "model.depth=2", "model.embed_dim=64",
    "model.num_heads=2", "model.rope_rescale=null", "head.out_dim=64", "head.hidden_dim=64", "head.bottleneck_dim=32",
    "ibot.loss_weight=0", "ibot.out_dim=64", "loss.koleo_weight=0", "optim.epochs=2", "optim.freeze_last_layer_epochs=1",
    "run.log_every=1", "run.ckpt_every=100", "run.keep_checkpoints=5", "gram.it_first_update=1", "gram.update_frequency=2",
    "shard.strategy=fsdp", *extra])
ds = data.ImageDataset.from_folder(data_dir, "train")
tr = cli.make_trainer(recipe, out=out / "run", dataset=ds, verbose=False, resume=resume)
rank, world = tr.acc.process_index, tr.acc.num_processes
start = tr.step
hist = tr.fit(max_steps=max_steps, progress=False)
(out / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world": world, "start": start, "step": tr.step, "losses": [m["loss"] for m in hist],
    "gram_losses": [m.get("gram_loss", 0.0) for m in hist],
    "local_numel": sharding.local_numel(tr.student), "numel": sum(p.numel() for p in tr.student.parameters()),
    "teacher_local_numel": sharding.local_numel(tr.teacher),
    "backend": torch.distributed.get_backend()}))
tr.acc.wait_for_everyone()
torch.distributed.barrier()
torch.distributed.destroy_process_group()
