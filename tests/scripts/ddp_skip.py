"""Under `accelerate launch` with 2 processes: rank 1's whole share of the first global batch is unreadable, rank 0's
is fine. Every rank must skip that step together (before issue 15, rank 0 entered DDP's all-reduce alone: a hang).

usage: accelerate launch ... tests/scripts/ddp_skip.py OUT_DIR DATA_DIR
Writes OUT_DIR/rank{r}.json: rank, step reached, unreadable items skipped, the steps logged, a weight checksum.
"""
import json, sys, warnings
from pathlib import Path

import torch

from dino_from_scratch import config, data, train

out, data_dir = Path(sys.argv[1]), sys.argv[2]
recipe = config.override(config.tiny_v1(), [
    "data.batch_size=4", "data.num_workers=0", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "optim.epochs=2", "optim.warmup_epochs=0",
    "optim.freeze_last_layer_epochs=0", "run.log_every=1", "run.ckpt_every=100", "data.crops.n_local=2"])
base = data.ImageDataset.from_folder(data_dir, "train")
world = 2
order = train.StepBatches(len(base), 4, 0, world, recipe.run.seed).epoch_order(0)
bad = {int(i) for i in order[:4 * world][1::world]}                 # rank 1's slice of global batch 0
ds = data.ImageDataset([b"broken" if i in bad else s for i, s in enumerate(base.sources)], base.labels,
                       classes=base.classes, name=base.name)
warnings.simplefilter("ignore")
tr = train.Trainer(recipe, out=out / "run", dataset=ds, verbose=False)
assert tr.acc.num_processes == world
hist = tr.fit(max_steps=3, progress=False)
(out / f"rank{tr.acc.process_index}.json").write_text(json.dumps({
    "rank": tr.acc.process_index, "step": tr.step, "skipped": tr.skipped, "logged": [m["step"] for m in hist],
    "checksum": float(sum(p.double().sum() for p in tr.student.parameters()))}))
tr.acc.end_training()
