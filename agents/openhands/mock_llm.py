#!/usr/bin/env python3
"""A mock OpenAI-compatible LLM that drives OpenHands' CodeActAgent (standard library only).

For tests and benchmarks of the OpenHands adapter. `POST /v1/chat/completions`:

- when the last message is a tool result, it answers with a `finish` tool call;
- otherwise, when the latest user message says `run <command>`, with an `execute_bash` tool
  call running `<command>`;
- otherwise with a plain assistant message.

Every request is recorded with its Authorization header: `GET /requests` lists them.
`--port 0` picks a free port, printed as `mock-llm listening on 127.0.0.1:<port>` on stdout.
The adapter must use native tool calling (`LLM_NATIVE_TOOL_CALLING=true`): `openai/mock` is
not a model OpenHands knows to call tools.
"""

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REQUESTS = []
LOCK = threading.Lock()


def text_of(message):
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


def answer(request):
    messages = request.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        output = text_of(last).strip()
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_finish_{len(REQUESTS)}", "type": "function",
            "function": {"name": "finish",
                         "arguments": json.dumps({"message": f"Done. Output was: {output[:200]}"})},
        }]}
    # The workspace context arrives as a user message after the real one: find the request.
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        text = text_of(message).strip()
        if text.startswith("run "):
            return {"role": "assistant", "content": "I will run the command.", "tool_calls": [{
                "id": f"call_run_{len(REQUESTS)}", "type": "function",
                "function": {"name": "execute_bash",
                             "arguments": json.dumps({"command": text[4:], "is_input": "false"})},
            }]}
    return {"role": "assistant", "content": "Hello."}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/requests":
            with LOCK:
                self.reply(200, list(REQUESTS))
        else:
            self.reply(200, {"object": "list", "data": [{"id": "mock", "object": "model"}]})

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self.reply(400, {"error": {"message": "not JSON"}})
            return
        with LOCK:
            REQUESTS.append({"authorization": self.headers.get("authorization"),
                             "path": self.path, "body": request})
            message = answer(request)
        tool = bool(message.get("tool_calls"))
        self.reply(200, {
            "id": f"chatcmpl-{len(REQUESTS)}", "object": "chat.completion",
            "created": int(time.time()), "model": request.get("model", "mock"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if tool else "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
        })


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"mock-llm listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
