"""A stand-in stage, run the way DVC runs stages: `python -m tests.ddp_relaunch_probe OUT_DIR --start NAME`.

With num_procs 2 it relaunches itself under torchrun; each rank then writes its world size and the `--start` it was
given to OUT_DIR/rank<r>. `--start` is the distillation stages' own argument, and a prefix of torchrun's
`--start-method`: the relaunch must pass it through to the stage.
"""

import argparse
import os
from pathlib import Path

from pipeline import engine
from pipeline.config import EngineConfig


def main() -> None:
    engine.relaunch_if_data_parallel(
        EngineConfig(num_procs=2, launcher="torchrun", device="cpu", precision="fp32", zero_stage=0)
    )
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--start", required=True)
    arguments = parser.parse_args()
    (arguments.out_dir / f"rank{os.environ['RANK']}").write_text(f"{os.environ['WORLD_SIZE']} {arguments.start}")


if __name__ == "__main__":
    main()
