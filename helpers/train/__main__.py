"""python -m helpers.train --profile tiny|full --variant vanilla|text_aware --output-dir DIR [...]: one training
run from a terminal (helpers.train.loop; `--help` lists every option). Run it again with the same DIR to resume.
A run that cannot go on ends with `error: <what, which file, what to do>`, without a traceback."""

from __future__ import annotations

from ..data.features import FeatureCacheError
from ..data.prepare import DataSourceError, PreparedDataMismatch
from ..support.disk import DiskFull
from ..support.env import quiet_libraries
from ..support.loading import LoadError
from ..support.lock import FolderInUse
from .config import parse_config
from .loop import TrainResult, train
from .run import TrainingError

# our errors, whose messages name the file and say what to do (PreparedDataDamaged is a PreparedDataMismatch;
# train() already turns DiskFull and FolderInUse into TrainingError)
STOPS = (TrainingError, PreparedDataMismatch, DataSourceError, FeatureCacheError, LoadError, DiskFull, FolderInUse)


def main(argv=None) -> TrainResult:
    quiet_libraries()  # the same harmless library noise the notebooks drop
    config = parse_config(argv, description="Fine-tune IP-Adapter Plus, vanilla or text-aware, from cached features, with Accelerate.")
    try:
        result = train(config)
    except STOPS as e:
        raise SystemExit(f"error: {e}") from None
    if result.adapter.is_file():
        print(f"Wrote {result.adapter} after {result.steps} steps ({result.seconds_per_step:.2f} s/step).")
    return result


if __name__ == "__main__":
    main()
