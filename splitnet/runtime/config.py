"""Configuration of a stage worker."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitnet.errors import ConfigError


@dataclass(frozen=True)
class StageWorkerConfig:
    """Everything one stage process needs.

    Attributes:
        model: built-in model name or Hugging Face directory.
        start_block: first block this stage serves.
        end_block: one past the last block this stage serves.
        bind: ZeroMQ endpoint to bind; port 0 picks a free port (``tcp://127.0.0.1:0``).
        stage_index: position of this stage in its pipeline (for reports and errors).
        ready_endpoint: where to announce READY (a launcher's socket); "" prints READY to stdout.
        codec_out: codec applied to ``hidden`` before sending to the next stage: a registry name
            of a stateless codec ("fp16", "int8", ...) or a saved codec file; "" sends raw.
        codec_files: saved codec files this stage can decode with (looked up by hash).
        max_requests: most concurrent requests holding a KV cache.
        max_cache_bytes: total KV cache memory this stage may hold.
        cache_ttl_s: a KV cache idle this long is dropped.
        queue_depth: forward messages waiting for compute before new ones are refused.
        send_timeout_ms: a send to a peer that cannot take it fails after this long.
        parent_pid: exit when this process is gone (0: don't watch).
        torch_threads: intra-op threads for torch (0: leave torch's default).
        device: torch device the stage runs on ("cpu", "cuda", "cuda:1").
        dtype: weight and activation dtype ("float32", "float16", "bfloat16").
        insecure: allow plaintext sockets (otherwise CURVE keys are required when configured).
        max_input_bytes: the largest tensor, and the most tensor bytes of one message, this stage
            accepts; also its sockets' ZMQ_MAXMSGSIZE (a larger frame drops the connection before
            libzmq assembles it). 128 MiB holds 8,192 tokens of a 4,096-wide fp32 hidden state.
        max_batch_size: most requests one forward combines (decode steps of many sequences,
            prompt chunks of several requests); 1 runs one request per forward.
        max_batch_tokens: most positions one forward combines over its requests (padding included).
        max_padding: cached requests with different numbers of new tokens share a forward, padded
            to the longest, while the padded positions are at most this fraction of the real ones
            (0: only equal lengths share one).
        batch_wait_ms: how long a stage may wait for the rest of a batch: the first stage for the
            next steps of the requests keeping their step rhythm (never longer than its last
            forward), a later stage for the rest of the upstream stage's batch.
        shared_device: every stage of this pipeline runs on this stage's device (one GPU): the
            first stage then waits up to ``batch_wait_ms`` for all the requests it expects, since
            two half batches cost about two full forwards on one device; stages on devices of their
            own wait at most one forward, so that groups at different stages keep them all busy.
        cuda_graphs: on CUDA, replay captured graphs for decode steps (one per batch and length bucket).
        cpus: CPU cores this stage process is pinned to (empty: not pinned); torch's threads
            default to their number.
        merge_chunk_tokens: a request's consecutive prompt chunks queued here run as one forward
            of up to this many tokens (their inputs concatenated; what leaves is one message, in
            the last chunk's name). A chunk alone already this long is never merged with the next,
            so the client's chunking (``ClientConfig.prefill_chunk_tokens``, 64 by default)
            decides the pipelining of long prompts; small chunks stop paying a forward and a
            message each when they pile up, as a replay's do. 1: never merge.
        warm_up: run a few dummy forwards before announcing READY (a chunk and a batched decode
            step through a scratch cache slot), so that the first real request, often a replay
            onto a freshly started replacement, does not pay the first forward's one-time costs
            (tens of milliseconds on a CPU: thread pools, allocator, kernel selection). On CUDA
            it also runs prompt chunks and refills of 16-512 tokens and captures the decode
            graphs of batches 1, 2, 4 at 128-512 positions (a fraction of a second at start;
            each would cost a replay 20-60 ms).
        sent_log_bytes: memory for what this stage sent on per cached request (the hidden
            states it forwarded), from which a replacement of the next stage is refilled when
            that one is lost, instead of every stage recomputing a full replay
            (:mod:`splitnet.runtime.sent_log`); past it the least recently used requests lose
            their logs (and fall back to a full replay). 0: keep none. The last stage keeps none.
        metrics_port: serve Prometheus ``/metrics`` and ``/health`` over HTTP on this port of the
            bind host (0: any free port, reported in ``info``; None: off).
    """

    model: str
    start_block: int
    end_block: int
    bind: str = "tcp://127.0.0.1:0"
    stage_index: int = 0
    ready_endpoint: str = ""
    codec_out: str = ""
    codec_files: tuple[str, ...] = field(default_factory=tuple)
    max_requests: int = 256
    max_cache_bytes: int = 4 * 1024**3
    cache_ttl_s: float = 600.0
    queue_depth: int = 1024
    send_timeout_ms: int = 5000
    parent_pid: int = 0
    torch_threads: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    insecure: bool = True
    max_input_bytes: int = 128 * 1024**2
    max_batch_size: int = 64
    max_batch_tokens: int = 4096
    max_padding: float = 0.5
    batch_wait_ms: float = 20.0
    cuda_graphs: bool = True
    shared_device: bool = False
    cpus: tuple[int, ...] = field(default_factory=tuple)
    metrics_port: int | None = None
    merge_chunk_tokens: int = 64
    warm_up: bool = True
    sent_log_bytes: int = 512 * 1024**2

    def __post_init__(self) -> None:
        if self.start_block < 0 or self.end_block <= self.start_block:
            raise ConfigError(f"stage blocks [{self.start_block}, {self.end_block}) are empty or negative")
        if not self.bind.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(f"bind endpoint {self.bind!r} must start with tcp://, ipc:// or inproc://")
        for name in ("max_requests", "max_cache_bytes", "queue_depth", "send_timeout_ms", "max_input_bytes", "max_batch_size", "max_batch_tokens", "merge_chunk_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"StageWorkerConfig.{name} must be positive")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"StageWorkerConfig.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"StageWorkerConfig.device must be cpu or cuda[:N], got {self.device!r}")
        if self.batch_wait_ms < 0:
            raise ConfigError("StageWorkerConfig.batch_wait_ms must be >= 0")
        if self.sent_log_bytes < 0:
            raise ConfigError("StageWorkerConfig.sent_log_bytes must be >= 0 (0: keep no log)")
        if self.max_padding < 0:
            raise ConfigError("StageWorkerConfig.max_padding must be >= 0")
        if any(c < 0 for c in self.cpus):
            raise ConfigError(f"StageWorkerConfig.cpus must be core numbers, got {self.cpus}")
        if self.cache_ttl_s <= 0:
            raise ConfigError("StageWorkerConfig.cache_ttl_s must be positive")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"StageWorkerConfig.metrics_port must be a TCP port (0-65535, 0: any free one), got {self.metrics_port}")
