"""Token generation over a pipeline, shared by ``generate``, ``stream`` and ``generate_many``.

One loop (:func:`decode`) drives any number of sequences, each a :class:`SequenceState`
(its prompt, what it produced, its sampler, the request that currently holds its KV caches in
the stages, its replay log and its stats). While stage i runs a step of one sequence, stage i+1
runs a step of another. When a stage is lost (``StageUnavailable``) or lost a sequence's cache
(``UnknownRequest``), the client's recovery replaces it and every unfinished sequence is
replayed from its own log under a new request id: the tokens equal those of a run without
faults, and none is produced twice.

Results are typed: :class:`GenerationResult` (one per sequence) and, from ``stream``,
:class:`TokenChunk` events followed by the same :class:`GenerationResult`.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

from splitnet.edge.draft import DraftModel
from splitnet.edge.sampling import Sampler, SamplingConfig, head_request
from splitnet.errors import CachesLost, ConfigError, StageUnavailable, UnknownRequest
from splitnet.wire import Message
from splitnet.wire.headers import FILL_CHUNK_TOKENS, refill_run

Key = tuple[str, int]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationResult:
    """What one sequence's generation produced and how.

    Attributes:
        tokens: the generated token ids (the prompt not included).
        text: ``tokens`` decoded, when the session has a tokenizer (a text prompt, or
            ``connect(tokenizer=...)``); None otherwise.
        finish_reason: ``"stop"`` (the stop token was produced; it is the last of ``tokens``)
            or ``"length"`` (``max_new_tokens`` reached).
        prompt_ids: the prompt's token ids.
        index: the prompt's index in ``generate_many``'s list (0 for ``generate``).
        latency_ms: from the call to this sequence's last token.
        ttft_ms: from the call to this sequence's first token.
        replays: how often the sequence was replayed after a fault.
        stats: the details: ``prefill`` (bytes and trace of the first step),
            ``decode_wire_bytes``, ``tokens_computed`` per stage, ``decode_stage_ms``,
            ``replays`` (one record each), ``speculative`` (with a draft model).
    """

    tokens: list[int]
    text: str | None
    finish_reason: FinishReason
    prompt_ids: list[int]
    index: int = 0
    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    replays: int = 0
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TokenChunk:
    """One token of ``stream``, as it arrives.

    Attributes:
        token: the token id.
        offset: its position among the generated tokens (0 for the first).
        text: the text this token completes (an incremental decode; "" while a multi-byte
            character is still incomplete), or None without a tokenizer.
        index: the sequence it belongs to (0 for ``stream``).
    """

    token: int
    offset: int
    text: str | None = None
    index: int = 0


StreamEvent = TokenChunk | GenerationResult


class StepClient(Protocol):
    """What :func:`decode` needs from the session below it."""

    prefill_chunk_tokens: int

    def open_request(self) -> str: ...

    def send_tokens(self, req: str, seq: int, tokens: list[int], *, pos: int, want_result: bool, rewind: bool,
                    all_logits: bool, head: dict, resume_from: str | None = None, refill: tuple[int, ...] = (),
                    stages: int | None = None) -> int: ...

    def wait_reply(self, keys: set[Key], timeout_s: float | None) -> tuple[Key, Message, int]: ...

    def reply_ready(self, keys: set[Key]) -> bool: ...

    def release(self, req: str) -> None: ...

    def recover(self, cause: StageUnavailable | UnknownRequest, budget: "RecoveryBudget") -> None: ...


class RecoveryBudget:
    """How many recoveries a generation may still use: ``max_recoveries`` at first, spent one
    per recovery (and per failed attempt inside one), and given back one per ``refill_tokens``
    tokens produced since (0: never refilled). A long generation survives faults that come far
    apart; a pipeline that keeps failing exhausts it."""

    def __init__(self, max_recoveries: int, refill_tokens: int = 0):
        self.max_recoveries = max_recoveries
        self.refill_tokens = refill_tokens
        self.left = max_recoveries
        self.used = 0
        self.forgiven = 0  # recoveries that continued a failed resume, at no cost
        self._progress = 0
        self._free = False
        self._forgiven_since_spend = False

    def spend(self, cause: BaseException) -> None:
        """Take one recovery, or re-raise ``cause`` when none is left (free once after
        :meth:`forgive_next`)."""
        if self._free:
            self._free = False
            self.forgiven += 1
            return
        if self.left <= 0:
            raise cause
        self.left -= 1
        self.used += 1
        self._progress = 0
        self._forgiven_since_spend = False

    def forgive_next(self) -> None:
        """The next recovery continues the last one and costs nothing: a resume (the
        optimistic end of a recovery, on the caches thought to survive) failed before its first
        token, and the full replay it falls back to is what that recovery would have done.
        Once per spent recovery, so a pipeline that keeps failing still exhausts the budget."""
        if not self._forgiven_since_spend and self.used:
            self._free = True
            self._forgiven_since_spend = True

    def progress(self, tokens: int) -> None:
        if self.refill_tokens <= 0 or self.left >= self.max_recoveries:
            return
        self._progress += tokens
        while self._progress >= self.refill_tokens and self.left < self.max_recoveries:
            self._progress -= self.refill_tokens
            self.left += 1


class IncrementalText:
    """Text deltas of a growing token list (decode a small window, emit what became final)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._prefix = 0  # tokens before this are already emitted as text
        self._read = 0

    def push(self, tokens: Sequence[int], final: bool = False) -> str:
        """The new text once ``tokens`` (all so far) end as they do; ``final`` flushes the rest
        (a last incomplete character included)."""
        prefix_text = self.tokenizer.decode(list(tokens[self._prefix:self._read]))
        text = self.tokenizer.decode(list(tokens[self._prefix:]))
        if final or (len(text) > len(prefix_text) and not text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(tokens)
            return text[len(prefix_text):]
        return ""


@dataclass
class SequenceState:
    """One sequence being generated: its log and where its current request stands."""

    index: int
    prompt_ids: list[int]
    sampler: Sampler
    max_new_tokens: int
    stop_token: int | None = None
    draft: DraftModel | None = None
    speculate_tokens: int = 0
    out: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    req: str = ""  # the request holding this sequence's caches in the stages ("" before the first)
    seq: int = 0  # next step number of ``req``
    fed: int = 0  # tokens ``req`` has fed the pipeline and kept
    confirmed: int = 0  # positions every stage computed: those of the last reply used
    resume_from: str = ""  # the next step resumes this request's caches where they survived (see resume)
    refill: tuple[int, ...] = ()  # ... and these stages (replacements) are refilled first
    fill_upto: int = 0  # the client fills a replaced first stage with positions 0..fill_upto-1 first
    resume_unconfirmed: bool = False  # resumed, and no reply yet: an UnknownRequest now is the resume failing (RecoveryBudget.forgive_next)
    given_up: list[str] = field(default_factory=list)  # requests resumed from and not released yet
    pending: list[int] = field(default_factory=list)  # tokens still to feed
    proposals: list[int] = field(default_factory=list)  # draft tokens sent after ``pending`` in the step in flight
    sent_bytes: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    stats: dict = field(default_factory=lambda: {"replays": []})

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def log(self) -> list[int]:
        """Everything this sequence has fed or must feed: prompt + tokens so far (the replay log)."""
        return self.prompt_ids + self.out

    def restart(self, req: str) -> None:
        """A new request for this sequence, to be fed its whole log (every stage's cache is rebuilt)."""
        self.req, self.seq, self.fed = req, 0, 0
        self.pending = self.log()
        self.proposals = []
        self.resume_from, self.refill, self.fill_upto = "", (), 0
        self.resume_unconfirmed = False

    def resume(self, req: str, lost: tuple[int, ...]) -> None:
        """A new request for this sequence that takes over the current one's caches on the
        stages that kept them (cut back to :attr:`confirmed`, what every stage computed), while
        the stages in ``lost`` (replacements, empty) are refilled: a replaced first stage by
        this client with the tokens, any other run of them by the stage before it, from what it
        sent before. Only the tokens after :attr:`confirmed` are fed again."""
        self.given_up.append(self.req)
        self.resume_from, self.refill = self.req, tuple(lost)
        self.fill_upto = self.confirmed if 0 in lost else 0
        self.req, self.seq, self.fed = req, 0, self.confirmed
        self.pending = self.log()[self.confirmed:]
        self.proposals = []
        self.resume_unconfirmed = True  # until its first reply: a failure before it is the resume's, not a new fault's

    def accept(self, msg: Message, t0: float, received: int) -> list[int]:
        """The tokens a reply gives this sequence (with speculation, the agreeing proposals and
        the pipeline's next token), cut at the stop token or ``max_new_tokens``."""
        now = time.perf_counter()
        self.resume_unconfirmed = False
        trace = [t for t in msg.meta.get("trace", []) if isinstance(t, dict)]
        if not self.out:
            self.stats["ttft_ms"] = (now - t0) * 1e3
            self.stats["prefill"] = step_stats(msg, self.sent_bytes, received, self.stats["ttft_ms"])
            self.stats["decode_wire_bytes"] = 0
        else:
            self.stats["decode_wire_bytes"] += step_wire_bytes(self.sent_bytes, trace, received)
            _add_times(self.stats, trace)
        self.stats["tokens_computed"] = [t.get("tokens_computed") for t in trace]
        spec = self.stats.get("speculative")
        if self.proposals:
            # position j of the reply is the pipeline's choice after pending + proposals[:j]
            n_ok = 0
            while n_ok < len(self.proposals) and self.sampler.pick(msg.tensors, n_ok) == self.proposals[n_ok]:
                n_ok += 1
            new = self.proposals[:n_ok] + [self.sampler.pick(msg.tensors, n_ok)]
            self.fed -= len(self.proposals) - n_ok  # rejected: the stages rewind on the next step
            spec["steps"] += 1
            spec["proposed"] += len(self.proposals)
            spec["accepted"] += n_ok
        else:
            new = [self.sampler.pick(msg.tensors)]
        if spec is not None and self.out:
            spec["round_trips"] += 1  # decode steps, with or without proposals
        self.confirmed = self.fed  # every stage computed what this reply answers (rejected proposals cut back above)
        self.proposals = []
        kept: list[int] = []
        for tok in new:
            self.out.append(tok)
            kept.append(tok)
            if self.stop_token is not None and tok == self.stop_token:
                self.finish_reason = "stop"
                break
            if len(self.out) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        if not self.done:
            self.pending = [self.out[-1]]
        return kept

    def result(self, t0: float, text: str | None) -> GenerationResult:
        spec = self.stats.get("speculative")
        if spec is not None:
            spec["acceptance"] = round(spec["accepted"] / spec["proposed"], 4) if spec["proposed"] else None
            spec["tokens_per_step"] = round((len(self.out) - 1) / spec["round_trips"], 3) if spec["round_trips"] else None
        end = self.last_token_at or time.perf_counter()
        self.stats["latency_ms"] = (end - t0) * 1e3
        return GenerationResult(
            tokens=list(self.out), text=text, finish_reason=self.finish_reason or "length", prompt_ids=list(self.prompt_ids),
            index=self.index, latency_ms=self.stats["latency_ms"], ttft_ms=float(self.stats.get("ttft_ms", 0.0)),
            replays=len(self.stats["replays"]), stats=self.stats,
        )


def new_sequences(
    prompts: Sequence[list[int]], max_new_tokens: int, sampling: SamplingConfig | None, *, stop_token: int | None = None,
    draft: DraftModel | None = None, speculate_tokens: int = 4, max_positions: int | None = None,
) -> list[SequenceState]:
    """Checked per-sequence states, before any work: ConfigError says what is wrong."""
    sampling = sampling or SamplingConfig()
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if draft is not None and sampling.temperature != 0:
        raise ConfigError("speculative decoding with a draft model is greedy only (temperature 0) in this release")
    if draft is not None and speculate_tokens < 1:
        raise ConfigError("speculate_tokens must be >= 1")
    seqs = []
    for i, ids in enumerate(prompts):
        if not ids:
            raise ConfigError("the prompt is empty" if len(prompts) == 1 else f"prompt {i} is empty")
        if isinstance(max_positions, int) and len(ids) + max_new_tokens - 1 > max_positions:
            which = "a prompt" if len(prompts) == 1 else f"prompt {i}"
            raise ConfigError(
                f"{which} of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds the model's {max_positions} positions (its context length); "
                f"shorten the prompt to at most {max(max_positions - max_new_tokens + 1, 0)} tokens or ask for at most "
                f"{max(max_positions - len(ids) + 1, 0)} new tokens"
            )
        s = SequenceState(i, list(ids), Sampler(sampling), max_new_tokens, stop_token, draft, speculate_tokens if draft is not None else 0)
        if draft is not None:
            s.stats["speculative"] = {"steps": 0, "round_trips": 0, "proposed": 0, "accepted": 0}
        seqs.append(s)
    return seqs


def decode(
    client: StepClient, seqs: list[SequenceState], sampling: SamplingConfig | None, budget: RecoveryBudget, *,
    timeout_s: float | None = None, t0: float | None = None,
) -> Iterator[tuple[SequenceState, list[int]]]:
    """Drive every sequence to its end; yield ``(sequence, new tokens)`` as replies arrive.

    Each turn drains every reply that has arrived (a ``result_batch`` brings many at once), then
    feeds every sequence that is ready: the one-token decode steps of several sequences go as
    one batch message when the client can send them (``send_token_steps``, stages that take
    batch messages), prefill chunks and speculative steps one message each. One sequence
    (``generate``, ``stream``) takes the one-message path, with no wait and no extra copy.

    Feeding and waiting are inside the recovery ``try``: a stage lost before a feed is
    recovered like one lost during a wait."""
    t0 = time.perf_counter() if t0 is None else t0
    head = head_request(sampling or SamplingConfig())
    waiting: dict[Key, SequenceState] = {}
    chunk = client.prefill_chunk_tokens
    batched = len(seqs) > 1 and bool(getattr(client, "batch_messages", False)) and hasattr(client, "send_token_steps")
    try:
        for s in seqs:
            s.restart(client.open_request())
        while any(not s.done for s in seqs):
            try:
                ready = [s for s in seqs if not s.done and s.pending and (s.req, s.seq - 1) not in waiting]
                steps = [s for s in ready if s.draft is None and len(s.pending) == 1 and not s.resume_from] if batched else []
                together = {id(s) for s in steps} if len(steps) >= 2 else set()
                for s in ready:
                    if id(s) not in together:
                        waiting[_feed(client, s, chunk, head)] = s
                if len(steps) >= 2:
                    for key, s in zip(_feed_steps(client, steps, head), steps):
                        waiting[key] = s
                left = set(waiting)
                arrived = [client.wait_reply(left, timeout_s)]
                left.discard(arrived[0][0])
                while left and client.reply_ready(left):  # drain what has come already: the ready sequences are then fed together
                    arrived.append(client.wait_reply(left, timeout_s))
                    left.discard(arrived[-1][0])
            except (StageUnavailable, UnknownRequest) as e:
                t_r = time.perf_counter()
                live = [s for s in seqs if not s.done]
                if isinstance(e, UnknownRequest) and not isinstance(e, CachesLost) and any(s.resume_unconfirmed for s in live):
                    budget.forgive_next()  # a stage lacked a cache the resume counted on: the full replay below continues that recovery
                client.recover(e, budget)
                waiting.clear()
                lost = _resumable(client, e)
                for s in live:
                    if lost is not None and s.confirmed > 0 and not s.given_up:
                        s.resume(client.open_request(), lost)  # the old request's caches are taken over, not released
                    else:
                        for old in [*s.given_up, s.req]:
                            client.release(old)
                        s.given_up.clear()
                        s.restart(client.open_request())
                    s.stats["replays"].append({"after_tokens": len(s.out), "replayed_tokens": len(s.pending), "cause": type(e).__name__,
                                               "resumed": bool(s.resume_from), "refill": list(s.refill),
                                               "recover_ms": round((time.perf_counter() - t_r) * 1e3, 1)})
                continue
            for key, msg, received in arrived:
                s = waiting.pop(key)
                for old in s.given_up:  # the resumed request answered: the stages took the old one over (or never had it)
                    client.release(old)
                s.given_up.clear()
                new = s.accept(msg, t0, received)
                budget.progress(len(new))
                if s.done:  # its caches are freed on every stage now, not when the last sequence ends
                    client.release(s.req)
                    s.req = ""
                yield s, new
    finally:
        for s in seqs:
            if s.req:
                client.release(s.req)


def _resumable(client: Any, cause: Exception) -> tuple[int, ...] | None:
    """The stages whose caches are gone after the recovery just made (those it replaced, or
    those a :class:`~splitnet.errors.CachesLost` names), when the requests may resume on the others'
    caches; None when they must replay in full: the cause was some other UnknownRequest (a stage
    lost a request it should hold, a failed resume's among them), or the pipeline cannot resume
    (:attr:`Session.can_resume`)."""
    if not getattr(client, "can_resume", False):
        return None
    if isinstance(cause, CachesLost):
        return tuple(sorted(set(cause.stages)))  # an UnknownRequest's recovery replaces nothing (and records nothing)
    if not isinstance(cause, StageUnavailable):
        return None
    return client.last_replaced()


def _feed(client: StepClient, s: SequenceState, chunk: int, head: dict) -> Key:
    """Send ``s.pending`` (plus draft proposals on a decode step) in chunks after what ``s``
    kept; return the key of the last chunk, whose reply carries the next token."""
    proposals: list[int] = []
    if s.draft is not None and s.out:
        proposals = s.draft.propose(s.log(), min(s.speculate_tokens, s.max_new_tokens - len(s.out) - 1))
    tokens = s.pending + proposals
    s.pending, s.proposals, s.sent_bytes = [], proposals, 0
    if s.fill_upto:  # a replaced first stage (and the replaced ones right after it): the log's first positions, no result
        run = refill_run(s.refill, 0)
        log_ = s.log()
        step = max(chunk, FILL_CHUNK_TOKENS)
        for k in range(0, s.fill_upto, step):
            s.sent_bytes += client.send_tokens(s.req, s.seq, log_[k:min(k + step, s.fill_upto)], pos=k, want_result=False, rewind=False,
                                               all_logits=False, head=head, stages=run)
            s.seq += 1
        s.fill_upto = 0
    resume = {"resume_from": s.resume_from, "refill": s.refill} if s.resume_from else {}
    for k in range(0, len(tokens), chunk):
        piece = tokens[k:k + chunk]
        last = k + chunk >= len(tokens)
        s.sent_bytes += client.send_tokens(s.req, s.seq, piece, pos=s.fed, want_result=last, rewind=s.draft is not None or bool(resume),
                                           all_logits=bool(proposals) and last, head=head, **resume)
        resume = {}
        s.fed += len(piece)
        s.seq += 1
    s.resume_from, s.refill = "", ()
    return (s.req, s.seq - 1)


def _feed_steps(client: Any, steps: list[SequenceState], head: dict) -> list[Key]:
    """Send the one pending token of each of ``steps`` as one batch message (decode steps);
    return their keys, in order."""
    sent = client.send_token_steps([(s.req, s.seq, s.pending[0], s.fed) for s in steps], head=head)
    keys = []
    for s, nbytes in zip(steps, sent):
        s.pending, s.proposals, s.sent_bytes = [], [], nbytes
        s.fed += 1
        s.seq += 1
        keys.append((s.req, s.seq - 1))
    return keys


def step_stats(msg: Message, sent: int, received: int, latency_ms: float) -> dict:
    """Bytes and trace of one step: client -> stage 0, every cut, and the result."""
    trace = [t for t in msg.meta.get("trace", []) if isinstance(t, dict)]
    return {
        "latency_ms": latency_ms,
        "client_to_stage0_bytes": sent,
        "cut_bytes": [t.get("in_bytes", 0) for t in trace[1:]],
        "result_bytes": received,
        "wire_bytes": step_wire_bytes(sent, trace, received),
        "trace": trace,
    }


def step_wire_bytes(sent: int, trace: list[dict], received: int) -> int:
    """Every byte one step put on a wire: client -> stage 0, each cut (the next stage's
    ``in_bytes`` in the trace), and the result."""
    return sent + sum(t.get("in_bytes", 0) for t in trace[1:]) + received


#: the per-stage times a trace entry reports, summed per decode step by :func:`add_stage_times`
STAGE_TIMES = ("queue_ms", "decode_ms", "compute_ms", "encode_ms", "held_ms")


def add_stage_times(stats: dict, msg: Message) -> None:
    """Sum, per stage, the times a decode step's trace reports (``stats["decode_stage_ms"]``)."""
    _add_times(stats, [t for t in msg.meta.get("trace", []) if isinstance(t, dict)])


def _add_times(stats: dict, trace: list[dict]) -> None:
    """:func:`add_stage_times` of a trace whose entries are maps already (``accept`` has it so)."""
    per = stats.get("decode_stage_ms")
    if per is None:
        per = stats["decode_stage_ms"] = {}
    for t in trace:
        stage = t.get("stage")
        if not isinstance(stage, int):
            continue
        acc = per.get(stage)
        if acc is None:
            acc = per[stage] = {"steps": 0, **dict.fromkeys(STAGE_TIMES, 0.0)}
        acc["steps"] += 1
        for k in STAGE_TIMES:
            v = t.get(k)
            if type(v) is float or isinstance(v, (int, float)):  # the float test first: what a stage sends
                acc[k] += float(v)


def stream_events(
    client: StepClient, s: SequenceState, sampling: SamplingConfig | None, budget: RecoveryBudget, *,
    timeout_s: float | None, tokenizer: Callable[[], Any] | None,
) -> Iterator[StreamEvent]:
    """TokenChunk per token of one sequence, then its GenerationResult."""
    t0 = time.perf_counter()
    text = IncrementalText(tokenizer()) if tokenizer is not None else None
    with closing(decode(client, [s], sampling, budget, timeout_s=timeout_s, t0=t0)) as steps:
        for _, new in steps:
            for j, tok in enumerate(new):
                offset = len(s.out) - len(new) + j
                delta = text.push(s.out[:offset + 1], final=s.done and j == len(new) - 1) if text is not None else None
                yield TokenChunk(tok, offset, delta, s.index)
    yield s.result(t0, tokenizer().decode(s.out) if tokenizer is not None else None)


__all__ = ["FinishReason", "GenerationResult", "IncrementalText", "RecoveryBudget", "SequenceState", "StepClient", "StreamEvent",
           "TokenChunk", "decode", "new_sequences", "stream_events"]
