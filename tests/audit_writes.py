"""Runs `python -m jaxllm.main ARGS...` in this process and logs every file it creates,
writes, renames or removes under WATCH, one JSON line each, to LOG — a Python audit hook
(PEP 578), so the tests see what each of several processes wrote to a shared run directory.

    python -m tests.audit_writes LOG WATCH ARGS...

Native writers (tensorstore's checkpoint shards) are not seen; the tests only use the log to
check that the Python-written run files come from process 0.
"""

import json
import os
import runpy
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main() -> None:
    log_path, watch = sys.argv[1], os.path.abspath(sys.argv[2])
    log = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives on)

    def record(kind: str, path) -> None:
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if not isinstance(path, str | os.PathLike):
            return
        path = os.path.abspath(os.fspath(path))
        if path == watch or path.startswith(watch + os.sep):
            log.write(json.dumps({"op": kind, "path": os.path.relpath(path, watch)}) + "\n")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else None
            if writes is None:
                writes = bool((flags or 0) & _WRITE_FLAGS)
            if writes:
                record("write", path)
        elif event in ("os.rename", "os.link", "os.symlink"):
            record(event, args[1])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            record(event, args[0])

    sys.addaudithook(hook)
    sys.argv = ["jaxllm.main", *sys.argv[3:]]
    runpy.run_module("jaxllm.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
