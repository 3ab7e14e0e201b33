"""python -m helpers.train --profile tiny|full --variant vanilla|text_aware --output-dir DIR [...]: one training
run from a terminal (helpers.train.loop; `--help` lists every option). Run it again with the same DIR to resume.
A run that cannot go on ends with `error: <what, which file, what to do>`, without a traceback. On several
GPUs: `accelerate launch -m helpers.train ...` (--batch-size is the global batch; notebook 03 starts this
through helpers.train.launch, which also passes --result-file for the TrainResult)."""

from __future__ import annotations

import argparse
import os

from ..data.features import FeatureCacheError
from ..data.prepare import DataSourceError, PreparedDataMismatch
from ..support.disk import DiskFull
from ..support.env import quiet_libraries
from ..support.loading import LoadError
from ..support.lock import FolderInUse
from .config import argument_parser, config_from_args
from .launch import RESULT_FLAG, write_result
from .loop import TrainResult, train
from .run import TrainingError

# our errors, whose messages name the file and say what to do (PreparedDataDamaged is a PreparedDataMismatch;
# train() already turns DiskFull and FolderInUse into TrainingError)
STOPS = (TrainingError, PreparedDataMismatch, DataSourceError, FeatureCacheError, LoadError, DiskFull, FolderInUse)


def main(argv=None) -> TrainResult:
    quiet_libraries()  # the same harmless library noise the notebooks drop
    ap = argument_parser("Fine-tune IP-Adapter Plus, vanilla or text-aware, from cached features, with Accelerate.")
    ap.add_argument(RESULT_FLAG, help=argparse.SUPPRESS)  # helpers.train.launch: the main process's TrainResult
    args = vars(ap.parse_args(argv))
    result_file = args.pop("result_file")
    config = config_from_args(args, ap)
    try:
        result = train(config)
    except STOPS as e:
        raise SystemExit(f"error: {e}") from None
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun (accelerate launch) sets RANK
    if result_file and main_process:
        write_result(result_file, result)
    if result.adapter.is_file() and main_process:
        print(f"Wrote {result.adapter} after {result.steps} steps ({result.seconds_per_step:.2f} s/step).")
    return result


if __name__ == "__main__":
    main()
