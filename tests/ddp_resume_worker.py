"""Run under torchrun: `train` on a tiny config with a fault on some ranks; each rank writes
the error it stopped with ("ok" if none) to BASE/rank<R>.txt. Used by
tests/test_resume_and_faults.py.

    torchrun --nproc_per_node 2 tests/ddp_resume_worker.py BASE MODE KEY=VALUE...

MODE node_local: each rank works in its own folder BASE/node<R>, so a relative
train.run_dir is storage only that rank sees (as runs/ on each machine's local disk).
MODE disk_full: rank 0's checkpoint writes fail with ENOSPC.
"""

import errno
import os
import sys
from pathlib import Path

from llmfn import checkpoint as ckpt
from llmfn.config import load_config
from llmfn.trainer import train


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def main(base: Path, mode: str, overrides: list[str]) -> None:
    rank = int(os.environ["RANK"])
    if mode == "node_local":
        (base / f"node{rank}").mkdir(exist_ok=True)
        os.chdir(base / f"node{rank}")
    if mode == "disk_full" and rank == 0:
        ckpt.save_checkpoint = disk_full
    try:
        train(load_config(None, overrides, {}))
        outcome = "ok"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
    (base / f"rank{rank}.txt").write_text(outcome)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
