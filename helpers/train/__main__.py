"""python -m helpers.train --profile tiny|full --variant vanilla|text_aware --output-dir DIR [...]: one training
run from a terminal (helpers.train.loop; `--help` lists every option). Run it again with the same DIR to resume."""

from __future__ import annotations

from ..data.prepare import DataSourceError, PreparedDataMismatch
from ..support.env import quiet_libraries
from .config import parse_config
from .loop import TrainResult, train
from .run import TrainingError


def main(argv=None) -> TrainResult:
    quiet_libraries()  # the same harmless library noise the notebooks drop
    config = parse_config(argv, description="Fine-tune IP-Adapter Plus, vanilla or text-aware, from cached features, with Accelerate.")
    try:
        result = train(config)
    except (TrainingError, PreparedDataMismatch, DataSourceError) as e:
        raise SystemExit(f"error: {e}") from None
    if result.adapter.is_file():
        print(f"Wrote {result.adapter} after {result.steps} steps ({result.seconds_per_step:.2f} s/step).")
    return result


if __name__ == "__main__":
    main()
