"""``python -m mtl.distributed worker SPEC_JSON``: the command torchrun starts each worker with."""
import sys

from mtl.distributed.worker import worker_main

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "worker":
        sys.exit("usage: python -m mtl.distributed worker SPEC_JSON (started by torchrun; see "
                 "mtl.distributed.launch)")
    worker_main(sys.argv[2])
