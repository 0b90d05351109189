// Drives switchboard with node's socket.io-client, the way the OpenHands frontend connects.
// Usage: node node_client.mjs BASE_URL CONVERSATION_ID
// Prints one JSON line with what it saw; exits non-zero on any failure.
import { io } from "socket.io-client";

const [base, conversationId] = process.argv.slice(2);

function session(latestEventId, send) {
  return new Promise((resolve, reject) => {
    const received = [];
    let replayed = false;
    const socket = io(base, {
      transports: ["websocket"],
      reconnection: false,
      query: {
        conversation_id: conversationId,
        latest_event_id: latestEventId,
        providers_set: "",
        session_api_key: null,
      },
    });
    const timer = setTimeout(() => {
      socket.close();
      reject(new Error(`timed out; received ${JSON.stringify(received)}`));
    }, 10000);
    const finish = () => {
      clearTimeout(timer);
      socket.close();
      resolve(received);
    };
    socket.on("connect_error", (err) => {
      clearTimeout(timer);
      reject(new Error(`connect_error: ${err.message}`));
    });
    socket.on("oh_event", (payload) => {
      received.push(payload);
      if (payload.status_update && !replayed) {
        replayed = true;
        if (!send) return finish();
        socket.emit("oh_user_action", {
          action: "message",
          args: { content: send, image_urls: [], file_urls: [], timestamp: new Date().toISOString() },
        });
      }
      if (send && payload.source === "agent" && payload.args?.content === send) finish();
    });
  });
}

try {
  const first = await session(-1, "hello from node");
  const ids = first.filter((p) => Number.isInteger(p.id)).map((p) => p.id);
  ids.forEach((id, i) => {
    if (id !== i) throw new Error(`ids not dense and ordered: ${ids}`);
  });
  const last = ids[ids.length - 1];
  const second = await session(last - 2);
  const again = second.filter((p) => Number.isInteger(p.id)).map((p) => p.id);
  // Only what was missed: from last - 1 on, dense (events after `last` may have arrived since).
  if (again.length < 2 || again.some((id, i) => id !== last - 1 + i)) {
    throw new Error(`reconnect replayed ${again}, expected ${last - 1}, ${last}, …`);
  }
  console.log(JSON.stringify({ ok: true, events: ids.length, reconnect: again }));
  process.exit(0);
} catch (e) {
  console.error(e.message);
  process.exit(1);
}
