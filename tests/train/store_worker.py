"""torchrun --nproc_per_node N tests/train/store_worker.py DATA OUT: every rank (a gloo group) builds the training
dataset of DATA at the same moment, through the record store, and writes OUT/rank{R}.json: whether it built the
store, where it is, and its samples' ids."""

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    data, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    from medm.data.dataset import DataArgs, build_dataset
    from medm.models import build_model
    from medm.models.tiny import tiny_model_config

    torch.manual_seed(0)
    model, tok = build_model(tiny_model_config())
    dist.barrier()  # every rank reaches the store together
    ds = build_dataset(DataArgs(path=data, image_dir=os.path.dirname(data)), model, tok)
    rank = dist.get_rank()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"built": ds.samples.built, "path": ds.samples.path, "ids": [list(s.ids) for s in ds.samples]}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
