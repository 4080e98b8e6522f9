"""Property-based fuzzing of teacher_server's wire protocol,
at unit level: `decode`, `validate_logprobs_request`, `validate_generate_request`,
`media_type`, `ProtocolError.from_body`. No server; milliseconds per example.

    .venv/bin/python -m pytest tests/unit/test_fuzz_protocol.py -x -q

Properties:
- `decode` of any bytes under any content type returns the typed request or
  raises ProtocolError 400 (malformed / wrong type / unknown or missing field)
  or 415 (unsupported type); never another exception. JSON and MessagePack
  encodings of one body get the same verdict.
- The validators accept exactly the requests the protocol's documented rules
  accept (an independent oracle written from protocol.py's docstring), and a
  refusal names the same first bad field as the oracle; that field is a path
  that exists in the request.
- `media_type` and `ProtocolError.from_body` accept anything.
"""

from __future__ import annotations

import json
import math
import re

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from teacher_server.protocol import (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, MAX_TEMPERATURE, MIN_TEMPERATURE,
                                     GenerateRequest, LogprobsRequest, ProtocolError, decode, media_type,
                                     validate_generate_request, validate_logprobs_request)

V, L, K = 320, 64, 20  # vocab, max_model_len, max_top_k of the validators under test
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

token = st.one_of(st.integers(0, V - 1), st.integers(0, V - 1), st.integers(-3, V + 3),
                  st.sampled_from([-2**63, 2**63 - 1, V, -1]))
ints = st.one_of(st.integers(-3, 80), st.sampled_from([2**63 - 1, -2**63, 2**64, 10**30]))
temperatures = st.floats(MIN_TEMPERATURE, MAX_TEMPERATURE)
floats = st.one_of(temperatures, st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    [0.0, MIN_TEMPERATURE, MAX_TEMPERATURE, 1.0, 0.5, 1e-3, 1e4, 100.0000001]))
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=4), floats, st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def maybe(draw, strategy, dirty: bool):
    """`strategy`, or in a dirty body sometimes a value of a wrong type."""
    return draw(junk) if dirty and draw(st.integers(0, 5)) == 0 else draw(strategy)


@st.composite
def token_list(draw, max_len: int = L + 2) -> list[int]:
    """Valid ids (short, or around the length limit), sometimes one bad id."""
    n = draw(st.integers(0, 12) | st.integers(max(0, max_len - 4), max_len))
    ids = draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n))
    if ids and draw(st.integers(0, 3)) == 0:
        ids[draw(st.integers(0, len(ids) - 1))] = draw(token)
    return ids


@st.composite
def sequence(draw, dirty: bool):
    ids = maybe(draw, token_list(), dirty)
    n = len(ids) if isinstance(ids, list) else 3
    start = st.integers(1, max(1, n - 1)) | st.integers(1, max(1, n - 1)) | st.integers(-1, n + 1) | ints
    seq = {"token_ids": ids, "start": maybe(draw, start, dirty)}
    if dirty and draw(st.integers(0, 7)) == 0:
        del seq[draw(st.sampled_from(["token_ids", "start"]))]
    if dirty and draw(st.integers(0, 7)) == 0:
        seq[draw(st.text(max_size=5))] = draw(junk)
    return seq


@st.composite
def logprobs_body(draw):
    # Half the bodies are well-typed (they reach the semantic validator), half carry
    # wrong types, unknown and missing fields (they exercise decode's errors).
    dirty = draw(st.booleans())
    body = {"sequences": maybe(draw, st.lists(sequence(dirty), min_size=1, max_size=4) | st.just([]), dirty)}
    if draw(st.booleans()):
        body["top_k"] = maybe(draw, st.integers(0, K) | st.integers(-2, K + 2) | ints, dirty)
    if draw(st.booleans()):
        body["temperature"] = maybe(draw, temperatures | floats | st.integers(-1, 200), dirty)
    if dirty and draw(st.integers(0, 7)) == 0:
        body[draw(st.text(max_size=5))] = draw(junk)
    if dirty and draw(st.integers(0, 10)) == 0:
        body.pop("sequences")
    return body


@st.composite
def generate_body(draw):
    dirty = draw(st.booleans())
    ids = token_list(20) | st.lists(token, max_size=L + 3)
    prompts = [{"token_ids": maybe(draw, ids, dirty)}
               for _ in range(draw(st.sampled_from([0, 1, 1, 2, 2, 3])))]
    body = {"prompts": maybe(draw, st.just(prompts), dirty)}
    for name, strat in [("n", st.integers(1, 4) | st.integers(-1, 70)),
                        ("max_new_tokens", st.integers(1, 8) | st.integers(-1, L + 2)),
                        ("temperature", temperatures | floats), ("top_p", st.floats(0.01, 1) | floats),
                        ("seed", st.none() | st.integers(0, 2**63 - 1) | ints),
                        ("stop_token_ids", st.lists(st.integers(0, V - 1), max_size=3) | st.lists(token, max_size=3))]:
        if draw(st.booleans()):
            body[name] = maybe(draw, strat, dirty)
    return body


def encodings(body) -> list[tuple[bytes, str]]:
    """The body as JSON (any int size; NaN/Infinity written as JavaScript does,
    which strict JSON refuses) and, when msgpack can carry it, MessagePack."""
    out = [(json.dumps(body, allow_nan=True).encode(), CONTENT_TYPE_JSON)]
    try:
        out.append((msgspec.msgpack.encode(body), CONTENT_TYPE_MSGPACK))
    except (OverflowError, TypeError):  # ints beyond 64 bits
        pass
    return out


def _resolve(obj, field: str) -> bool:
    """Does `field` ("sequences[2].token_ids[5]") name a location in `obj`?"""
    for name, index in re.findall(r"([A-Za-z_]\w*)|\[(\d+)\]", field):
        try:
            obj = getattr(obj, name) if name else obj[int(index)]
        except (AttributeError, IndexError, TypeError):
            return False
    return True


def oracle_logprobs(req: LogprobsRequest) -> str | None:
    """The first bad field by protocol.py's documented rules, or None."""
    if not req.sequences:
        return "sequences"
    if not 0 <= req.top_k <= K:
        return "top_k"
    if not (math.isfinite(req.temperature) and MIN_TEMPERATURE <= req.temperature <= MAX_TEMPERATURE):
        return "temperature"
    for i, s in enumerate(req.sequences):
        if not 1 <= len(s.token_ids) <= L:
            return f"sequences[{i}].token_ids"
        if not 1 <= s.start <= len(s.token_ids) - 1:
            return f"sequences[{i}].start"
        for j, t in enumerate(s.token_ids):
            if not 0 <= t < V:
                return f"sequences[{i}].token_ids[{j}]"
    return None


def _verdict(body: bytes, ct: str, typ):
    try:
        return decode(body, typ, ct), None
    except ProtocolError as e:
        assert e.status == 400 and e.type == "invalid_request" and e.message, e
        assert e.field is None or isinstance(e.field, str)
        return None, e


@SETTINGS
@given(body=logprobs_body())
def test_logprobs_decode_and_validate_agree_with_the_spec(body):
    verdicts = []
    for raw, ct in encodings(body):
        req, err = _verdict(raw, ct, LogprobsRequest)
        verdicts.append(err is None)
        if req is None:
            event(f"{ct} verdict: decode error")
            continue
        want = oracle_logprobs(req)
        event(f"{ct} verdict: {re.sub(r'[0-9]+', 'N', want or 'valid')}")  # --hypothesis-show-statistics
        try:
            validate_logprobs_request(req, V, L, K)
            got = None
        except ProtocolError as e:
            assert e.status == 400 and e.type == "invalid_request" and e.message
            got = e.field
            assert _resolve(req, got), f"error field {got!r} is not a location in the request"
        assert got == want, (got, want, req)
    # Same verdict in both encodings, unless the body holds NaN/inf (not JSON numbers).
    if b"NaN" not in encodings(body)[0][0] and b"Infinity" not in encodings(body)[0][0]:
        assert len(set(verdicts)) == 1, f"JSON and MessagePack disagree on {body!r}: {verdicts}"


@SETTINGS
@given(body=generate_body())
def test_generate_decode_and_validate_never_crash(body):
    for raw, ct in encodings(body):
        req, _ = _verdict(raw, ct, GenerateRequest)
        if req is None:
            continue
        try:
            validate_generate_request(req, V, L)
        except ProtocolError as e:
            assert e.status == 400 and e.field and _resolve(req, e.field), e
            event(f"generate refused: {re.sub(r'[0-9]+', 'N', e.field)}")
            continue
        event("generate accepted")
        # Accepted: the documented rules hold.
        assert req.prompts and 1 <= req.n <= 64 and req.max_new_tokens >= 1
        assert all(1 <= len(p.token_ids) and len(p.token_ids) + req.max_new_tokens <= L for p in req.prompts)
        assert all(0 <= t < V for p in req.prompts for t in p.token_ids)
        assert all(0 <= t < V for t in req.stop_token_ids)
        assert math.isfinite(req.top_p) and 0 < req.top_p <= 1


@SETTINGS
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       ct=st.sampled_from([CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, "application/x-msgpack", "APPLICATION/JSON; q=1",
                           "", None, "*/*"]) | st.text(max_size=30),
       typ=st.sampled_from([LogprobsRequest, GenerateRequest]))
def test_decode_any_bytes_any_content_type(raw, ct, typ):
    try:
        decode(raw, typ, ct)
    except ProtocolError as e:
        assert e.status in (400, 415) and e.message, e
        if e.status == 415:
            assert media_type(ct) not in (CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK)


@SETTINGS
@given(value=st.none() | st.text(max_size=60))
def test_media_type_total(value):
    mt = media_type(value)
    assert isinstance(mt, str) and mt == mt.lower()


@SETTINGS
@given(status=st.integers(100, 599), raw=st.binary(max_size=200) | st.builds(
    lambda t, m, f: json.dumps({"error": {"type": t, "message": m, "field": f}}).encode(),
    st.text(max_size=8), st.text(max_size=20), st.none() | st.text(max_size=8)),
       ct=st.sampled_from([CONTENT_TYPE_JSON, CONTENT_TYPE_MSGPACK, "text/html"]))
def test_error_from_any_body(status, raw, ct):
    err = ProtocolError.from_body(status, raw, ct)
    assert isinstance(err, ProtocolError) and err.status == status and isinstance(str(err), str)
