"""A stand-in stage, run the way DVC runs stages: `python -m tests.ddp_relaunch_probe OUT_DIR`.

With num_procs 2 it relaunches itself under torchrun; each rank then writes its world size to OUT_DIR/rank<r>.
"""

import os
import sys
from pathlib import Path

from pipeline import engine
from pipeline.config import EngineConfig


def main() -> None:
    engine.relaunch_if_data_parallel(
        EngineConfig(num_procs=2, launcher="torchrun", device="cpu", precision="fp32", zero_stage=0)
    )
    out_dir = Path(sys.argv[1])
    (out_dir / f"rank{os.environ['RANK']}").write_text(os.environ["WORLD_SIZE"])


if __name__ == "__main__":
    main()
