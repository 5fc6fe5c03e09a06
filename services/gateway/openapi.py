"""Write the gateway's OpenAPI document (``make openapi`` refreshes ``docs/openapi.json``).

python -m services.gateway.openapi [PATH]     # default: standard output
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from services.gateway.app import openapi_document


def render() -> str:
    """The document as committed: indented JSON, keys in the application's order, a final newline."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the document to the path given, or to standard output."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        Path(args[0]).write_text(render(), encoding="utf-8")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
