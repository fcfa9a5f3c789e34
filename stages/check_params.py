"""DVC stage `check_params`: validate the whole params.yaml before any work.

It depends on the raw file, so `dvc repro` reruns it on any edit, even to a key no other stage declares,
and a typo fails the pipeline with one line instead of being silently ignored.
"""

from pipeline.config import exit_on_user_error, load_params
from pipeline.io import atomic_write_text
from pipeline.tracking import StageRun


def main() -> None:
    with StageRun("check_params", {}):
        params = load_params("params.yaml")
    # Constant content: downstream stages depend on this file only for ordering, so they do not rerun.
    atomic_write_text("checks/params.ok", "params.yaml is valid\n")
    print(f"check_params: params.yaml is valid ({len(params.models.students)} student(s))")


if __name__ == "__main__":
    exit_on_user_error(main)
