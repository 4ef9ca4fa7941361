"""The host end of the agent's wire protocol, on a pair of trio streams.

`Channel.call` sends one request frame and waits for its reply. Any number
of calls from different tasks may be in flight at once. Replies are matched
to calls by request id, in whatever order they arrive. `Channel.serve` is
the one task that reads replies. The frame layout is described in
``sandboxfs/remote/agent.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import math

import trio

from sandboxfs.backend import BackendError, code_for_errno
from sandboxfs.remote.agent import FLAG_MORE, MAX_MESSAGE, MAX_PAYLOAD, PREFIX

logger = logging.getLogger(__name__)

# Maximum bytes asked of the stream in one receive.
RECEIVE_SIZE = 1 << 20

# Queued frames are joined into one write of up to about this many bytes.
WRITE_BATCH_BYTES = 4 << 20


class ProtocolError(Exception):
    """The agent sent bytes that are not a valid frame."""


class _Pending:
    """One call waiting for its reply."""

    __slots__ = ("event", "scope", "items", "payloads", "result", "error", "failure")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.scope: trio.CancelScope | None = None
        self.items: list = []
        self.payloads: list[bytes] = []
        self.result: dict | None = None
        self.error: dict | None = None
        self.failure: str | None = None


class Channel:
    """Requests to one agent process, multiplexed over its stdin and stdout.

    `timeout` (seconds, None for no limit) bounds the wait for each reply,
    and for each part of a reply sent in parts. A call without a reply in
    time raises BackendError("timed_out"). Once the stream ends or breaks,
    every pending and later call raises BackendError("unavailable").
    """

    def __init__(
        self,
        send_stream: trio.abc.SendStream,
        receive_stream: trio.abc.ReceiveStream,
        timeout: float | None = 60.0,
    ) -> None:
        self._send_stream = send_stream
        self._receive_stream = receive_stream
        self._timeout = timeout
        self._outbox_send, self._outbox_receive = trio.open_memory_channel(math.inf)
        self._failure_reason = ""
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._failure: str | None = None

    @property
    def closed(self) -> bool:
        return self._failure is not None

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    async def call(
        self, op: str, args: dict, data: bytes = b"", path: str = ""
    ) -> tuple[dict, bytes]:
        """Send one request and return the reply's (result, payload).

        Raises BackendError: with the agent's code for an error reply,
        `unavailable` if the channel is closed or breaks, `timed_out` if no
        reply arrives in time, `invalid_argument` for a request over the
        frame limits. `path` only labels the error.
        """
        if self._failure is not None:
            raise BackendError("unavailable", path, self._failure)
        message = _encode({"op": op, "args": args})
        if len(message) > MAX_MESSAGE or len(data) > MAX_PAYLOAD:
            raise BackendError(
                "invalid_argument", path, f"{op} request exceeds the frame size limit"
            )

        request_id = self._allocate_id()
        pending = _Pending()
        self._pending[request_id] = pending
        try:
            prefix = PREFIX.pack(request_id, 0, len(message), len(data))
            self._outbox_send.send_nowait(prefix + message)
            if data:
                self._outbox_send.send_nowait(data)
            await self._wait(pending, op, path)
        finally:
            self._pending.pop(request_id, None)
        return _reply(pending, path)

    def send_raw(self, data: bytes) -> None:
        """Queue bytes outside any frame (the agent source for BOOTSTRAP)."""
        self._outbox_send.send_nowait(data)

    async def serve(self) -> None:
        """Send queued requests and read replies until the stream ends.

        Run it in a nursery. When it returns, every pending call has failed
        with `unavailable`, and so will every later one.
        """
        self._failure_reason = "the channel's reader was cancelled"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_writer, nursery.cancel_scope)
                nursery.start_soon(self._run_reader, nursery.cancel_scope)
        finally:
            self._fail(self._failure_reason)
            with trio.CancelScope(shield=True):
                await self._send_stream.aclose()

    async def aclose(self) -> None:
        """Close both streams; pending and later calls fail with `unavailable`."""
        self._fail("the channel was closed")
        with trio.CancelScope(shield=True):
            await self._send_stream.aclose()
            await self._receive_stream.aclose()

    # Sending. Calls queue their frames, and one task writes everything
    # queued with one send_all, so requests made at once share a write and
    # no frame is ever cut by a cancelled caller.

    def _allocate_id(self) -> int:
        while True:
            request_id = self._next_id
            self._next_id = request_id + 1 if request_id < 0xFFFFFFFF else 1
            if request_id not in self._pending:
                return request_id

    async def _run_writer(self, serve_scope: trio.CancelScope) -> None:
        try:
            while True:
                batch = [await self._outbox_receive.receive()]
                size = len(batch[0])
                while size < WRITE_BATCH_BYTES:
                    try:
                        batch.append(self._outbox_receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                    size += len(batch[-1])
                await self._send_stream.send_all(b"".join(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._failure_reason = f"sending to the agent failed: {exc!r}"
            serve_scope.cancel()

    # Receiving.

    async def _wait(self, pending: _Pending, op: str, path: str) -> None:
        timeout = math.inf if self._timeout is None else self._timeout
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            pending.scope = scope
            await pending.event.wait()
        if not pending.event.is_set():
            raise BackendError(
                "timed_out", path, f"no reply to {op} within {self._timeout} s"
            )

    async def _run_reader(self, serve_scope: trio.CancelScope) -> None:
        try:
            await self._read_frames()
            self._failure_reason = "the agent exited or closed its output"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._failure_reason = f"reading from the agent failed: {exc!r}"
        except ProtocolError as exc:
            self._failure_reason = f"invalid data from the agent: {exc}"
            logger.error("closing the agent channel: %s", self._failure_reason)
        serve_scope.cancel()

    async def _read_frames(self) -> None:
        buffer = bytearray()
        while True:
            if not await self._fill(buffer, PREFIX.size):
                return
            request_id, flags, message_size, payload_size = PREFIX.unpack_from(buffer)
            if message_size > MAX_MESSAGE or payload_size > MAX_PAYLOAD:
                raise ProtocolError(
                    f"frame of {message_size}+{payload_size} bytes exceeds the limits"
                )
            end = PREFIX.size + message_size + payload_size
            if not await self._fill(buffer, end):
                return

            view = memoryview(buffer)
            try:
                message = bytes(view[PREFIX.size : PREFIX.size + message_size])
                payload = bytes(view[PREFIX.size + message_size : end])
            finally:
                view.release()
            del buffer[:end]
            self._dispatch(request_id, flags, message, payload)

    async def _fill(self, buffer: bytearray, size: int) -> bool:
        """Receive until `buffer` contains `size` bytes; return False at end of stream."""
        while len(buffer) < size:
            want = min(max(size - len(buffer), 1 << 16), RECEIVE_SIZE)
            chunk = await self._receive_stream.receive_some(want)
            if not chunk:
                return False
            buffer += chunk
        return True

    def _dispatch(self, request_id: int, flags: int, message: bytes, payload: bytes) -> None:
        error, result, items = _parse_reply(request_id, message)
        pending = self._pending.get(request_id)
        if pending is None:
            logger.debug(
                "dropping the reply to request %d: its call timed out or was cancelled",
                request_id,
            )
            return

        pending.payloads.append(payload)
        if error is not None:
            pending.error = error
            pending.event.set()
            return
        pending.items.extend(items)
        if flags & FLAG_MORE:
            if pending.scope is not None and self._timeout is not None:
                pending.scope.deadline = trio.current_time() + self._timeout
            return
        pending.result = result
        pending.event.set()

    def _fail(self, reason: str) -> None:
        """Mark the channel broken and wake every pending call."""
        if self._failure is not None:
            return
        self._failure = reason
        if self._pending:
            logger.warning(
                "agent channel closed with %d calls pending: %s", len(self._pending), reason
            )
        else:
            logger.info("agent channel closed: %s", reason)
        for pending in self._pending.values():
            if not pending.event.is_set():
                pending.failure = reason
                pending.event.set()


def _encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("ascii")


def _parse_reply(request_id: int, message: bytes) -> tuple[dict | None, dict, list]:
    """Return (error, result, items) of a reply message or raise ProtocolError."""
    try:
        reply = json.loads(message)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"reply {request_id} is not JSON: {exc}") from exc
    if not isinstance(reply, dict):
        raise ProtocolError(f"reply {request_id} is not a JSON object")

    if "error" in reply:
        error = reply["error"]
        return (error if isinstance(error, dict) else {}), {}, []
    result = reply.get("ok")
    if not isinstance(result, dict):
        raise ProtocolError(f"reply {request_id} has neither ok nor error")
    items = result.pop("items", [])
    if not isinstance(items, list):
        raise ProtocolError(f"reply {request_id} has items that are not a list")
    return None, result, items


def _reply(pending: _Pending, path: str) -> tuple[dict, bytes]:
    """Return the (result, payload) of a finished call or raise its error."""
    if pending.failure is not None:
        raise BackendError("unavailable", path, pending.failure)
    if pending.error is not None:
        raise _error_from_reply(pending.error, path)

    result = pending.result or {}
    if pending.items:
        result["items"] = pending.items
    if len(pending.payloads) == 1:
        return result, pending.payloads[0]
    return result, b"".join(pending.payloads)


def _error_from_reply(error: dict, path: str) -> BackendError:
    message = error.get("message")
    message = message if isinstance(message, str) else ""
    code = error.get("code")
    if isinstance(code, str):
        return BackendError(code, path, message)
    name = error.get("errno")
    number = getattr(errno, name, None) if isinstance(name, str) and name.startswith("E") else None
    if not isinstance(number, int):
        return BackendError("io_error", path, f"{name}: {message}")
    return BackendError(code_for_errno(number), path, message)
