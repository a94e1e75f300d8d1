"""Two dino.txt steps on a fixed global batch, in any number of processes (python or `accelerate launch`).

Usage: align_ddp.py OUT DATA LOSS (clip, sigmoid, or clip+topk: with the per-patch term, k = 2). Each rank writes
OUT/rank<r>.json (losses per step, world size) and
OUT/rank<r>.safetensors (the gradients of step 1 as `grad1.<name>`, the weights after step 2 as `final.<name>`).
The script asserts nothing: tests/test_text.py compares one process with two.
"""
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

torch.set_num_threads(1)
from dino_from_scratch.config import get_recipe  # noqa: E402
from dino_from_scratch.eval import random_backbone  # noqa: E402
from dino_from_scratch.text import AlignConfig, AlignTrainer, load_captions  # noqa: E402

out, data, loss = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
loss, patch_loss = (sys.argv[3].split("+") + ["none"])[:2]
out.mkdir(parents=True, exist_ok=True)
cfg = AlignConfig(batch_size=8, steps=2, warmup_steps=1, lr=3e-3, head_drop_path=0.0, image_size=64, text_dim=32, text_heads=2,
                  text_layers=1, vocab_size=300, context_length=16, loss=loss, log_every=1, ckpt_every=100,
                  patch_loss=patch_loss, patch_loss_topk=2)
backbone = random_backbone(get_recipe("tiny_v2"), seed=0)
tr = AlignTrainer(cfg, backbone, load_captions(data, "train"), out/"run", cache_dir=out/"cache", verbose=False, progress=False)
losses, tensors = [], {}
for step in range(2):
    m = tr.train_step()
    losses.append(m["loss"])
    if step == 0:
        tensors |= {f"grad1.{n}": p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}
tensors |= {f"final.{n}": p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
r = tr.acc.process_index
save_file({k: v.contiguous() for k, v in tensors.items()}, str(out/f"rank{r}.safetensors"))
(out/f"rank{r}.json").write_text(json.dumps({"rank": r, "world": tr.acc.num_processes, "losses": losses,
                                             "tokenizer": tr.tokenizer.to_json()}))
tr.acc.wait_for_everyone()
