"""Run 2 DINO steps under `accelerate launch` and dump what this rank holds (used by tests/test_multiprocess.py).

usage: accelerate launch ... tests/scripts/ddp_step.py OUT_DIR DATA_DIR

Writes OUT_DIR/rank{r}.safetensors (initial and final student/teacher weights, final loss center) and
OUT_DIR/rank{r}.json (world size, rank, the (epoch, index) keys this rank's dataset was asked for).
"""
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dino_from_scratch import config, data, train

STEPS = 2
out, data_dir = Path(sys.argv[1]), sys.argv[2]


class RecordingDataset(data.ImageDataset):
    "An ImageDataset that remembers every key it is asked for (num_workers=0: it runs in this process)."
    seen: list = []
    def __getitem__(self, key):
        type(self).seen.append(list(key) if isinstance(key, tuple) else [0, int(key)])
        return super().__getitem__(key)


recipe = config.override(config.tiny_v1(), [
    "data.batch_size=4", "data.num_workers=0", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "optim.epochs=1", "optim.warmup_epochs=0",
    "optim.freeze_last_layer_epochs=0", "run.log_every=1", "run.ckpt_every=100", "data.crops.n_local=2"])
base = data.ImageDataset.from_folder(data_dir, "train")
ds = RecordingDataset(base.sources, base.labels, classes=base.classes, name=base.name)

tr = train.Trainer(recipe, out=out / "run", dataset=ds, verbose=False)
rank, world = tr.acc.process_index, tr.acc.num_processes
initial = {f"init.student.{k}": v.detach().clone().contiguous() for k, v in tr.student.state_dict().items()}
initial |= {f"init.teacher.{k}": v.detach().clone().contiguous() for k, v in tr.teacher.state_dict().items()}
sampler_batches = [b for b, _ in zip(iter(tr.batches), range(STEPS))]  # what StepBatches hands this rank

hist = tr.fit(max_steps=STEPS, progress=False)

final = {f"final.student.{k}": v.detach().cpu().contiguous() for k, v in tr.student.state_dict().items()}
final |= {f"final.teacher.{k}": v.detach().cpu().contiguous() for k, v in tr.teacher.state_dict().items()}
final["final.center"] = tr.loss_fn["dino"].center.detach().cpu().contiguous()
save_file({**initial, **final}, str(out / f"rank{rank}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world": world, "step": tr.step, "seen": RecordingDataset.seen,
    "sampler_batches": [[list(k) for k in b] for b in sampler_batches],
    "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
    "losses": [m["loss"] for m in hist]}))
tr.acc.wait_for_everyone()
tr.acc.end_training()
