"""The usual SDK messages decoded straight into typed structs (msgspec, C).

``parse_message`` answers exactly as ``bklit.wire.parse_message`` does: the
typed way only returns a record when the frame is a valid ``auth`` or
``pageview`` that the general parser would turn into the same record;
anything else (custom events, any error, any doubt) is left to
``wire.parse_message``, which then gives its own answer or error.

A doubt is, among others, a key the structs do not know, and a frame in
which the keys cannot be proven unique: the general parser refuses a
repeated key, msgspec keeps the last.  Every key of a frame without
whitespace before its colons ends in ``":``; when the frame holds exactly
as many ``":`` as the structs found keys, no key was repeated.
"""

from __future__ import annotations

import re

import msgspec
from msgspec import UNSET, Struct, UnsetType

from bklit import wire
from bklit.wire import MAX_API_KEY_LENGTH, MAX_DIMENSION, Auth, Event, Limits, PageView

Text = str | None | UnsetType

_SPACE_BEFORE_COLON = re.compile(rb'"\s+:')


class _Size(Struct, forbid_unknown_fields=True):
    width: int | UnsetType = UNSET
    height: int | UnsetType = UNSET


class _PageViewData(Struct, forbid_unknown_fields=True, rename="camel"):
    url: Text = UNSET
    timestamp: Text = UNSET
    referrer: Text = UNSET
    referrer_hostname: Text = UNSET
    referrer_type: Text = UNSET
    user_agent: Text = UNSET
    viewport: _Size | None | UnsetType = UNSET
    screen: _Size | None | UnsetType = UNSET
    language: Text = UNSET
    timezone: Text = UNSET
    project_id: Text = UNSET
    session_id: Text = UNSET
    is_new_visitor: bool | None | UnsetType = UNSET
    landing_page: Text = UNSET
    title: Text = UNSET


class _Message(Struct, forbid_unknown_fields=True, rename={"api_key": "apiKey"}):
    type: str | UnsetType = UNSET
    api_key: Text = UNSET
    data: _PageViewData | None | UnsetType = UNSET


_DECODER = msgspec.json.Decoder(_Message)


class _Doubt(Exception):
    """The typed way cannot answer for this frame: the general parser will."""


def parse_message(payload: bytes | str, limits: Limits = Limits()) -> Auth | PageView | Event:
    """Parse one client frame into a record; raise ProtocolError (and nothing else) when refused."""
    if isinstance(payload, bytes) and len(payload) <= limits.max_message_bytes:
        try:
            return _typed(payload, limits)
        except _Doubt:
            pass
    return wire.parse_message(payload, limits)


def _typed(payload: bytes, limits: Limits) -> Auth | PageView:
    try:
        message = _DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise _Doubt from None
    data = message.data
    keys = _present(message)
    if isinstance(data, _PageViewData):
        keys += _present(data)
        for size in (data.viewport, data.screen):
            if isinstance(size, _Size):
                keys += _present(size)
    if keys != payload.count(b'":') or _SPACE_BEFORE_COLON.search(payload):
        raise _Doubt
    # Control characters and lone surrogates only come from escapes or non-ASCII text.
    check = _checked if not payload.isascii() or b"\\" in payload else _plain
    if message.type == "auth":
        key = check(message.api_key, MAX_API_KEY_LENGTH)
        if not key:
            raise _Doubt
        return Auth(api_key=key)
    if message.type != "pageview" or not isinstance(data, _PageViewData):
        raise _Doubt
    url_max, text_max = limits.max_url_length, limits.max_string_length
    url = check(data.url, url_max)
    if not url:
        raise _Doubt
    try:
        wire._require_http_url(url, "data.url")
    except wire.ProtocolError:
        raise _Doubt from None
    is_new_visitor = data.is_new_visitor
    return PageView(
        api_key=check(message.api_key, MAX_API_KEY_LENGTH) or None, url=url,
        timestamp=check(data.timestamp, text_max),
        referrer=wire._referrer(check(data.referrer, url_max) or None),
        referrer_hostname=check(data.referrer_hostname, text_max),
        referrer_type=check(data.referrer_type, text_max),
        user_agent=check(data.user_agent, limits.max_user_agent_length),
        viewport_width=_size(data.viewport, 0), viewport_height=_size(data.viewport, 1),
        screen_width=_size(data.screen, 0), screen_height=_size(data.screen, 1),
        language=check(data.language, text_max), timezone=check(data.timezone, text_max),
        project_id=check(data.project_id, text_max), session_id=check(data.session_id, text_max),
        is_new_visitor=None if is_new_visitor is UNSET else is_new_visitor,
        landing_page=check(data.landing_page, url_max), title=check(data.title, text_max))


def _present(struct: Struct) -> int:
    """How many of a struct's fields the frame gave."""
    values = msgspec.structs.astuple(struct)
    return len(values) - values.count(UNSET)


def _plain(value: Text, max_length: int) -> str | None:
    """An optional string within ``max_length`` (None when absent or null)."""
    if value is UNSET or value is None:
        return None
    if len(value) > max_length:
        raise _Doubt
    return value


def _checked(value: Text, max_length: int) -> str | None:
    """``_plain``, and free of control characters and lone surrogates."""
    value = _plain(value, max_length)
    if value is not None and wire._FORBIDDEN_CHARACTERS.search(value):
        raise _Doubt
    return value


def _size(size: _Size | None | UnsetType, index: int) -> int | None:
    """Width (0) or height (1) of an optional size; both must be given, within range."""
    if size is UNSET or size is None:
        return None
    values = (size.width, size.height)
    if UNSET in values or not all(0 <= n <= MAX_DIMENSION for n in values):
        raise _Doubt
    return values[index]
