"""Drives switchboard with the python-socketio client, the way the OpenHands frontend connects.

Usage: python_client.py BASE_URL CONVERSATION_ID
Prints one JSON line with what it saw; exits non-zero on any failure.
"""
import json
import sys
import threading

import socketio


def session(base, conversation_id, latest_event_id, send=None):
    """Connects, collects the replay up to the status update, optionally sends a message and
    waits for its echo, then disconnects. Returns the payloads received."""
    received = []
    replay_done = threading.Event()
    echoed = threading.Event()
    sio = socketio.Client(reconnection=False)

    @sio.on("oh_event")
    def on_event(payload):
        received.append(payload)
        if payload.get("status_update"):
            replay_done.set()
        if send and payload.get("source") == "agent" and payload.get("args", {}).get("content") == send:
            echoed.set()

    url = (
        f"{base}?conversation_id={conversation_id}&latest_event_id={latest_event_id}"
        "&providers_set=&session_api_key=null"
    )
    sio.connect(url, transports=["websocket"], socketio_path="socket.io", wait_timeout=10)
    if not replay_done.wait(10):
        raise SystemExit(f"no status update after the replay: {received}")
    if send:
        sio.emit("oh_user_action", {"action": "message", "args": {
            "content": send, "image_urls": [], "file_urls": [], "timestamp": "2026-01-01T00:00:00"}})
        if not echoed.wait(10):
            raise SystemExit(f"no echo for {send!r}: {received}")
    sio.disconnect()
    return received


def main():
    base, conversation_id = sys.argv[1], sys.argv[2]
    first = session(base, conversation_id, -1, send="hello from python")
    ids = [p["id"] for p in first if isinstance(p.get("id"), int)]
    if ids != list(range(len(ids))):
        raise SystemExit(f"ids not dense and ordered: {ids}")
    last = ids[-1]
    # Reconnect: only what was missed since `last - 2`.
    second = session(base, conversation_id, last - 2)
    again = [p["id"] for p in second if isinstance(p.get("id"), int)]
    # Only what was missed: from last - 1 on, dense (events after `last` may have arrived since).
    if len(again) < 2 or again != list(range(last - 1, last - 1 + len(again))):
        raise SystemExit(f"reconnect replayed {again}, expected {last - 1}, {last}, ...")
    print(json.dumps({"ok": True, "events": len(ids), "reconnect": again}))


if __name__ == "__main__":
    main()
