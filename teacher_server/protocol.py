"""Wire protocol of the teacher log-prob service (a public contract).

Imported by the server (`teacher_server.server`) and by clients
(`rollout/teacher_client.py`); it imports only msgspec and the standard library
(no vllm, no torch), so a client can depend on it cheaply; only
`load_tokenizer_info` imports transformers, when it is called.

Endpoints
---------
GET  /health        200 {"status": "ok"} once the engine can score; 503 {"status": "loading"} before.
GET  /v1/model      ModelInfo: {"model", "vocab_size", "max_model_len", "dtype", "tokenizer_sha256",
                    "max_top_k", "tokenizer_size"}. `tokenizer_sha256` is
                    `TokenizerInfo.sha256()` of the teacher's tokenizer: a hash of what scoring
                    depends on (the token->id map and the ids added around every text, not
                    the chat template or eos_token); a client compares it with the student's
                    to refuse a teacher whose tokenizer differs. `max_model_len` is the longest `token_ids` that
                    /v1/logprobs accepts (and the cap on prompt + max_new_tokens of
                    /v1/generate): the engine's context length minus one, since vLLM
                    samples one token after a scored prompt.
POST /v1/logprobs   LogprobsRequest -> LogprobsResponse
    {"sequences": [{"token_ids": [int, ...], "start": int}, ...], "top_k": 0, "temperature": 1.0}
    For each sequence, positions start .. len(token_ids)-1 are scored (start >= 1):
    results[i].logprobs[j] = log p_T(token_ids[start + j] | token_ids[:start + j]),
    so len(logprobs) == len(token_ids) - start. p_T = softmax(logits / temperature).
    With top_k = K > 0, results[i].top_ids[j] / top_logprobs[j] hold the K most likely
    tokens at that position under p_T, most likely first (the order of ties is unspecified).
POST /v1/generate   GenerateRequest -> GenerateResponse (teacher-sampled completions, for the
                    off-policy variants: sequence-level KD, supervised KD)
    {"prompts": [{"token_ids": [int, ...]}], "n": 1, "max_new_tokens": 64, "temperature": 1.0,
     "top_p": 1.0, "seed": null, "stop_token_ids": []}
    -> {"model": str, "results": [{"samples": [{"token_ids": [...], "logprobs": [...],
        "finish_reason": "length" | "stop"}, ...n]}, ...one per prompt]}
    samples[k].logprobs[j] is the log-prob of token_ids[j] under the distribution it was
    sampled from (temperature and top_p applied), so it can serve as an importance
    ratio's denominator. `seed` makes sampling reproducible (prompt i, sample k uses
    seed + i * n + k).
GET  /v1/tokenizer  TokenizerInfo: {"vocab": {token: id}, "prefix_ids", "suffix_ids"}: what the hash
                    covers, in full (a vocabulary of ~150k tokens is a few MB: a client fetches
                    it only when the hashes differ, to say which ids differ).
GET  /metrics       Prometheus text format.

Encodings
---------
JSON (`application/json`) always. MessagePack (`application/msgpack`, the same
schema; msgspec decodes it without building intermediate Python dicts) when the
request's Content-Type is it; the response uses the request's Accept (default: the
request's Content-Type). Neither encoding can carry executable objects (no pickle).

Errors
------
Every non-2xx reply has the body `ErrorBody`: {"error": {"type", "message", "field"}}.
`field` is a JSONPath-like location of the bad input (e.g. "sequences[2].start") or
null. Status codes: 400 invalid_request, 401 unauthorized, 404 not_found,
405 method_not_allowed, 408 request_timeout (body not received in time), 413 request_too_large, 415 unsupported_media_type,
429 overloaded (with a Retry-After header), 503 loading / shutting_down / engine_dead
(Retry-After),
500 internal.
Authentication: when the server has an API key, every endpoint except /health needs
`Authorization: Bearer <key>`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_MSGPACK = "application/msgpack"
CONTENT_TYPES = (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK)

# Static limits (also checked by the server; vocab- and length-dependent checks are in
# `validate_logprobs_request` / `validate_generate_request`).
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
DEFAULT_MAX_TOP_K = 20
# vLLM's SamplingParams refuses sampling temperatures above 2.0 (scoring has no such limit).
MAX_GENERATE_TEMPERATURE = 2.0

# --------------------------------------------------------------------------- /v1/logprobs

class ScoreSequence(msgspec.Struct, forbid_unknown_fields=True):
    """One sequence to score: positions start .. len(token_ids)-1."""

    token_ids: list[int]
    start: int


class LogprobsRequest(msgspec.Struct, forbid_unknown_fields=True):
    sequences: list[ScoreSequence]
    top_k: int = 0
    temperature: float = 1.0


class SequenceLogprobs(msgspec.Struct, omit_defaults=True):
    """Scores of one sequence; `top_*` only present when top_k > 0."""

    logprobs: list[float]  # (T - start,)
    top_ids: list[list[int]] | None = None  # (T - start, K)
    top_logprobs: list[list[float]] | None = None  # (T - start, K)


class LogprobsResponse(msgspec.Struct):
    model: str
    results: list[SequenceLogprobs]


# --------------------------------------------------------------------------- /v1/generate

class GeneratePrompt(msgspec.Struct, forbid_unknown_fields=True):
    token_ids: list[int]


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    prompts: list[GeneratePrompt]
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = []


class GenerateSample(msgspec.Struct):
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "length" | "stop"


class GenerateResult(msgspec.Struct):
    samples: list[GenerateSample]


class GenerateResponse(msgspec.Struct):
    model: str
    results: list[GenerateResult]


# --------------------------------------------------------------------------- /v1/model, /health, errors

class ModelInfo(msgspec.Struct):
    model: str
    vocab_size: int
    max_model_len: int
    dtype: str
    tokenizer_sha256: str
    max_top_k: int = DEFAULT_MAX_TOP_K
    tokenizer_size: int = 0  # entries in the token->id map (0: not reported)


class Health(msgspec.Struct):
    status: Literal["ok", "loading", "shutting_down", "engine_dead"]


class ErrorDetail(msgspec.Struct):
    type: str
    message: str
    field: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class ProtocolError(Exception):
    """A request the server refuses, with its HTTP status. Raised by the validators
    here and by the server; a client raises it from an error reply (`from_body`).
    Pickles (plain constructor args), so it can cross a Ray actor boundary."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(status, type, message, field, retry_after_s)
        self.status = status
        self.type = type
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"{self.status} {self.type}{where}: {self.message}"

    def to_body(self) -> ErrorBody:
        return ErrorBody(ErrorDetail(type=self.type, message=self.message, field=self.field))

    @classmethod
    def from_body(cls, status: int, body: bytes, content_type: str = CONTENT_TYPE_JSON,
                  retry_after_s: float | None = None) -> "ProtocolError":
        """Build the error a client should raise from a non-2xx reply (any body)."""
        try:
            detail = decode(body, ErrorBody, content_type).error
            return cls(status, detail.type, detail.message, detail.field, retry_after_s)
        except ProtocolError:
            text = body[:500].decode("utf-8", "replace")
            return cls(status, "http_error", f"HTTP {status}: {text}", None, retry_after_s)


def invalid(field: str | None, message: str) -> ProtocolError:
    return ProtocolError(400, "invalid_request", message, field)


# --------------------------------------------------------------------------- encode / decode

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_T = TypeVar("_T")
_decoders: dict[tuple[type, str], Any] = {}


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type/Accept value (params and case dropped);
    JSON when absent or '*/*'."""
    if not content_type:
        return CONTENT_TYPE_JSON
    base = content_type.split(",")[0].split(";")[0].strip().lower()
    if base in ("", "*/*", "application/*"):
        return CONTENT_TYPE_JSON
    if base in ("application/x-msgpack", "application/vnd.msgpack"):
        return CONTENT_TYPE_MSGPACK
    return base


def encode(obj: Any, content_type: str = CONTENT_TYPE_JSON) -> bytes:
    ct = media_type(content_type)
    if ct == CONTENT_TYPE_MSGPACK:
        return _msgpack_encoder.encode(obj)
    if ct == CONTENT_TYPE_JSON:
        return _json_encoder.encode(obj)
    raise ProtocolError(415, "unsupported_media_type",
                        f"content type {content_type!r} is not supported; use one of {list(CONTENT_TYPES)}")


_PATH_RE = re.compile(r" - at `\$\.?(.*)`$")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]*)`")
_MISSING_RE = re.compile(r"missing required field `([^`]*)`")


def _error_field(msg: str) -> str | None:
    """Turn msgspec's '... - at `$.sequences[0].start`' into 'sequences[0].start',
    appending the unknown/missing field's own name when the message gives one."""
    m = _PATH_RE.search(msg)
    path = m.group(1) if m else None
    for rx in (_UNKNOWN_RE, _MISSING_RE):
        f = rx.search(msg)
        if f:
            return f"{path}.{f.group(1)}" if path else f.group(1)
    return path or None


def decode(body: bytes, type: type[_T], content_type: str | None = CONTENT_TYPE_JSON) -> _T:
    """Decode and type-check a body; raises ProtocolError(400) naming the field on
    malformed input, wrong types, missing or unknown fields."""
    ct = media_type(content_type)
    key = (type, ct)
    dec = _decoders.get(key)
    if dec is None:
        if ct == CONTENT_TYPE_JSON:
            dec = msgspec.json.Decoder(type)
        elif ct == CONTENT_TYPE_MSGPACK:
            dec = msgspec.msgpack.Decoder(type)
        else:
            raise ProtocolError(415, "unsupported_media_type",
                                f"content type {content_type!r} is not supported; use one of "
                                f"{list(CONTENT_TYPES)}")
        _decoders[key] = dec
    try:
        return dec.decode(body)
    except msgspec.ValidationError as e:
        msg = str(e)
        return _raise(invalid(_error_field(msg), f"{msg.split(' - at ')[0]}"), e)
    except msgspec.DecodeError as e:
        return _raise(invalid(None, f"malformed {ct} body: {e}"), e)


def _raise(err: ProtocolError, cause: Exception):
    raise err from cause


# --------------------------------------------------------------------------- semantic validation

def _check_ids(ids: list[int], vocab_size: int, field: str) -> None:
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        bad_j = next(j for j, t in enumerate(ids) if t < 0 or t >= vocab_size)
        raise invalid(f"{field}[{bad_j}]", f"token id {ids[bad_j]} is out of range: valid ids are "
                      f"0 .. {vocab_size - 1} (the teacher's vocab size is {vocab_size})")


def _check_temperature(t: float, field: str = "temperature") -> None:
    if not (math.isfinite(t) and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        raise invalid(field, f"temperature {t} is out of range: valid is {MIN_TEMPERATURE} .. "
                      f"{MAX_TEMPERATURE}")


def validate_logprobs_request(req: LogprobsRequest, vocab_size: int, max_model_len: int,
                              max_top_k: int = DEFAULT_MAX_TOP_K) -> None:
    """Raise ProtocolError(400) naming the first bad field; the same checks the server runs."""
    if not req.sequences:
        raise invalid("sequences", "no sequences: send at least one {token_ids, start}")
    if not 0 <= req.top_k <= max_top_k:
        raise invalid("top_k", f"top_k {req.top_k} is out of range: valid is 0 .. {max_top_k} "
                      "(0 = only the given token's logprob)")
    _check_temperature(req.temperature)
    for i, seq in enumerate(req.sequences):
        n = len(seq.token_ids)
        if n == 0:
            raise invalid(f"sequences[{i}].token_ids", "empty sequence: token_ids needs at least 2 ids "
                          "(a context token and one token to score)")
        if n > max_model_len:
            raise invalid(f"sequences[{i}].token_ids", f"sequence of {n} tokens is longer than the "
                          f"teacher's max_model_len {max_model_len}; truncate it or raise --max-model-len")
        if not 1 <= seq.start <= n - 1:
            raise invalid(f"sequences[{i}].start", f"start {seq.start} is out of range for a sequence of "
                          f"{n} tokens: valid is 1 .. {n - 1} (position 0 has no context to score it)")
        _check_ids(seq.token_ids, vocab_size, f"sequences[{i}].token_ids")


def validate_generate_request(req: GenerateRequest, vocab_size: int, max_model_len: int,
                              max_n: int = 64) -> None:
    if not req.prompts:
        raise invalid("prompts", "no prompts: send at least one {token_ids}")
    if not 1 <= req.n <= max_n:
        raise invalid("n", f"n {req.n} is out of range: valid is 1 .. {max_n}")
    if req.max_new_tokens < 1:
        raise invalid("max_new_tokens", f"max_new_tokens {req.max_new_tokens} must be >= 1")
    _check_temperature(req.temperature)
    if req.temperature > MAX_GENERATE_TEMPERATURE:
        raise invalid("temperature", f"temperature {req.temperature} is out of range for sampling: valid is "
                      f"{MIN_TEMPERATURE} .. {MAX_GENERATE_TEMPERATURE} (vLLM's sampler limit)")
    if not (math.isfinite(req.top_p) and 0.0 < req.top_p <= 1.0):
        raise invalid("top_p", f"top_p {req.top_p} is out of range: valid is (0, 1]")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise invalid("seed", f"seed {req.seed} is out of range: valid is 0 .. 2**63-1 or null")
    if req.stop_token_ids:
        _check_ids(req.stop_token_ids, vocab_size, "stop_token_ids")
    for i, p in enumerate(req.prompts):
        n = len(p.token_ids)
        if n == 0:
            raise invalid(f"prompts[{i}].token_ids", "empty prompt: token_ids needs at least 1 id")
        if n + req.max_new_tokens > max_model_len:
            raise invalid(f"prompts[{i}].token_ids", f"prompt of {n} tokens + max_new_tokens "
                          f"{req.max_new_tokens} exceeds the teacher's max_model_len {max_model_len}")
        _check_ids(p.token_ids, vocab_size, f"prompts[{i}].token_ids")


def count_tokens(req: LogprobsRequest | GenerateRequest) -> int:
    """Tokens a request costs the engine (what the server's queue bound counts)."""
    if isinstance(req, LogprobsRequest):
        return sum(len(s.token_ids) for s in req.sequences)
    return sum((len(p.token_ids) + req.max_new_tokens) * req.n for p in req.prompts)


# --------------------------------------------------------------------------- tokenizer compatibility

# What scoring depends on. The teacher scores the student's token ids as they
# are, so two tokenizers are compatible when every id names the same token
# (the token->id map, added tokens included) and the tokenizer adds the same
# ids around every encoded text (a BOS the teacher expects at position 0).
# The chat template, `eos_token`, normalizer and pre-tokenizer do not enter:
# a Base student under its Instruct teacher differs in exactly those and
# scores correctly.

class TokenizerInfo(msgspec.Struct):
    """GET /v1/tokenizer: the part of a tokenizer that scoring depends on."""

    vocab: dict[str, int]  # token -> id, added tokens included
    prefix_ids: list[int]  # ids added before every encoded text (e.g. [bos_id]), often []
    suffix_ids: list[int]  # ids added after it (e.g. [eos_id] with add_eos_token), often []

    def sha256(self) -> str:
        """sha256 hex of the canonical form: (id, token) pairs sorted, then the
        prefix and suffix ids. Equal hashes <=> compatible tokenizers."""
        h = hashlib.sha256()
        pairs = sorted((i, t) for t, i in self.vocab.items())
        h.update(json.dumps([pairs, self.prefix_ids, self.suffix_ids], ensure_ascii=False,
                            separators=(",", ":")).encode())
        return h.hexdigest()


# Files of which a model directory needs one to have a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "tokenizer_config.json")


def tokenizer_info(tokenizer) -> TokenizerInfo:
    """TokenizerInfo of a loaded Hugging Face tokenizer (anything with
    `get_vocab()` and `__call__(text, add_special_tokens=...)`, e.g. vLLM's)."""
    vocab = {str(t): int(i) for t, i in tokenizer.get_vocab().items()}
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return TokenizerInfo(vocab=vocab, prefix_ids=full[:k], suffix_ids=full[k + len(plain):])
    return TokenizerInfo(vocab=vocab, prefix_ids=full, suffix_ids=[])


def load_tokenizer_info(path: str | Path) -> TokenizerInfo:
    """TokenizerInfo of the tokenizer saved in model directory `path` (loads it
    with transformers' AutoTokenizer, which is what vLLM does)."""
    d = Path(path)
    if not any((d / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files in {d}: expected one of {list(_TOKENIZER_FILES)}")
    from transformers import AutoTokenizer

    return tokenizer_info(AutoTokenizer.from_pretrained(str(d)))


def tokenizer_fingerprint(tokenizer: str | Path | TokenizerInfo) -> str:
    """`tokenizer_sha256` of /v1/model: `TokenizerInfo.sha256()` of a model
    directory's tokenizer (or of a TokenizerInfo)."""
    info = tokenizer if isinstance(tokenizer, TokenizerInfo) else load_tokenizer_info(tokenizer)
    return info.sha256()


def tokenizer_differences(student: TokenizerInfo, teacher: TokenizerInfo, limit: int = 6) -> list[str]:
    """What differs between two tokenizers, for scoring, as readable lines
    (empty when compatible): the ids whose token differs (the first `limit`,
    and how many in all) and the ids added around every text."""
    out = []

    def by_id(vocab: dict[str, int]) -> dict[int, str]:
        inv: dict[int, list[str]] = {}
        for t, i in vocab.items():
            inv.setdefault(i, []).append(t)
        return {i: " | ".join(repr(t) for t in sorted(ts)) for i, ts in inv.items()}

    s_ids, t_ids = by_id(student.vocab), by_id(teacher.vocab)
    bad = sorted(i for i in s_ids.keys() | t_ids.keys() if s_ids.get(i) != t_ids.get(i))
    if bad:
        shown = "; ".join(f"id {i}: student {s_ids.get(i, '(none)')}, teacher {t_ids.get(i, '(none)')}"
                          for i in bad[:limit])
        more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
        out.append(f"{len(bad)} token {'ids map' if len(bad) != 1 else 'id maps'} to different tokens "
                   f"(id{'s' if len(bad) != 1 else ''} {', '.join(map(str, bad[:limit]))}"
                   f"{'...' if len(bad) > limit else ''}): {shown}{more}")
    for what, s, t in (("before", student.prefix_ids, teacher.prefix_ids),
                       ("after", student.suffix_ids, teacher.suffix_ids)):
        if s != t:
            out.append(f"the student's tokenizer adds ids {s} {what} every text, the teacher's {t} "
                       f"(e.g. a BOS token one of them expects)")
    return out
