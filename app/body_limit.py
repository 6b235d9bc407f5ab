"""A request body larger than the API accepts is refused while it arrives (413).

Pure ASGI, so it counts the bytes the server hands over whether or not a Content-Length was
sent (chunked uploads have none), and refuses a declared length at once, before the app runs.
Nothing ever holds more than `max_bytes` of a body.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ContentTooLarge
from app.problems import domain_problem


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> ContentTooLarge:
        return ContentTooLarge(f"The request body is larger than {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await domain_problem(self._too_large())(scope, receive, send)
            return

        received = 0
        refused = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    raise self._too_large()
            return message

        async def send_unless_refused(message: Message) -> None:
            # Whatever the app makes of the exception (FastAPI turns a failed body read into a
            # 400) is dropped: the answer is the 413 below.
            nonlocal response_started
            if refused:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, send_unless_refused)
        except ContentTooLarge:
            if not refused or response_started:
                raise
        if refused and not response_started:
            await domain_problem(self._too_large())(scope, receive, send)
