"""The DVC stages: one module per stage, which dvc.yaml runs as `python -m stages.<name>`.

DVC's shell runs whichever `python` comes first on PATH. Started as `.venv/bin/dvc repro`, without the virtual
environment activated, that is the system's, which lacks the project's packages: every stage used to fail with a
ModuleNotFoundError traceback. So importing this package checks first. Where the repository's own .venv exists, the
stage reruns under it, saying so in one line; otherwise it stops with one line that says what to do.
"""

import importlib.util
import os
import sys
from pathlib import Path

REQUIRED_PACKAGES = ("torch", "transformers", "deepspeed", "dvc", "mlflow", "pydantic")

_missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
if _missing:
    _venv = Path(__file__).resolve().parents[1] / ".venv"
    _venv_python = _venv / "bin" / "python"
    if _venv_python.is_file() and Path(sys.prefix).resolve() != _venv.resolve():
        print(f"{sys.executable} lacks {', '.join(_missing)}: running the stage under {_venv_python}", file=sys.stderr)
        os.execv(_venv_python, [str(_venv_python), *sys.orig_argv[1:]])
    sys.exit(f"error: {sys.executable} lacks the project's packages ({', '.join(_missing)}): run `make repro` once "
             "to create .venv, then `source .venv/bin/activate` before running dvc")
