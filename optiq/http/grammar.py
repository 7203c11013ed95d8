"""Structured output: a grammar (JSON schema, regex, Lark, a choice of
strings) enforced while decoding, as an mlx-lm logits processor.

llguidance does the work: it compiles JSON schemas, regexes and Lark
grammars into one matcher, computes the allowed-token mask against the
tokenizer's real vocabulary in tens of microseconds (its lexer walks the
token trie, so a 150k vocabulary costs no more than a small one), and is the
engine behind the major structured-output APIs. xgrammar covers JSON and EBNF
but not regexes directly; outlines-core builds an index per regex that is
slow for large schemas. The mask is applied with mx.where, so constrained
requests stay in the same BatchGenerator batch as the others.
"""

import json
from functools import lru_cache

import attrs
import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask


class GrammarError(ValueError):
    """A schema, regex or grammar that llguidance refuses, with its message."""


@attrs.frozen
class Grammar:
    """A compiled-on-demand constraint: llguidance's grammar JSON, and what it came from."""

    kind: str  # "json_object", "json_schema", "regex", "lark", "choice", "tool_call"
    spec: str  # llguidance's top-level grammar (JSON text)


# JSON as json.dumps writes it: with flexible whitespace (llguidance's
# default) a weak model can spend its whole budget on newlines between tokens.
COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _compact(schema: dict) -> dict:
    return {**schema, "x-guidance": {**COMPACT, **schema.get("x-guidance", {})}}


def json_schema(schema: dict | None) -> Grammar:
    """Any JSON object (schema None), or values of `schema`."""
    if schema is None:
        return Grammar("json_object", llguidance.LLMatcher.grammar_from_json_schema(_compact({"type": "object"})))
    return Grammar("json_schema", llguidance.LLMatcher.grammar_from_json_schema(_compact(schema)))


def regex(pattern: str) -> Grammar:
    return Grammar("regex", llguidance.LLMatcher.grammar_from_regex(pattern))


def lark(text: str) -> Grammar:
    return Grammar("lark", llguidance.LLMatcher.grammar_from_lark(text))


def choice(options) -> Grammar:
    """Exactly one of the strings."""
    body = " | ".join(json.dumps(o) for o in options)
    return Grammar("choice", llguidance.LLMatcher.grammar_from_lark(f"start: {body}"))


def tagged_json(prefix: str, suffix: str, schema: dict) -> Grammar:
    """`prefix`, a JSON value of `schema`, then `suffix`: a tool call in the
    chat template's own tags (Hermes/Qwen's <tool_call>...</tool_call>)."""
    body = f"start: {json.dumps(prefix)} obj {json.dumps(suffix)}\nobj: %json {json.dumps(_compact(schema))}"
    return Grammar("tool_call", llguidance.LLMatcher.grammar_from_lark(body))


@lru_cache(maxsize=8)
def _lltokenizer(hf_tokenizer, n_vocab: int, eos: tuple):
    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab, eos_token=list(eos))


def lltokenizer(tokenizer, n_vocab: int):
    """llguidance's view of an mlx-lm TokenizerWrapper, sized to the model's
    logits (embedding tables are often padded past the tokenizer)."""
    return _lltokenizer(tokenizer._tokenizer, int(n_vocab), tuple(sorted(tokenizer.eos_token_ids)))


class GrammarProcessor:
    """An mlx-lm logits processor: tokens the grammar refuses get -inf.

    mlx-lm calls it once per decode step with the tokens so far; from the
    second call on, the last of them is the token sampled under the previous
    mask, which the matcher consumes before the next mask. Once the grammar is
    complete only end-of-sequence is allowed, so the request ends there.
    The mask travels packed, 32 tokens a word, and is unpacked on the device.

    Made in the request handler: compiling the grammar here is its only
    check, so a grammar llguidance refuses is a GrammarError (a 400) before
    the request is queued."""

    def __init__(self, grammar: Grammar, lltok, n_vocab: int):
        self.matcher = llguidance.LLMatcher(lltok, grammar.spec)
        if self.matcher.is_error():
            raise GrammarError(" ".join(self.matcher.get_error().split())[:400] or "invalid grammar")
        self.mask = allocate_token_bitmask(1, n_vocab)
        self.n_vocab, self.started = n_vocab, False

    def __call__(self, tokens, logits):
        if self.started:
            self.matcher.consume_token(int(tokens[-1].item()))
        self.started = True
        fill_next_token_bitmask(self.matcher, self.mask, 0)
        return apply_bitmask(logits, mx.array(self.mask.view(np.uint32)))


def apply_bitmask(logits: mx.array, words: mx.array) -> mx.array:
    """logits where the packed mask's bit is set (bit j of word i: token 32 i + j), else -inf."""
    bits = (words.reshape(-1, 1) >> mx.arange(32, dtype=mx.uint32)) & 1
    allowed = bits.reshape(-1)[: logits.shape[-1]].astype(mx.bool_)
    if allowed.shape[0] < logits.shape[-1]:  # a mask narrower than the logits allows none of the rest
        allowed = mx.concatenate([allowed, mx.zeros((logits.shape[-1] - allowed.shape[0],), dtype=mx.bool_)])
    return mx.where(allowed, logits, mx.array(-float("inf"), logits.dtype))
