"""Wire format: a typed msgpack header frame, then raw tensor frames. Nothing is ever unpickled.

Every message is `[header, *tensor_frames]`. The header is one of the structs below (tagged, so
the decoder validates its type and fields); each tensor frame's dtype and shape travel in the
header and are checked against the frame's byte length on receipt. A message that fails any
check raises `BadMessage`; receivers log it and drop it.
"""

from __future__ import annotations

import math
import warnings
from functools import cache
from typing import TYPE_CHECKING, Union

import msgspec

from .routing_table import RoutingTable
from .sampling import SamplingParams, TokenLogprobs
from .vocabulary import EventKind, FinishReason, Role, WorkerState

if TYPE_CHECKING:
    import torch

DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}  # bytes per element
DTYPE_NAMES = tuple(DTYPE_SIZES)


@cache
def _dtypes() -> dict:
    """name -> torch dtype; torch is imported only where tensors are (not in the orchestrator)."""
    import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES}
MAX_MESSAGE_BYTES = 1 << 30
# Received tensors view zmq's read-only frames on purpose (no copy); receivers never write them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")  # set as ZMQ_MAXMSGSIZE: larger messages are dropped by libzmq


# Frames below this size are copied into libzmq even when sent with copy=False. pyzmq's default
# (64 KiB) sends larger ones zero-copy, and each such frame is released later through pyzmq's
# garbage-collector thread, which then competes for the GIL: on the datapath (tens of KiB to a
# few MiB per message) a memcpy is far cheaper. Set on every datapath socket.
COPY_THRESHOLD = 1 << 24


class BadMessage(ValueError):
    pass


class TensorMeta(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    dtype: str
    shape: list[int]


class Msg(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    pass


# ---- control: driver <-> workers -----------------------------------------------------------


class Ready(Msg):
    name: str
    role: Role
    pid: int
    info: dict[str, int] = {}


class AddRequest(Msg):
    req_id: str
    prompt: list[int]
    params: SamplingParams


class AbortRequest(Msg):
    req_ids: list[str]


class Shutdown(Msg):
    pass


class ResumeRequest(Msg):
    """Driver -> attention worker: take over a request of a failed worker. `output` holds every
    token the client already has; with `restore`, fetch its KV from the checkpoint store first."""

    req_id: str
    prompt: list[int]
    output: list[int]
    params: SamplingParams
    restore: bool
    tokenwise: bool = False  # recompute one token per step (the `replay` baseline)


class Report(Msg):
    """Worker or driver -> orchestrator: a recovery step for the event log."""

    kind: EventKind
    worker: str
    detail: str
    ms: float
    restored_tokens: int = 0  # kind "restored": tokens of the request whose KV came from a store ...
    request_tokens: int = 0  # ... of this many (the rest is recomputed)


class RestartAll(Msg):
    """Driver -> orchestrator (the `restart` recovery policy): stop and start every worker."""


class Heartbeat(Msg):
    name: str


class Probe(Msg):
    seq: int


class Pong(Msg):
    seq: int


class Join(Msg):
    """A worker started by hand (`tarragon worker --join`) -> orchestrator: it offers to fill a
    planned slot of `role` and has reserved these addresses on its host."""

    role: Role
    pid: int
    endpoint: str
    probe_endpoint: str


class Assign(Msg):
    """Orchestrator -> a worker that joined: the slot it fills, as a WorkerSpec in JSON (decoded
    and validated as one, like the command line of a worker the orchestrator starts itself)."""

    spec: str


class WorkerRecord(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    role: Role
    pid: int
    state: WorkerState
    info: dict[str, int] = {}
    replaces: str = ""  # the failed worker this one took over from
    probe_endpoint: str = ""  # where it answers probes (the driver probes attention workers that owe tokens)
    endpoint: str = ""  # expert worker, store: where it serves (a successor orchestrator adopting joined workers needs it)


class Event(msgspec.Struct, forbid_unknown_fields=True):
    t: float  # time.monotonic() in the orchestrator (same clock as the driver's on one host)
    kind: EventKind
    worker: str
    detail: str = ""
    ms: float = 0.0
    restored_tokens: int = 0  # see Report
    request_tokens: int = 0


class ClusterState(Msg):
    """Orchestrator -> driver, on every change."""

    workers: list[WorkerRecord]
    table_version: int
    ready: bool
    epoch: int = 0  # bumped by a full restart: every in-flight request must be rerun
    unavailable_experts: int = 0  # (layer, expert) pairs with no live copy right now
    next_index: dict[Role, int] = {}  # by role: the number the next new worker's name takes (for a successor)
    fenced: list[str] = []  # attention workers declared failed (a successor keeps them fenced)


class Handover(Msg):
    """Driver -> orchestrator -> checkpoint store: these requests now belong to `owner` (the
    attention worker the driver moved them to); only the owner may write or restore them."""

    req_ids: list[str]
    owner: str


class Fence(Msg):
    """Orchestrator -> expert workers and checkpoint stores: these attention workers were declared
    failed; drop whatever they send from now on. A worker's name is never reused, so it names one
    incarnation: one cut off and fenced is stale once its link heals, whatever it still believes."""

    workers: list[str]


class GetEvents(Msg):
    pass


class Drain(Msg):
    """A planned drain of worker `name`: driver -> orchestrator (`LLM.drain`), a worker ->
    orchestrator on its heartbeat channel (it got SIGTERM), orchestrator -> the attention worker
    (stop stepping, hand your requests back)."""

    name: str


class Drained(Msg):
    """Attention worker -> driver: it has stopped, its last tokens sent and its KV committed to
    the store; `req_ids` are to be moved. Driver -> orchestrator: moved, the worker may go."""

    name: str
    req_ids: list[str] = []


class EventLog(Msg):
    events: list[Event]


class WorkerFailed(Msg):
    """A worker's own evidence that a peer failed (sent to the orchestrator)."""

    worker: str
    reporter: str
    reason: str
    detect_ms: float
    slow: bool = False  # it answers, much slower than its peers (a gray failure): no partition to weigh


class TableUpdate(Msg):
    """Orchestrator -> attention workers: the authoritative routing table and where to reach
    every expert worker it names."""

    table: RoutingTable
    endpoints: dict[str, str]
    probe_endpoints: dict[str, str]
    store_endpoints: list[str] = []  # the checkpoint stores, one per slot (a replacement may be elsewhere); []: unchanged


class Tokens(Msg):
    """One attention-worker step's new tokens; finish[i] is None while request i goes on."""

    req_ids: list[str]
    tokens: list[int]
    finish: list[FinishReason | None]
    kv_used: int
    running: int
    waiting: int
    replayed: int = 0  # expert calls this worker has replayed after failures, in total
    logprobs: list[TokenLogprobs | None] = []  # per token when any request of the step asked, else empty


class PromptLogits(Msg):
    req_id: str
    logits: TensorMeta


# ---- datapath: attention worker <-> expert worker ------------------------------------------


class Hello(Msg):
    """The first message on a local link (local_link.py): who is calling. ZMQ sockets carry it
    as their identity instead."""

    worker: str


class ExpertRequest(Msg):
    """Rows of `hidden` grouped by expert: counts[i] rows for experts[i] of `layer`. A replay
    (the same rows, resent after a worker failed) is served ahead of normal requests. `linger`:
    the sender's next call follows within a few hundred microseconds and no other expert worker
    computes meanwhile (a batch this worker serves alone), so polling for it pays."""

    call_id: int
    layer: int
    experts: list[int]
    counts: list[int]
    hidden: TensorMeta
    replay: bool = False
    linger: bool = False


class ExpertReply(Msg):
    call_id: int
    hidden: TensorMeta


# ---- checkpointing: attention worker <-> checkpoint store ----------------------------------


class KVWrite(Msg):
    """One step's new KV of an attention worker: for each request, `counts[i]` positions from
    `starts[i]`, every layer. All layers arrive in one message, so its arrival commits them.
    Frames: k and v, each [layers, sum(counts), heads, dim] (MLA: the latent and the rotated key)."""

    seq: int  # per-worker write number (gaps: writes dropped under back-pressure)
    req_ids: list[str]
    starts: list[int]
    counts: list[int]
    k: TensorMeta
    v: TensorMeta
    finished: list[str]  # requests done: their checkpoints can be dropped


class RestoreRequest(Msg):
    req_id: str


class RestoreData(Msg):
    """KV of positions [0, committed) of a request (committed 0: nothing restorable)."""

    req_id: str
    committed: int
    k: TensorMeta
    v: TensorMeta


Message = Union[
    Ready, AddRequest, AbortRequest, Shutdown, Heartbeat, Probe, Pong, ClusterState, GetEvents, EventLog,
    WorkerFailed, TableUpdate, Tokens, PromptLogits, Hello, ExpertRequest, ExpertReply, ResumeRequest, Report, RestartAll,
    KVWrite, RestoreRequest, RestoreData, Join, Assign, Handover, Fence, Drain, Drained,
]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
# The header fields that describe each message type's tensor frames, in frame order (every other
# type: none); checked on receipt.
TENSOR_FIELDS: dict[type, tuple[str, ...]] = {PromptLogits: ("logits",), ExpertRequest: ("hidden",), ExpertReply: ("hidden",),
                                             KVWrite: ("k", "v"), RestoreData: ("k", "v")}


def tensor_meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(str(t.dtype).removeprefix("torch."), list(t.shape))


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` in host memory: itself on CPU; from a GPU, a copy into pinned (page-locked) memory,
    which the GPU copies into by DMA. torch's caching host allocator recycles those buffers."""
    import torch

    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)  # synchronous: the bytes are there when this returns
    return host


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A received (host) tensor on `device`: staged through pinned memory, copied asynchronously
    (the caching host allocator keeps the staging buffer until the copy is done)."""
    import torch

    if device.type == "cpu":
        return t
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return staged.to(device, non_blocking=True)


def tensor_frame(t: torch.Tensor):
    """Zero-copy view of a (host) tensor's bytes, to send with copy=False."""
    import torch

    if not t.numel():
        return b""
    t = to_host(t).contiguous()
    return t.view(-1).numpy() if t.dtype == torch.float32 else t.view(torch.uint8).numpy()  # (bf16 has no numpy dtype)


def encode(header: Msg, *tensors: torch.Tensor) -> list:
    return [_encoder.encode(header), *(tensor_frame(t) for t in tensors)]


def decode(frames: list) -> tuple[Msg, list[memoryview]]:
    """Validate and decode `[header, *frames]` (zmq Frames or bytes)."""
    if not frames:
        raise BadMessage("empty message")
    bufs = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames]
    try:
        header = _decoder.decode(bufs[0])
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise BadMessage(f"bad header: {e}") from None
    if len(bufs) - 1 != len(TENSOR_FIELDS.get(type(header), ())):
        raise BadMessage(f"{type(header).__name__} with {len(bufs) - 1} tensor frames")
    return header, bufs[1:]


def tensors(msg: Msg, bufs: list[memoryview]) -> list[torch.Tensor]:
    """The message's tensor frames as tensors, each checked against the dtype and shape its
    header declares (see `to_tensor`)."""
    return [to_tensor(getattr(msg, name), buf) for name, buf in zip(TENSOR_FIELDS.get(type(msg), ()), bufs)]


def to_tensor(meta: TensorMeta, buf: memoryview) -> torch.Tensor:
    """The tensor a frame holds, after checking the frame matches its declared dtype and shape.
    The result shares the frame's (read-only) memory."""
    import torch

    check_frame(meta, buf)
    dtype = _dtypes()[meta.dtype]
    if math.prod(meta.shape) == 0:
        return torch.empty(meta.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(meta.shape)


def check_frame(meta: TensorMeta, buf: memoryview) -> None:
    """Raises BadMessage unless the frame holds exactly its declared dtype and shape (no torch:
    a receiver that only copies bytes, the checkpoint store, checks with this alone)."""
    size = DTYPE_SIZES.get(meta.dtype)
    if size is None:
        raise BadMessage(f"unknown dtype {meta.dtype!r}")
    if len(meta.shape) > 4 or any(d < 0 for d in meta.shape):
        raise BadMessage(f"bad shape {meta.shape}")
    if buf.nbytes != math.prod(meta.shape) * size:
        raise BadMessage(f"frame of {buf.nbytes} bytes does not hold {meta.dtype}{meta.shape}")
