"""Authenticity of Twilio's webhooks (messaging now, voice/IVR later): `X-Twilio-Signature`.

Twilio signs the URL it called (scheme, host, path and query, exactly as configured) followed by
every POST parameter, name then value, in name order, with HMAC-SHA1 keyed by the account's
auth token. Behind a proxy or tunnel the URL Twilio called is not the URL this process sees, so
the URL is rebuilt from `INBOX_PUBLIC_URL` plus the request's path and query.

Use `TwilioWebhookAuth.verified_form(request)` in a route, or wrap a handler with
`twilio_webhook(auth, handler)`, which answers the refusals itself:
503 when no auth token is configured (CONTRACT.md), 403 when the signature is missing or wrong,
413 for a body no Twilio webhook comes near, 400 for a body that is not a form.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from twilio.request_validator import RequestValidator

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Twilio-Signature"
# Twilio's webhooks are a few kilobytes; anything this big is not one of them.
MAX_BODY_BYTES = 256 * 1024


class TwilioWebhookRefused(Exception):
    """A webhook request that is not processed, with the status to answer and why."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason

    def response(self) -> Response:
        return PlainTextResponse(self.reason, status_code=self.status_code)


class TwilioWebhookAuth:
    """Checks Twilio webhook signatures against the public URL of this service."""

    def __init__(self, auth_token: str | None, public_url: str) -> None:
        self._validator = RequestValidator(auth_token) if auth_token else None
        self._public_url = public_url.rstrip("/")

    @property
    def configured(self) -> bool:
        return self._validator is not None

    def url_for(self, request: Request) -> str:
        """The URL Twilio called: the public base URL, then the path and query we received."""
        query = request.url.query
        return self._public_url + request.url.path + (f"?{query}" if query else "")

    def is_valid(self, url: str, params: FormData, signature: str) -> bool:
        """Whether `signature` is Twilio's for this URL and these parameters.

        Like `RequestValidator.validate`, the URL is tried with and without its default port
        (Twilio has signed both ways), but the comparison is `hmac.compare_digest`, whose time
        does not depend on where the strings differ.
        """
        if self._validator is None:
            return False
        expected = signature.strip().encode()
        valid = False
        for candidate in _with_and_without_port(url):
            computed = self._validator.compute_signature(candidate, params).encode()
            # Both candidates are always computed and compared: no early exit to time.
            valid = hmac.compare_digest(computed, expected) | valid
        return valid

    async def verified_form(self, request: Request) -> FormData:
        """The form parameters of an authentic Twilio request, or TwilioWebhookRefused."""
        if not self.configured:
            raise TwilioWebhookRefused(503, "Twilio is not configured (TWILIO_AUTH_TOKEN)")
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            raise TwilioWebhookRefused(403, f"missing {SIGNATURE_HEADER}")
        form = parse_form(await _read_body(request))
        if not self.is_valid(self.url_for(request), form, signature):
            log.warning("refused a Twilio webhook with a bad signature: %s", request.url.path)
            raise TwilioWebhookRefused(403, f"invalid {SIGNATURE_HEADER}")
        return form


def parse_form(body: bytes) -> FormData:
    """An `application/x-www-form-urlencoded` body (what Twilio posts) as multi-valued form."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise TwilioWebhookRefused(400, "the body is not UTF-8 form data") from None
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=1000)
    except (ValueError, UnicodeDecodeError) as exc:  # bad percent-escapes, too many fields
        raise TwilioWebhookRefused(400, f"the body is not form data: {exc}") from None
    fields: list[tuple[str, str | UploadFile]] = list(pairs)
    return FormData(fields)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TwilioWebhookRefused(413, f"the body is over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TwilioWebhookRefused(413, f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _with_and_without_port(url: str) -> tuple[str, str]:
    """The URL without any port and with an explicit one, as twilio's own validator tries."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return url, url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host = hostport.rsplit(":", 1)[0] if port is not None else hostport
    prefix = userinfo + "@" if userinfo else ""
    default = 443 if parts.scheme == "https" else 80
    without = urlunsplit(parts._replace(netloc=prefix + host))
    with_port = urlunsplit(parts._replace(netloc=f"{prefix}{host}:{port or default}"))
    return without, with_port


Handler = Callable[[Request, FormData], Awaitable[Response]]


def twilio_webhook(
    auth: TwilioWebhookAuth, handler: Handler
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint that calls `handler(request, form)` for authentic requests only."""

    async def endpoint(request: Request) -> Response:
        try:
            form = await auth.verified_form(request)
        except TwilioWebhookRefused as refused:
            return refused.response()
        return await handler(request, form)

    return endpoint
