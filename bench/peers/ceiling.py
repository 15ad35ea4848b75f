"""The ceiling row of bench/compare.py: Twisted and Autobahn alone, no Redis.

    python bench/peers/ceiling.py [PORT]

A bare Autobahn WebSocket server as a newcomer would write it, with
Autobahn's defaults: it greets an SDK socket with ``connected``, answers a
well-shaped ``auth`` with ``auth_success`` (no key check), parses each
pageview with the standard library's json, checks the fields bklit checks
(types, lengths, control characters, an http(s) page URL, integer sizes),
builds the record as a dict shaped like bklit's stream entry, and acks with
``{"type":"ack","eventId":...}``.  Nothing is stored or broadcast, so what it
costs per event is what Twisted, Autobahn and that parsing cost.  It does not
import bklit.  Prints "listening PORT" on stdout once it accepts connections.
"""

import json
import re
import sys
import time
import uuid
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
TEXT_FIELDS = {"timestamp": 512, "referrer": 2048, "referrerHostname": 512, "referrerType": 512,
               "userAgent": 1024, "language": 512, "timezone": 512, "projectId": 512, "sessionId": 512,
               "landingPage": 2048, "title": 512}


class Refused(Exception):
    """A frame that bklit would answer with an error."""


def text(data: dict, key: str, limit: int) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or FORBIDDEN.search(value):
        raise Refused(key)
    return value


def size(data: dict, key: str) -> tuple[int, int]:
    value = data.get(key)
    if value is None:
        return 0, 0
    sizes = [value.get(name) if isinstance(value, dict) else None for name in ("width", "height")]
    if any(type(n) is not int or not 0 <= n <= 100_000 for n in sizes):
        raise Refused(key)
    return sizes[0], sizes[1]


def record(data: dict, project: str, session: str) -> dict:
    """The stream entry's shape: table and row, every column from the frame."""
    url = text(data, "url", 2048)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("url")
    if not isinstance(data.get("isNewVisitor", False), bool):
        raise Refused("isNewVisitor")
    row = {name: text(data, name, limit) for name, limit in TEXT_FIELDS.items()}
    (row["viewport_width"], row["viewport_height"]), (row["screen_width"], row["screen_height"]) = (
        size(data, "viewport"), size(data, "screen"))
    row.update(id=str(uuid.uuid4()), project_id=project, session_id=session, received_at=time.time(),
               url=url, path=parts.path, is_new_visitor=int(bool(data.get("isNewVisitor"))))
    return {"table": "page_view_event", "row": row}


class Sdk(WebSocketServerProtocol):
    """Greets, authenticates any well-shaped key, acks each valid pageview."""

    def onConnect(self, request) -> None:
        params = request.params
        self.project = (params.get("projectId") or [""])[0]
        self.session = (params.get("sessionId") or [""])[0]

    def onOpen(self) -> None:
        self.sendMessage(json.dumps({"type": "connected", "projectId": self.project, "sessionId": self.session,
                                     "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = json.loads(payload)
            kind = message.get("type")
            if kind == "auth" and isinstance(message.get("apiKey"), str) and message["apiKey"]:
                self.sendMessage(b'{"type":"auth_success"}')
                return
            if kind != "pageview" or not isinstance(message.get("data"), dict):
                raise Refused("type")
            entry = record(message["data"], self.project, self.session)
        except (ValueError, AttributeError, Refused):
            self.sendMessage(b'{"type":"error","code":"bad_message","message":"refused"}')
            return
        self.sendMessage(json.dumps({"type": "ack", "eventId": entry["row"]["id"],
                                     "messageType": "pageview"}, separators=(",", ":")).encode())


def main() -> None:
    factory = WebSocketServerFactory()
    factory.protocol = Sdk
    factory.setProtocolOptions(maxMessagePayloadSize=16384)
    port = reactor.listenTCP(int(sys.argv[1]) if len(sys.argv) > 1 else 0, factory, interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
