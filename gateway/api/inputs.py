"""Turning a client's JSON body into a canonical request: strict, with messages a user can act on."""

from __future__ import annotations

import types
import unicodedata
from typing import Any

import msgspec

from gateway.errors import InvalidRequest

_LAX: dict[type, type] = {}


def lax(struct: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """The same request type, ignoring unknown fields (`[server] unknown_fields = "ignore"`)."""
    found = _LAX.get(struct)
    if found is None:
        found = _LAX[struct] = types.new_class(f"Lax{struct.__name__}", (struct,), {"forbid_unknown_fields": False})
    return found


def _unknown(body: bytes, struct: type[msgspec.Struct]) -> InvalidRequest:
    """400 naming every field the route does not take (msgspec names only the first)."""
    known = set(struct.__struct_fields__)
    try:
        sent = msgspec.json.decode(body)
    except msgspec.DecodeError:
        sent = {}
    unknown = [k for k in sent if k not in known] if isinstance(sent, dict) else []
    names = ", ".join(f"`{k}`" for k in unknown) or "a field"
    return InvalidRequest(
        f"unknown field{'s' if len(unknown) > 1 else ''} {names}: this route takes {sorted(known)}. A misspelt or "
        'unsupported field would otherwise change nothing, silently (server.unknown_fields = "ignore" accepts '
        "them)",
        param=unknown[0] if unknown else None,
    )


def decode_body(body: bytes, struct: type[msgspec.Struct], strict: bool = True) -> Any:
    if not body.strip():
        raise InvalidRequest("request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=struct if strict else lax(struct))
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int | null`, got `str` - at `$.dimensions`".
        msg = str(exc)
        if msg.startswith("Object contains unknown field") and "- at `$." not in msg:
            raise _unknown(body, struct) from None
        param = msg.rsplit("`$.", 1)[1].rstrip("`").split("[")[0] if "`$." in msg else None
        raise InvalidRequest(f"invalid request: {msg}", param=param) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Which one a bad byte raises depends on msgspec's version: find out ourselves, on the error path only.
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidRequest(
                f"request body is not valid UTF-8 (byte {bad.start}): send UTF-8 encoded JSON"
            ) from None
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply; send a flat JSON object") from None


def request_timeout(value: str | None) -> float | None:
    """`x-request-timeout` in seconds: lowers the request's deadline (never raises it)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise InvalidRequest(
            f"x-request-timeout must be a positive number of seconds, got {value!r}", param="x-request-timeout"
        )
    return seconds


# One rule for both dialects: a text must contain something to embed. Empty, whitespace-only, control-
# character-only (NUL...) and zero-width-only texts all embed to the same meaningless vector (the model
# sees only its special tokens), so they are refused rather than silently indexed.
_BLANK = "has no visible text (it is empty, or only whitespace, control or zero-width characters)"


def _visible(text: str) -> bool:
    if text.strip() and text.isprintable():  # the common case, at C speed
        return True
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


def parse_texts(value: Any, param: str, max_inputs: int) -> list[str]:
    """A string or a non-empty list of non-empty strings; token-id arrays are refused by name."""
    if value is None or value is msgspec.UNSET:
        raise InvalidRequest(f"`{param}` is required", param=param)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, str):
        if not _visible(value):
            raise InvalidRequest(f"`{param}` {_BLANK}", param=param)
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest(f"`{param}` must be a string or a list of strings", param=param)
    if not value:
        raise InvalidRequest(f"`{param}` must not be an empty list", param=param)
    if len(value) > max_inputs:
        raise InvalidRequest(
            f"`{param}` has {len(value)} items; at most {max_inputs} are allowed per request", param=param
        )
    for i, item in enumerate(value):
        if isinstance(item, dict):  # Jina's {"text": ...} items
            item = value[i] = _text_item(item, f"{param}[{i}]")
        if isinstance(item, str):
            if not _visible(item):
                raise InvalidRequest(f"`{param}[{i}]` {_BLANK}", param=param)
            continue
        if isinstance(item, (int, list)) and not isinstance(item, bool):
            raise InvalidRequest(
                f"`{param}` contains token ids; token arrays are not supported (they are ids of another model's "
                "vocabulary, and decoding them would embed garbage): send text strings. LangChain sends tiktoken "
                "ids by default: OpenAIEmbeddings(check_embedding_ctx_length=False)",
                param=param,
            )
        raise InvalidRequest(f"`{param}[{i}]` must be a string, got {type(item).__name__}", param=param)
    return value


def _text_item(item: dict[str, Any], where: str) -> str:
    if set(item) == {"text"} and isinstance(item["text"], str):
        return item["text"]
    if "image" in item or "url" in item:
        raise InvalidRequest(f"`{where}` is an image; this gateway embeds text only", param=where.split("[")[0])
    raise InvalidRequest(f'`{where}` must be a string or {{"text": "..."}}', param=where.split("[")[0])


def truncation(truncate: bool | None, direction: str | None) -> str | None:
    """A request's truncation: "none" (refuse what is too long), "right"/"left" (cut), None (the model's
    `truncate` setting). TEI's and the /v1/embeddings extension's fields alike."""
    if direction is not None and direction.lower() not in ("right", "left"):
        raise InvalidRequest("truncation_direction must be 'right' or 'left'", param="truncation_direction")
    if truncate is None:
        return None
    if not truncate:
        return "none"
    return direction.lower() if direction is not None else "right"
