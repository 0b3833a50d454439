"""Run under torchrun: the driver's validation pass over a synthetic data module, each rank
evaluating its share of the val batches; each rank writes the metrics and how many batches it
evaluated as JSON to OUT_FILE.rank<R>. Used by
tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/ddp_eval_worker.py OUT_FILE
"""

import json
import sys

from llmfn.distributed import init_process, shutdown
from tests.step_fixtures import validation_metrics


def main(out_file: str) -> None:
    proc = init_process("cpu", "gloo")
    metrics, batches = validation_metrics(proc)
    with open(f"{out_file}.rank{proc.rank}", "w") as out:
        json.dump({"metrics": metrics, "batches": batches}, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
