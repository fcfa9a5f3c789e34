"""Records which files a stage process opens, for the stage-contract check of tests/test_pipeline_e2e.py.

Python imports `sitecustomize` at startup from the first directory on sys.path that has one, so the end-to-end
test puts this directory on PYTHONPATH and names a log directory in STAGE_AUDIT_DIR. In a process started as
`python -m stages.<name> ...` it adds an audit hook (PEP 578) that sees every `open` made through Python, and at exit
writes {"argv", "read", "written"} with the paths relative to the working directory (the repository). A file written
under a temporary name and renamed into place (pipeline/io.py's atomic writes) is recorded under its final name.
Files opened by native code (safetensors, the Rust tokenizers) are not seen; the import check covers modules.
"""

import os
import sys

_LOG_DIR = os.environ.get("STAGE_AUDIT_DIR")
_ARGV = sys.orig_argv[1:]

if _LOG_DIR and _ARGV[:1] == ["-m"] and len(_ARGV) > 1 and _ARGV[1].startswith("stages."):
    import atexit
    import json

    _ROOT = os.getcwd()
    _opened: list[tuple[str, bool]] = []
    _renamed: list[tuple[str, str]] = []

    def _relative(path) -> str | None:
        if isinstance(path, int):
            return None  # an already open file descriptor
        absolute = os.path.abspath(os.fsdecode(path))
        return os.path.relpath(absolute, _ROOT) if absolute.startswith(_ROOT + os.sep) else None

    def _hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            relative = _relative(path)
            reads = not (any(c in mode for c in "wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if reads and relative is not None and not os.path.exists(relative):
                relative = None  # opened relative to a directory descriptor (dir_fd), or not found: not a path from here
            if relative is not None:
                _opened.append((relative, not reads))
        elif event in ("os.rename", "os.replace"):
            source, destination = _relative(args[0]), _relative(args[1])
            if source is not None and destination is not None:
                _renamed.append((source, destination))

    def _final_name(path: str) -> str:
        for source, destination in _renamed:  # in order: a file renamed, then its directory renamed
            if path == source or path.startswith(source + os.sep):
                path = destination + path[len(source):]
        return path

    def _write_log() -> None:
        read = sorted({_final_name(p) for p, writes in _opened if not writes})
        written = sorted({_final_name(p) for p, writes in _opened if writes})
        with open(os.path.join(_LOG_DIR, f"{os.getpid()}.json"), "w") as handle:
            json.dump({"argv": _ARGV, "read": read, "written": written}, handle)

    sys.addaudithook(_hook)
    atexit.register(_write_log)
