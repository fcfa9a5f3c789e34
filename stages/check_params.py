"""DVC stage `check_params`: validate the whole params.yaml before any work, and remove what stages that no longer
exist left behind.

It depends on the raw params.yaml, so `dvc repro` reruns it on any edit, even to a key no other stage declares, and a
typo fails the pipeline with one line instead of being silently ignored. A changed `train_seeds` or `models.students`
removes matrix stages: their outputs and dvc.lock entries are deleted here (pipeline/dvc_stages.py), before the
report could read them. (DVC refuses dvc.yaml itself as a dependency: after removing a stage from dvc.yaml by hand,
`dvc repro --force check_params` does the same.)
"""

import argparse

from pipeline.config import exit_on_user_error, load_params
from pipeline.dvc_stages import prune_removed_stages
from pipeline.io import atomic_write_text
from pipeline.tracking import StageRun


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="the marker file to write")
    arguments = parser.parse_args()
    with StageRun("check_params", {}):
        params = load_params("params.yaml")
        prune_removed_stages("dvc.lock")
    # Constant content: downstream stages depend on this file only for ordering, so they do not rerun.
    atomic_write_text(arguments.out, "params.yaml is valid\n")
    print(f"check_params: params.yaml is valid ({len(params.models.students)} student(s))")


if __name__ == "__main__":
    exit_on_user_error(main)
