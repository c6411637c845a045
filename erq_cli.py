"""The `erq` command: a thin dispatcher.

`quantize` and `evaluate` go to the engine (erq_core); `serve`, `api`, `worker` and `admin`
go to the service side; `submit`, `jobs`, `datasets` and `models` to the HTTP client (erq_client). Each side parses its own arguments.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

COMMANDS = {
    "quantize": ("erq_core.cli", "quantize_main", "quantize a model (the paper's test_quant.py)"),
    "evaluate": ("erq_core.cli", "evaluate_main", "evaluate a saved quantized model"),
    "export": ("erq_core.cli", "export_main", "write a saved quantized model as ONNX"),
    "serve": ("service.cli", "serve_main", "run API and an embedded worker on this machine"),
    "api": ("service.cli", "api_main", "run the REST API alone"),
    "worker": ("worker.cli", "worker_main", "run a Celery worker alone"),
    "admin": ("service.cli", "admin_main", "manage owners and their API keys"),
    "migrate": ("service.cli", "migrate_main", "apply the database migrations and exit"),
    "submit": ("erq_client.cli", "submit_main", "submit a job to an erq service (--wait, --out DIR)"),
    "jobs": ("erq_client.cli", "jobs_main", "list, show, cancel, delete jobs of an erq service; logs; downloads"),
    "datasets": ("erq_client.cli", "datasets_main", "upload, list, show, delete datasets on an erq service"),
    "models": ("erq_client.cli", "models_main", "upload, list, show, delete uploaded models on an erq service"),
}


def _usage() -> str:
    lines = ["usage: erq COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'erq COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"erq: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[command]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
