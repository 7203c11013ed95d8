"""Generation off the event loop: one engine thread decodes every request in
flight, new requests joining between decode steps (continuous batching).

Requests for the same adapter decode together in one mlx-lm `BatchGenerator`
(each with its own cache, sampler and stop tokens); requests for different
adapters run in sibling generators stepped in turn, the adapter switched
between steps, so no request waits for another to finish. With a per-layer
affine KV plan on full-attention layers the caches are `PlannedKVCache`s,
which merge into batches like mlx-lm's own (`BatchPlannedKVCache`), so those
requests decode together too (mlx-lm's server serialises quantized-KV
requests). Caches that cannot merge (TurboQuant, sliding windows, a
`--quantized-kv-start`) are interleaved one decode step each instead.

A request with a grammar (structured output, a required tool call) carries
an llguidance logits processor and decodes in the same batch as the rest.
With a draft model, requests decode speculatively (mlx-lm's
`speculative_generate_step`, one sequence at a time as in mlx_lm.server,
since mlx-lm's BatchGenerator has no draft path), stepped in turn like the
interleaved caches; requests with a grammar take the batched path, because
the grammar's state cannot follow mlx-lm's rewinds of rejected draft tokens.
Each generator is a "lane": (adapter, speculative or not).

The event loop talks to the thread through a command queue; after each
decode step the thread hands that step's events to the loop in one
`call_soon_threadsafe`, onto each request's asyncio queue.

Sharded over processes (mlx.launch, the model split by mlx-lm's own tensor or
pipeline sharding), every rank runs this engine in lockstep: rank 0 takes the
commands from its event loop and shares them each iteration with one
`mx.distributed.all_sum` (as mlx_lm.server does); the other ranks apply the
same commands and take the same decode steps, their events going nowhere.
Sampling stays identical because the random state is shared at start and the
logits are the same on every rank.
"""

import cProfile
import json
import os
import pstats
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator, speculative_generate_step
from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .grammar import Grammar
from .openai import Sampling


@dataclass
class Ticket:
    """A request in the engine; the handler reads `events` (an asyncio.Queue)."""

    request: object
    prompt: list
    adapter: str | None
    loop: object
    events: object
    uid: int | None = None
    generator: object = None
    text: str = ""
    sent: int = 0
    entries: list = field(default_factory=list)
    n_tokens: int = 0
    cached_tokens: int = 0
    detokenizer: object = None
    done: bool = False
    lane: tuple = None  # (adapter, speculative): the generator this request decodes in
    processor: object = None  # the grammar's logits processor, made by the handler (a follower rank makes its own)

    outbox: list = None  # set by the engine while a step runs: events leave in one wake-up
    sync_id: int = 0  # the same request on every rank (distributed)

    def post(self, event: dict):
        if self.loop is None:  # a follower rank's copy: nobody listens
            return
        if self.outbox is not None:
            self.outbox.append((self, event))
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def cache_arrays(obj) -> list:
    """Every mx.array a prompt cache holds (through lists, layer caches and
    caches of caches: PlannedKVCache's parts, CacheList)."""
    if isinstance(obj, mx.array):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [a for x in obj for a in cache_arrays(x)]
    if hasattr(obj, "__dict__"):
        return [a for x in vars(obj).values() for a in cache_arrays(x)]
    return []


def settled(cache: list) -> list:
    """The cache with every array evaluated, so that it holds its own buffers:
    a cache extracted from a batch is a lazy slice of the whole batch's
    buffers until evaluated, and an unevaluated one kept in the prompt cache
    held ~16x the bytes it is counted at (59 tokens: 2.6 MiB counted, ~42 MiB
    held on SmolLM2)."""
    mx.eval(cache_arrays(cache))
    return cache


def _deliver(batch):
    for ticket, event in batch:
        ticket.events.put_nowait(event)


class InterleavedGenerator:
    """`BatchGenerator`'s insert/next/remove for caches that cannot be batched:
    each sequence keeps its own cache and takes one step per `next()`.
    As in mlx-lm, a returned token has already been fed to its cache."""

    @dataclass
    class Response:
        uid: int
        token: int
        logprobs: mx.array
        finish_reason: str | None
        prompt_cache: list | None
        all_tokens: list | None

    def __init__(self, model, stop_tokens, prefill_step_size=512):
        self.model, self.stop = model, {t for seq in stop_tokens for t in seq}
        self.prefill_step_size, self.seqs, self._uid = prefill_step_size, {}, 0

    def insert(self, prompts, max_tokens, caches, all_tokens, samplers, logits_processors=None):
        uids = []
        processors = logits_processors or [()] * len(prompts)
        for p, m, c, at, s, lp in zip(prompts, max_tokens, caches, all_tokens, samplers, processors):
            self.seqs[self._uid] = dict(pending=list(p), max=m, cache=c, tokens=list(at), sampler=s, n=0, next=None, processors=lp or ())
            uids.append(self._uid)
            self._uid += 1
        return uids

    def _forward(self, seq, tokens):
        logits = self.model(mx.array(tokens)[None], cache=seq["cache"])[:, -1, :]
        seq["tokens"] += tokens
        for processor in seq["processors"]:
            logits = processor(mx.array(seq["tokens"]), logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return seq["sampler"](logprobs), logprobs[0]

    def next(self):
        responses = []
        for uid, seq in list(self.seqs.items()):
            if len(seq["pending"]) > 1:  # prefill a chunk, keep the last prompt token
                chunk = seq["pending"][: min(self.prefill_step_size, len(seq["pending"]) - 1)]
                seq["pending"] = seq["pending"][len(chunk):]
                self.model(mx.array(chunk)[None], cache=seq["cache"])
                mx.eval([c.state for c in seq["cache"]])
                seq["tokens"] += chunk
                continue
            if seq["next"] is None:
                seq["next"], _ = self._forward(seq, seq["pending"])
                seq["pending"] = []
            token = seq["next"].item()
            seq["next"], logprobs = self._forward(seq, [token])
            mx.async_eval(seq["next"], logprobs)
            seq["n"] += 1
            finish = "stop" if token in self.stop else ("length" if seq["n"] >= seq["max"] else None)
            cache = tokens = None
            if finish:
                cache, tokens = seq["cache"], seq["tokens"]
                del self.seqs[uid]
            responses.append(self.Response(uid, token, logprobs, finish, cache, tokens))
        return [], responses

    def remove(self, uids, return_prompt_caches=False):
        out = {}
        for uid in uids:
            seq = self.seqs.pop(uid, None)
            if seq is not None and return_prompt_caches and not seq["pending"]:
                out[uid] = (seq["cache"], seq["tokens"])
        return out

    def __len__(self):
        return len(self.seqs)


class SpeculativeGenerator:
    """The same insert/next/remove over mlx-lm's `speculative_generate_step`:
    one Python generator per sequence (the draft proposes, the model verifies
    in one forward pass, rejected tokens are trimmed from both caches); each
    `next()` takes one token from every sequence. Counts, per sequence, the
    draft tokens proposed and accepted (a round proposes min(left, n) tokens;
    it ends with a token of the model's own)."""

    Response = InterleavedGenerator.Response

    def __init__(self, model, draft_model, num_draft_tokens, stop_tokens, make_cache, prefill_step_size=512, stream=None):
        self.model, self.draft, self.n, self.stream = model, draft_model, num_draft_tokens, stream
        self.stop = {t for seq in stop_tokens for t in seq}
        self.make_cache, self.prefill_step_size = make_cache, prefill_step_size
        self.seqs, self.counts, self._uid = {}, {}, 0

    def insert(self, prompts, max_tokens, caches, all_tokens, samplers, logits_processors=None):
        uids = []
        for p, m, s in zip(prompts, max_tokens, samplers):
            cache = self.make_cache() + make_prompt_cache(self.draft)
            steps = speculative_generate_step(mx.array(list(p)), self.model, self.draft, self.stream, num_draft_tokens=self.n, max_tokens=m,
                                              sampler=s, prompt_cache=cache, prefill_step_size=self.prefill_step_size)
            self.seqs[self._uid] = dict(steps=steps, max=m, n=0, accepted=0, proposed=0, new_round=True)
            uids.append(self._uid)
            self._uid += 1
        return uids

    def next(self):
        responses = []
        for uid, seq in list(self.seqs.items()):
            if seq["new_round"]:
                seq["proposed"] += min(seq["max"] - seq["n"], self.n)
            token, logprobs, from_draft = next(seq["steps"])
            seq["n"] += 1
            seq["accepted"] += bool(from_draft)
            seq["new_round"] = not from_draft
            finish = "stop" if token in self.stop else ("length" if seq["n"] >= seq["max"] else None)
            if finish:
                self.remove([uid])
            responses.append(self.Response(uid, token, logprobs, finish, None, None))
        return [], responses

    def draft_counts(self, uid) -> tuple:
        """(accepted, proposed) draft tokens of a sequence, finished or not."""
        seq = self.seqs.get(uid)
        return (seq["accepted"], seq["proposed"]) if seq is not None else self.counts.pop(uid, (0, 0))

    def remove(self, uids, return_prompt_caches=False):
        for uid in uids:
            seq = self.seqs.pop(uid, None)
            if seq is not None:
                seq["steps"].close()  # its finally block rewinds the caches
                self.counts[uid] = (seq["accepted"], seq["proposed"])
        return {}  # no prefix cache for speculative sequences

    def __len__(self):
        return len(self.seqs)


def batchable(caches) -> bool:
    """Whether mlx-lm's BatchGenerator can merge sequences with these caches."""
    return all(hasattr(type(c), "merge") and getattr(c, "batchable", True) for c in caches)


class Engine:
    """Owns the model; `submit` from the event loop, results arrive as events."""

    def __init__(self, model, tokenizer, make_cache=None, selector=None, prompt_cache_bytes=1 << 30,
                 batch_size=16, prefill_step_size=512, group=None, make_processor=None, draft_model=None, num_draft_tokens=3):
        self.group = group if group is not None and group.size() > 1 else None
        self.next_sync_id = 0
        self.model, self.tokenizer = model, tokenizer
        self.make_cache = make_cache  # None: mlx-lm's caches, batched
        self.batched = make_cache is None or batchable(make_cache())
        self.selector = selector
        self.make_processor = make_processor  # Grammar -> logits processor (structured output)
        self.draft_model, self.num_draft_tokens = draft_model, num_draft_tokens
        self.prompt_cache = LRUPromptCache(max_size=64, max_bytes=prompt_cache_bytes)
        self.batch_size, self.prefill_step_size = batch_size, prefill_step_size
        self.stop_tokens = [[t] for t in sorted(tokenizer.eos_token_ids)]
        self.commands = queue.Queue()
        self.generators = {}  # lane (adapter, speculative) -> generator
        self.tickets = {}  # (lane, uid) -> Ticket
        # Counters /health reports; the seconds say where the engine thread's time goes
        # (model steps, per-token bookkeeping), for profiling a server under load.
        self.stats = dict(requests=0, prompt_tokens=0, cached_tokens=0, generated_tokens=0, steps=0, step_seconds=0.0, token_seconds=0.0)
        if draft_model is not None:
            self.stats.update(draft_tokens_proposed=0, draft_tokens_accepted=0)
        self.thread = threading.Thread(target=self._run, name="optiq-engine", daemon=True)
        self.thread.start()

    # ---- event-loop side -------------------------------------------------
    def submit(self, ticket: Ticket):
        self.next_sync_id += 1
        ticket.sync_id = self.next_sync_id
        self.commands.put(("add", ticket))

    def cancel(self, ticket: Ticket):
        self.commands.put(("cancel", ticket))

    def close(self):
        self.commands.put(("stop", None))
        self.thread.join(timeout=10)

    # ---- engine thread ----------------------------------------------------
    def _generator(self, lane):
        if lane not in self.generators:
            if lane[1]:
                self.generators[lane] = SpeculativeGenerator(self.model, self.draft_model, self.num_draft_tokens, self.stop_tokens,
                                                             self.make_cache or (lambda: make_prompt_cache(self.model)), self.prefill_step_size,
                                                             self.stream)
            elif self.batched:
                self.generators[lane] = BatchGenerator(
                    self.model, stop_tokens=self.stop_tokens, completion_batch_size=self.batch_size,
                    prefill_batch_size=min(8, self.batch_size), prefill_step_size=self.prefill_step_size,
                    stream=self.stream,
                )
            else:
                self.generators[lane] = InterleavedGenerator(self.model, self.stop_tokens, self.prefill_step_size)
        return self.generators[lane]

    def _sampler(self, s):
        if s.seed is not None:
            mx.random.seed(s.seed)
        return make_sampler(temp=s.temperature, top_p=s.top_p if s.top_p < 1 else 0.0, top_k=s.top_k)

    def _add(self, t: Ticket):
        grammar = getattr(t.request, "grammar", None)
        t.lane = (t.adapter, self.draft_model is not None and grammar is None)
        if t.lane[1]:  # the draft's cache is built with the model's: no shared prefix cache
            return self._insert(t, t.prompt, None, [])
        cache, rest = self.prompt_cache.fetch_nearest_cache(t.adapter, t.prompt)
        if cache is not None and not rest:  # an exact hit still needs one token to feed
            trim_prompt_cache(cache, 1)
            rest = t.prompt[-1:]
        if cache is None:
            cache = self.make_cache() if self.make_cache else make_prompt_cache(self.model)
        processors = [t.processor or self.make_processor(grammar)] if grammar is not None else []
        self._insert(t, rest, cache, processors)

    def _insert(self, t: Ticket, rest, cache, processors):
        t.cached_tokens = len(t.prompt) - len(rest)
        t.detokenizer = self.tokenizer.detokenizer  # a fresh copy per access
        gen = self._generator(t.lane)
        args = ([rest], [t.request.max_tokens], [cache], [t.prompt[: t.cached_tokens]], [self._sampler(t.request.sampling)], [processors])
        t.uid = gen.insert(*args)[0]
        t.generator = gen
        self.tickets[(t.lane, t.uid)] = t
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(t.prompt)
        self.stats["cached_tokens"] += t.cached_tokens

    def _finish(self, t: Ticket, reason: str, cache=None, tokens=None, stop_sequence=None):
        t.done = True
        self.tickets.pop((t.lane, t.uid), None)
        if cache is not None and tokens:
            self.prompt_cache.insert_cache(t.adapter, list(tokens), settled(cache))
        tail = t.text[t.sent:]
        event = dict(text=tail, entries=t.entries, finish=reason, prompt_tokens=len(t.prompt),
                     completion_tokens=t.n_tokens, cached_tokens=t.cached_tokens, stop_sequence=stop_sequence)
        if isinstance(t.generator, SpeculativeGenerator):
            event["draft"] = self._count_draft(t)
        t.post(event)

    def _count_draft(self, t: Ticket) -> tuple:
        """(accepted, proposed) draft tokens of a speculative request leaving its generator, added to /health's totals."""
        accepted, proposed = t.generator.draft_counts(t.uid)
        self.stats["draft_tokens_accepted"] += accepted
        self.stats["draft_tokens_proposed"] += proposed
        return accepted, proposed

    def _stop_at(self, t: Ticket):
        """(cut index of the first stop string or None, how much text is safe to send, the stop string)."""
        stops = t.request.stop
        cuts = [(i, s) for i, s in ((t.text.find(s), s) for s in stops) if i >= 0]
        if cuts:
            cut, stop = min(cuts, key=lambda c: c[0])
            return cut, cut, stop
        hold = 0  # keep back a tail that may grow into a stop string
        for s in stops:
            for k in range(min(len(s) - 1, len(t.text)), 0, -1):
                if t.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return None, len(t.text) - hold, None

    def _token(self, t: Ticket, r):
        eos = r.finish_reason == "stop" and r.token in self.tokenizer.eos_token_ids
        t.n_tokens += 1
        self.stats["generated_tokens"] += 1
        before = len(t.text)
        if not eos:
            t.detokenizer.add_token(r.token)
        if r.finish_reason:
            t.detokenizer.finalize()
        t.text += t.detokenizer.last_segment
        if t.request.logprobs and not eos:
            t.entries.append(self._logprob_entry(t, r, t.text[before:]))
        cut, safe, stop = self._stop_at(t)
        if cut is not None:
            t.text = t.text[:cut]
            extracted = t.generator.remove([r.uid], return_prompt_caches=True) if not r.finish_reason else {}
            cache, tokens = extracted.get(r.uid, (r.prompt_cache, r.all_tokens))
            return self._finish(t, "stop", cache, tokens, stop)
        if r.finish_reason:
            return self._finish(t, r.finish_reason, r.prompt_cache, r.all_tokens)
        if t.request.stream and safe > t.sent:
            t.post(dict(text=t.text[t.sent:safe], entries=t.entries))
            t.sent, t.entries = safe, []

    def _logprob_entry(self, t, r, text):
        logprobs = r.logprobs.astype(mx.float32)
        top = []
        if t.request.top_logprobs:
            ids = mx.argpartition(-logprobs, t.request.top_logprobs - 1)[: t.request.top_logprobs]
            vals = logprobs[ids].tolist()
            top = sorted(((self.tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), vals)), key=lambda x: -x[1])
        return (text, logprobs[r.token].item(), top)

    def _step(self, lane, gen):
        if self.selector is not None:
            self.selector.active = lane[0]
        t0 = time.perf_counter()
        _, responses = gen.next()
        t1 = time.perf_counter()
        outbox = []  # one event-loop wake-up per step, not one per request
        for r in responses:
            t = self.tickets.get((lane, r.uid))
            if t is not None and not t.done:
                t.outbox = outbox
                try:
                    self._token(t, r)
                finally:
                    t.outbox = None
        by_loop = {}
        for t, event in outbox:
            by_loop.setdefault(t.loop, []).append((t, event))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_deliver, batch)
        self.stats["steps"] += 1
        self.stats["step_seconds"] += t1 - t0
        self.stats["token_seconds"] += time.perf_counter() - t1

    def _command(self, cmd, t):
        if cmd == "add":
            try:
                self._add(t)
            except Exception as exc:  # a bad request must not stop the engine
                t.post(dict(error=f"{type(exc).__name__}: {exc}"))
        elif cmd == "cancel" and t.uid is not None and not t.done:
            t.done = True
            self.tickets.pop((t.lane, t.uid), None)
            t.generator.remove([t.uid])
            if isinstance(t.generator, SpeculativeGenerator):
                self._count_draft(t)

    def _waiting_commands(self) -> list:
        """Every command waiting now (blocking while nothing is in flight)."""
        cmds = []
        try:
            cmds.append(self.commands.get(block=not self.tickets))
            while True:
                cmds.append(self.commands.get_nowait())
        except queue.Empty:
            pass
        return cmds

    def _run(self):
        profile = os.environ.get("OPTIQ_PROFILE")  # a path: the engine thread's cProfile, rewritten every 10 s
        if not profile:
            return self._loop()
        profiler, stop = cProfile.Profile(), threading.Event()

        def dump():
            while not stop.wait(10):
                with open(profile, "w") as f:
                    pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(40)

        threading.Thread(target=dump, daemon=True).start()
        try:
            return profiler.runcall(self._loop)
        finally:
            stop.set()

    def _loop(self):
        self.stream = mx.default_stream(mx.default_device())
        if self.group is not None:
            share_random_state(self.group)
        while True:
            cmds = self._waiting_commands() if self.is_leader else []
            if self.group is not None:
                cmds = self._shared(cmds)
            for cmd, t in cmds:
                if cmd == "stop":
                    return
                self._command(cmd, t)
            # a fixed order: every rank must step the same generators in turn
            for lane in sorted({lane for lane, _ in self.tickets}, key=str):
                try:
                    self._step(lane, self.generators[lane])
                except Exception as exc:
                    self._fail_all(lane, exc)

    # ---- distributed: the same commands on every rank ------------------------
    @property
    def is_leader(self) -> bool:
        return self.group is None or self.group.rank() == 0

    def _shared(self, cmds: list) -> list:
        """The leader's commands, on every rank (followers block here while idle)."""
        if self.is_leader:
            share_bytes(self.group, json.dumps([encode_command(c, t) for c, t in cmds]).encode())
            return cmds
        by_id = {t.sync_id: t for t in self.tickets.values()}
        return [decode_command(x, by_id) for x in json.loads(share_bytes(self.group, None))]

    def _fail_all(self, lane, exc):
        for key, t in list(self.tickets.items()):
            if key[0] == lane:
                self.tickets.pop(key)
                t.done = True
                t.post(dict(error=f"generation failed: {type(exc).__name__}: {exc}"))
        self.generators.pop(lane, None)


# ---- distributed helpers ----------------------------------------------------

def share_bytes(group, data: bytes | None) -> bytes:
    """Rank 0's bytes on every rank: two all_sums (the size, then the bytes)."""
    leader = group.rank() == 0
    size = mx.distributed.all_sum(mx.array(len(data) if leader else 0), group=group, stream=mx.cpu).item()
    buf = mx.array(np.frombuffer(data, dtype=np.uint8)) if leader else mx.zeros((size,), dtype=mx.uint8)
    out = mx.distributed.all_sum(buf, group=group, stream=mx.cpu)
    return bytes(np.array(out, dtype=np.uint8))


def share_random_state(group):
    """One random seed for every rank, picked by rank 0."""
    seed = random.randrange(1 << 31) if group.rank() == 0 else 0
    mx.random.seed(int(mx.distributed.all_sum(mx.array(seed), group=group, stream=mx.cpu).item()))


def encode_command(cmd: str, t) -> dict:
    if cmd != "add":
        return {"cmd": cmd, "id": getattr(t, "sync_id", 0)}
    r = t.request
    return {"cmd": cmd, "id": t.sync_id, "prompt": list(t.prompt), "adapter": t.adapter, "max_tokens": r.max_tokens,
            "sampling": [r.sampling.temperature, r.sampling.top_p, r.sampling.top_k, r.sampling.seed],
            "stop": list(r.stop), "stream": r.stream, "logprobs": r.logprobs, "top_logprobs": r.top_logprobs,
            "grammar": None if r.grammar is None else [r.grammar.kind, r.grammar.spec]}


def decode_command(x: dict, by_id: dict):
    """A follower's copy of the leader's command (its ticket posts nowhere)."""
    if x["cmd"] != "add":
        return x["cmd"], by_id.get(x["id"], Ticket(None, [], None, None, None, done=True))
    request = SimpleNamespace(max_tokens=x["max_tokens"], sampling=Sampling(*x["sampling"]), stop=tuple(x["stop"]),
                              stream=x["stream"], logprobs=x["logprobs"], top_logprobs=x["top_logprobs"],
                              grammar=None if x["grammar"] is None else Grammar(*x["grammar"]))
    return "add", Ticket(request, x["prompt"], x["adapter"], None, None, sync_id=x["id"])
