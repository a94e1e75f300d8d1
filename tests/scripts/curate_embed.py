"""Embed an image folder under `accelerate launch` (each rank its shard, rank 0 gathers): used by tests/test_curate.py.

usage: accelerate launch ... curate_embed.py OUT_DIR IMAGE_FOLDER
"""
import sys

import torch
from accelerate import Accelerator

from dino_from_scratch.curate import embed_pool, image_pool, load_embedder

if __name__ == "__main__":
    out, folder = sys.argv[1:3]
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    model, size, eid = load_embedder("random:tiny_v2")          # seeded: the same weights on every rank
    e = embed_pool(model, image_pool([folder]), out, size, batch_size=8, accelerator=acc, embedder_id=eid, progress=False)
    print(f"rank {acc.process_index}/{acc.num_processes}: {e}", flush=True)
