"""A minimal MCP server over stdio for the Codex test (tests/integration/test_agent_clis.py): newline-delimited
JSON-RPC 2.0, one tool, `write_marker`, which writes its `text` (and a newline) to the file given as argv[1]."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TOOL = {
    "name": "write_marker",
    "description": "Write the marker file.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}


def answer(request: dict[str, Any], marker: Path) -> dict[str, Any]:
    """The result of a request, or its error."""
    method, params = request.get("method"), request.get("params") or {}
    if method == "initialize":
        info = {"name": "marker", "version": "1.0.0"}
        return {
            "result": {"protocolVersion": params["protocolVersion"], "capabilities": {"tools": {}}, "serverInfo": info}
        }
    if method == "tools/list":
        return {"result": {"tools": [TOOL]}}
    if method == "tools/call":
        text = params["arguments"]["text"]
        marker.write_text(f"{text}\n")
        return {"result": {"content": [{"type": "text", "text": f"wrote {text}"}], "isError": False}}
    if method == "ping":
        return {"result": {}}
    return {"error": {"code": -32601, "message": f"Method not found: {method}"}}


def main() -> None:
    marker = Path(sys.argv[1])
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if "id" not in request:  # a notification: nothing to answer
            continue
        reply = {"jsonrpc": "2.0", "id": request["id"], **answer(request, marker)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
