"""The kubelet's side of CRI's image service (k8s.io/cri-api `runtime.v1`), over grpcio.

The kubelet pulls through containerd's CRI plugin, not `ctr`, so the tests call the same RPCs it
does. The few messages needed are written and read here in protobuf's wire format, with the field
numbers of cri-api's `pkg/apis/runtime/v1/api.proto`: no protoc step and no generated code.
Fields an answer carries that are not read here are skipped, as protobuf does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType

import grpc
import grpc.aio

SERVICE = "/runtime.v1.ImageService/"
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_NOT_READY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)
"""No socket yet; or CRI's "server is not initialized yet", answered while its plugin starts."""

Fields = dict[int, list[int | bytes]]
"""A decoded message: field number -> every value it carried, in order (varints as int)."""


class WireError(ValueError):
    """An answer that is not a well-formed protobuf message."""


# Encoding: proto3 leaves out fields that hold their default, and so do these.

def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH) + _varint(len(payload)) + payload


def _string(number: int, value: str) -> bytes:
    return _length_delimited(number, value.encode()) if value else b""


def _message(number: int, payload: bytes | None) -> bytes:
    """A sub-message; an empty one is still sent, since its presence means something."""
    return b"" if payload is None else _length_delimited(number, payload)


def _map(number: int, entries: Mapping[str, str]) -> bytes:
    """`map<string, string>`: one entry message (key = 1, value = 2) per pair."""
    return b"".join(_length_delimited(number, _string(1, k) + _string(2, v)) for k, v in sorted(entries.items()))


def _uint(number: int, value: int) -> bytes:
    return _varint(number << 3 | _VARINT) + _varint(value) if value else b""


# Decoding.

def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def parse(data: bytes) -> Fields:
    """Every field of one message, unknown ones included (and later ignored)."""
    fields: Fields = {}
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == _VARINT:
            value, at = _read_varint(data, at)
        elif wire_type in (_FIXED64, _FIXED32, _LENGTH):
            if wire_type == _LENGTH:
                size, at = _read_varint(data, at)
            else:
                size = 8 if wire_type == _FIXED64 else 4
            if at + size > len(data):
                raise WireError(f"field {number} runs past the end of the message")
            value, at = data[at:at + size], at + size
        else:
            raise WireError(f"field {number} has wire type {wire_type}, which proto3 does not use")
        if number == 0:
            raise WireError("field number 0")
        fields.setdefault(number, []).append(value)
    return fields


def _bytes_values(fields: Fields, number: int) -> list[bytes]:
    values = fields.get(number, [])
    if not all(isinstance(v, bytes) for v in values):
        raise WireError(f"field {number} should be length-delimited")
    return [v for v in values if isinstance(v, bytes)]


def _strings(fields: Fields, number: int) -> list[str]:
    return [v.decode() for v in _bytes_values(fields, number)]


def _last_string(fields: Fields, number: int) -> str:
    """A singular field: the last value wins, and absent is the empty string."""
    values = _strings(fields, number)
    return values[-1] if values else ""


def _last_int(fields: Fields, number: int) -> int:
    values = fields.get(number, [])
    if not all(isinstance(v, int) for v in values):
        raise WireError(f"field {number} should be a varint")
    return int(values[-1]) if values else 0


def _sub_message(fields: Fields, number: int) -> Fields | None:
    values = _bytes_values(fields, number)
    return parse(values[-1]) if values else None


# The messages (field numbers from api.proto).

@dataclass(frozen=True)
class ImageSpec:
    """`ImageSpec`: image = 1, annotations = 2."""

    image: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _string(1, self.image) + _map(2, self.annotations)


@dataclass(frozen=True)
class Pod:
    """The pod the kubelet pulls for. It sends the pod's annotations in the `ImageSpec` and a
    `PodSandboxConfig` (metadata = 1, annotations = 7) whose `PodSandboxMetadata` is
    name = 1, uid = 2, namespace = 3, attempt = 4."""

    name: str
    uid: str
    namespace: str
    attempt: int = 0
    annotations: Mapping[str, str] = field(default_factory=dict)

    def sandbox_config(self) -> bytes:
        metadata = _string(1, self.name) + _string(2, self.uid) + _string(3, self.namespace) + _uint(4, self.attempt)
        return _message(1, metadata) + _map(7, self.annotations)


@dataclass(frozen=True)
class Image:
    """`Image`: id = 1, repo_tags = 2, repo_digests = 3, size = 4 (uint64), pinned = 8."""

    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    size: int
    pinned: bool

    @classmethod
    def decode(cls, fields: Fields) -> Image:
        return cls(id=_last_string(fields, 1), repo_tags=_strings(fields, 2), repo_digests=_strings(fields, 3),
                   size=_last_int(fields, 4), pinned=bool(_last_int(fields, 8)))


class ImageService:
    """A client of `runtime.v1.ImageService` on containerd's socket, as the kubelet is."""

    def __init__(self, socket: str) -> None:
        # A unix socket: no proxy, whatever the environment says.
        self._channel = grpc.aio.insecure_channel(f"unix://{socket}", options=[("grpc.enable_http_proxy", 0)])

    async def __aenter__(self) -> ImageService:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: bytes, timeout: float) -> Fields:
        # No (de)serializers: grpcio then sends and returns the raw message bytes.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(SERVICE + method)
        return parse(await call(request, timeout=timeout))

    async def pull(self, image: str, *, pod: Pod | None = None, timeout: float = 120.0) -> str:
        """`PullImage` (image = 1, sandbox_config = 3); returns `image_ref` (= 1), the image's ID."""
        if pod is None:
            request = _message(1, ImageSpec(image).encode())
        else:
            request = _message(1, ImageSpec(image, pod.annotations).encode()) + _message(3, pod.sandbox_config())
        return _last_string(await self._call("PullImage", request, timeout), 1)

    async def status(self, image: str, timeout: float = 30.0) -> Image | None:
        """`ImageStatus` (image = 1) -> `image` (= 1), absent when the node does not have it."""
        found = _sub_message(await self._call("ImageStatus", _message(1, ImageSpec(image).encode()), timeout), 1)
        return None if found is None else Image.decode(found)

    async def remove(self, image: str, timeout: float = 30.0) -> None:
        """`RemoveImage` (image = 1): the image and every name it has, as the kubelet's image GC does."""
        await self._call("RemoveImage", _message(1, ImageSpec(image).encode()), timeout)

    async def list(self, timeout: float = 30.0) -> list[Image]:
        """`ListImages` with no filter -> `images` (= 1)."""
        return [Image.decode(parse(raw)) for raw in _bytes_values(await self._call("ListImages", b"", timeout), 1)]

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll until the image service answers: containerd is up before its CRI plugin is."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.list(timeout=max(0.1, deadline - time.monotonic()))
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in _NOT_READY or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.1)
