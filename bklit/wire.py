"""The SDK wire protocol: parse inbound JSON frames, build outbound messages.

Pure code, no I/O. ``parse_message`` turns one text frame into an ``Auth``,
``PageView`` or ``Event`` record, or raises ``ProtocolError`` carrying one of
``ERROR_CODES`` and a message that names the offending field but never echoes
client values (so never an API key). The builders at the end return the
compact UTF-8 JSON bytes of one server message.
"""

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

ERROR_CODES = frozenset({
    "bad_json", "bad_message", "unknown_type", "too_large", "rate_limited",
    "unauthorized", "project_mismatch", "overloaded", "not_stored", "project_limit",
})
MAX_API_KEY_LENGTH = 256
MAX_TRACKING_ID_LENGTH = 128
MAX_EVENT_TYPE_LENGTH = 64
MAX_DIMENSION = 100_000
MAX_DEPTH = 32

_PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SESSION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_FORBIDDEN_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # controls, surrogates
_EPOCH = datetime(1970, 1, 1)


class ProtocolError(Exception):
    """A refused message: ``code`` is one of ERROR_CODES, ``message`` is safe to send back."""

    def __init__(self, code: str, message: str):
        """Record the code and message; an unknown code is a programming error (ValueError)."""
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        """Render as ``code: message``."""
        return f"{self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits applied by parse_message (defaults as the README's Protocol section lists them)."""

    max_message_bytes: int = 16384
    max_url_length: int = 2048
    max_string_length: int = 512
    max_metadata_bytes: int = 4096
    max_user_agent_length: int = 1024


@dataclass(frozen=True, slots=True)
class Auth:
    """An ``auth`` message: the ingest key the client presents."""

    api_key: str


@dataclass(frozen=True, slots=True)
class PageView:
    """A validated ``pageview`` message; absent optional fields are None."""

    api_key: str | None
    url: str
    timestamp: str | None = None
    referrer: str | None = None
    referrer_hostname: str | None = None
    referrer_type: str | None = None
    user_agent: str | None = None
    viewport_width: int | None = None
    viewport_height: int | None = None
    screen_width: int | None = None
    screen_height: int | None = None
    language: str | None = None
    timezone: str | None = None
    project_id: str | None = None
    session_id: str | None = None
    is_new_visitor: bool | None = None
    landing_page: str | None = None
    title: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A validated custom ``event`` message; metadata is a JSON object (default empty)."""

    api_key: str | None
    tracking_id: str
    event_type: str
    timestamp: str | None = None
    metadata: dict = field(default_factory=dict)
    project_id: str | None = None
    session_id: str | None = None


def _bad(message: str) -> ProtocolError:
    """Build a bad_message error."""
    return ProtocolError("bad_message", message)


def _object_without_duplicates(pairs: list) -> dict:
    """json object hook: build the dict, refusing repeated keys (bad_message)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _bad("JSON object has a duplicate key")
    return result


def _reject_constant(name: str):
    """json constant hook: NaN, Infinity and -Infinity are not JSON (bad_json)."""
    raise ProtocolError("bad_json", "numbers must be finite")


def _finite_float(text: str) -> float:
    """json float hook: refuse numbers that overflow to infinity, e.g. 1e400 (bad_json)."""
    value = float(text)
    if not math.isfinite(value):
        _reject_constant(text)
    return value


def _too_deep(value, levels_left: int = MAX_DEPTH) -> bool:
    """True when a parsed JSON value nests containers more than MAX_DEPTH levels deep."""
    if isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, list):
        return False
    return levels_left == 0 or any(_too_deep(child, levels_left - 1) for child in value)


_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates,
                            parse_constant=_reject_constant, parse_float=_finite_float)


def _decode(payload, limits: Limits):
    """Check size, UTF-8 and JSON syntax of a frame; return the parsed value."""
    if isinstance(payload, str) and len(payload) <= limits.max_message_bytes:
        payload = payload.encode("utf-8", "surrogatepass")  # lone surrogates fail decoding
    if not isinstance(payload, (bytes, bytearray, str)):
        raise _bad("message must be a text frame")
    if len(payload) > limits.max_message_bytes:
        raise ProtocolError("too_large", "message is too large")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad_json", "message is not valid UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise _bad("JSON is nested too deeply") from None
    except ValueError:
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    # Fewer brackets than the limit cannot nest deeper (a usual message has
    # a handful): only then is the parsed value walked.
    if text.count("{") + text.count("[") > MAX_DEPTH and _too_deep(value):
        raise _bad("JSON is nested too deeply")
    return value


def _string(data: dict, key: str, path: str, max_length: int,
            required: bool = False) -> str | None:
    """Return a string field checked for type, length, controls and lone surrogates.

    Absent or null gives None, unless required: then it must be a non-empty string.
    """
    value = data.get(key)
    if value is None:
        if required:
            raise _bad(f"{path} is required")
        return None
    if not isinstance(value, str):
        raise _bad(f"{path} must be a string")
    if required and not value:
        raise _bad(f"{path} must not be empty")
    if len(value) > max_length:
        raise _bad(f"{path} must be at most {max_length} characters")
    if _FORBIDDEN_CHARACTERS.search(value):
        raise _bad(f"{path} must not contain control characters or lone surrogates")
    return value


def _require_http_url(value: str, path: str) -> str:
    """Refuse a URL whose scheme is not http(s) or that has no host."""
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        host = None
    if not host or parts.scheme not in ("http", "https"):
        raise _bad(f"{path} must be an http(s) URL")
    return value


def _referrer(value: str | None) -> str | None:
    """Keep an http(s) or ``android-app://`` referrer; drop any other.

    A referrer is the browser's word about where the visitor came from, not
    the page itself: Chrome on Android reports ``android-app://<package>/``
    for links opened from apps, and odd schemes are not worth refusing the
    pageview for.  They are dropped, so only web and app referrers are stored.
    """
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return None
    if host and parts.scheme in ("http", "https", "android-app"):
        return value
    return None


def _dimensions(data: dict, key: str, path: str) -> tuple[int | None, int | None]:
    """Return (width, height) of an optional ``{width, height}`` object of integers."""
    value = data.get(key)
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise _bad(f"{path} must be an object")
    sizes = []
    for name in ("width", "height"):
        size = value.get(name)
        if type(size) is not int:  # bool is a subclass of int and is refused
            raise _bad(f"{path}.{name} must be an integer")
        if not 0 <= size <= MAX_DIMENSION:
            raise _bad(f"{path}.{name} must be between 0 and {MAX_DIMENSION}")
        sizes.append(size)
    return sizes[0], sizes[1]


def _api_key(message: dict, required: bool) -> str | None:
    """Return the message's ``apiKey``; optional on ingest messages, where empty means absent."""
    return _string(message, "apiKey", "apiKey", MAX_API_KEY_LENGTH, required=required) or None


def _data(message: dict) -> dict:
    """Return the ``data`` object of an ingest message."""
    if not isinstance(message.get("data"), dict):
        raise _bad("data must be an object")
    return message["data"]


def _parse_pageview(message: dict, limits: Limits) -> PageView:
    """Validate a pageview message into a PageView record."""
    data = _data(message)
    url_max, text_max = limits.max_url_length, limits.max_string_length
    url = _require_http_url(_string(data, "url", "data.url", url_max, required=True), "data.url")
    referrer = _referrer(_string(data, "referrer", "data.referrer", url_max) or None)
    viewport = _dimensions(data, "viewport", "data.viewport")
    screen = _dimensions(data, "screen", "data.screen")
    is_new_visitor = data.get("isNewVisitor")
    if is_new_visitor is not None and not isinstance(is_new_visitor, bool):
        raise _bad("data.isNewVisitor must be a boolean")

    def text(key: str, max_length: int = text_max) -> str | None:
        """Read an optional string field of data."""
        return _string(data, key, f"data.{key}", max_length)

    return PageView(
        api_key=_api_key(message, required=False), url=url,
        timestamp=text("timestamp"), referrer=referrer,
        referrer_hostname=text("referrerHostname"), referrer_type=text("referrerType"),
        user_agent=text("userAgent", limits.max_user_agent_length),
        viewport_width=viewport[0], viewport_height=viewport[1],
        screen_width=screen[0], screen_height=screen[1],
        language=text("language"), timezone=text("timezone"),
        project_id=text("projectId"), session_id=text("sessionId"),
        is_new_visitor=is_new_visitor,
        landing_page=text("landingPage", url_max), title=text("title"))


def _parse_event(message: dict, limits: Limits) -> Event:
    """Validate an event message into an Event record."""
    data, text_max = _data(message), limits.max_string_length
    metadata = data.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise _bad("data.metadata must be an object")
    try:
        encoded = json.dumps(metadata, separators=(",", ":"), sort_keys=True,
                             ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise _bad("data.metadata must be valid Unicode") from None
    if len(encoded) > limits.max_metadata_bytes:
        raise ProtocolError("too_large", "data.metadata is too large")

    def text(key: str, max_length: int = text_max, required: bool = False) -> str | None:
        """Read a string field of data."""
        return _string(data, key, f"data.{key}", max_length, required)

    return Event(
        api_key=_api_key(message, required=False),
        tracking_id=text("trackingId", MAX_TRACKING_ID_LENGTH, required=True),
        event_type=text("eventType", MAX_EVENT_TYPE_LENGTH, required=True),
        timestamp=text("timestamp"), metadata=metadata,
        project_id=text("projectId"), session_id=text("sessionId"))


def parse_message(payload: bytes | str, limits: Limits = Limits()) -> Auth | PageView | Event:
    """Parse one client frame into a record; raise ProtocolError (and nothing else) when refused."""
    message = _decode(payload, limits)
    if not isinstance(message, dict):
        raise _bad("message must be a JSON object")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise _bad("type must be a string")
    if kind == "auth":
        return Auth(api_key=_api_key(message, required=True))
    if kind == "pageview":
        return _parse_pageview(message, limits)
    if kind == "event":
        return _parse_event(message, limits)
    raise ProtocolError("unknown_type", "unknown message type")


def valid_project_id(value: str) -> bool:
    """True when value is 1-64 characters of [A-Za-z0-9_-]."""
    return isinstance(value, str) and _PROJECT_ID.fullmatch(value) is not None


def valid_session_id(value: str) -> bool:
    """True when value is 1-128 characters of [A-Za-z0-9_.:-]."""
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None


def iso_timestamp(epoch_seconds: float) -> str:
    """Format epoch seconds as ISO 8601 UTC with milliseconds and Z, rounded to the millisecond."""
    seconds, ms = divmod(round(epoch_seconds * 1000), 1000)
    if seconds != _last_second[0]:  # most calls fall in the same second as the one before
        text = (_EPOCH + timedelta(seconds=seconds)).isoformat(timespec="seconds")
        _last_second[:] = [seconds, text]
    return f"{_last_second[1]}.{ms:03d}Z"


_last_second: list = [None, ""]
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _encode(message: dict) -> bytes:
    """Serialize one outbound message as compact JSON bytes (ASCII, hence valid UTF-8)."""
    return _ENCODER.encode(message).encode("utf-8")


def connected(project_id: str, session_id: str | None, now: float) -> bytes:
    """The greeting sent on open; sessionId is omitted for dashboards (session_id None)."""
    message = {"type": "connected", "projectId": project_id}
    if session_id is not None:
        message["sessionId"] = session_id
    message["timestamp"] = iso_timestamp(now)
    return _encode(message)


def auth_success() -> bytes:
    """The reply to an accepted auth message."""
    return _encode({"type": "auth_success"})


def ack(event_id: str, message_type: str) -> bytes:
    """The acknowledgement of a durably queued pageview or event (both names are the server's
    own, needing no JSON escapes)."""
    return b'{"type":"ack","eventId":"%s","messageType":"%s"}' % (event_id.encode(), message_type.encode())


def error(code: str, message: str) -> bytes:
    """An error message; code must be one of ERROR_CODES (ValueError otherwise)."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return _encode({"type": "error", "code": code, "message": message})
