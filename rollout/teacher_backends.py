"""Teacher backends: how `TeacherClient` talks to each kind of scoring server.

One small adapter per server kind turns a pack of (token_ids, start)
sequences into one HTTP request and its reply into
`teacher_server.protocol.SequenceLogprobs`, one per sequence: the logprobs of
the given tokens start .. len-1 and, with top_k = K > 0, the K most likely
tokens per position, most likely first (opd's own order). The adapters do no
I/O: packing, concurrency, retries with backoff (429/503/connection errors),
per-sequence failure isolation and "no made-up scores" stay in the client
(rollout/teacher_client.py), the same for every backend.

- opd: `python -m teacher_server`, POST /v1/logprobs. top-k up to its
  max_top_k, any temperature, full tokenizer check (hash of the token->id map).
- vllm: vLLM's OpenAI server (`vllm serve`), POST /v1/completions with
  `prompt_logprobs`. top-k up to its --max-logprobs, temperature 1 only,
  tokenizer checked on probe texts through POST /tokenize.
- sglang: SGLang (`python -m sglang.launch_server`), POST /generate with
  `return_logprob` and `logprob_start_len`. top-k, temperature 1 only, no
  tokenizer check.

Temperature: vLLM 0.32 computes prompt logprobs from the raw logits, never
divided by a temperature (vllm/v1/worker/gpu_model_runner.py
`_get_prompt_logprobs_dict`: `compute_logprobs(logits)`; with --logprobs-mode
raw_logits/processed_logits it returns the logits themselves, which the
start-up probe refuses), and SGLang's input logprobs are raw too
(`Req.temp_scaled_logprobs` is False); opd's server rescales the full row
itself. So teacher.temperature != 1 needs backend opd.

`PROBE_PATHS` / `identify` say how `teacher.backend=auto` recognises a server:
opd answers GET /v1/model with its ModelInfo; SGLang answers GET /model_info
(older releases: /get_model_info) with a `model_path`; vLLM answers GET
/v1/models with a model list (and GET /version).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import msgspec

from teacher_server import protocol as P

BACKENDS = ("opd", "vllm", "sglang")
# Order in which `auto` probes: opd's /v1/model first (the fast path), then
# SGLang's own info paths (SGLang also serves /v1/models), then vLLM's.
PROBE_PATHS = (("opd", "/v1/model"), ("sglang", "/model_info"), ("sglang", "/get_model_info"),
               ("vllm", "/v1/models"))
SERVER_NAMES = {"opd": "opd teacher_server", "vllm": "vLLM OpenAI server", "sglang": "SGLang server"}

Seqs = Sequence[tuple[Sequence[int], int]]
# One parsed result per sequence: its scores, or why it could not be scored.
Parsed = list["P.SequenceLogprobs | str"]


class ReplyError(ValueError):
    """A reply that does not have the backend's shape (the client fails the
    whole pack with this message: nothing of it is used)."""


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """What a probe learnt about a server."""

    backend: str  # "opd" | "vllm" | "sglang"
    model: str  # the model name to send (vLLM checks it) and to log
    max_model_len: int  # longest scorable sequence (0: not reported)
    detail: str  # one line for the log, e.g. "vLLM 0.32.0, max_model_len 512"
    opd_info: P.ModelInfo | None = None  # opd's full /v1/model answer

    def model_info(self, max_top_k: int) -> P.ModelInfo:
        """As the protocol's ModelInfo (what `TeacherClient.model_info` returns).
        For vLLM and SGLang the vocabulary, dtype and tokenizer hash are not
        reported ("unknown"/""/0), and max_top_k is the top-k the start-up probe
        was allowed."""
        if self.opd_info is not None:
            return self.opd_info
        return P.ModelInfo(model=self.model, vocab_size=0, max_model_len=self.max_model_len, dtype="unknown",
                           tokenizer_sha256="", max_top_k=max_top_k)


def _json(data: bytes) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise ReplyError(f"reply is not JSON: {e}") from e


def opd_server_info(info: P.ModelInfo) -> ServerInfo:
    return ServerInfo("opd", info.model, info.max_model_len, f"model {info.model}, {info.dtype}, max_model_len "
                      f"{info.max_model_len}, max_top_k {info.max_top_k}", opd_info=info)


def identify(backend: str, path: str, data: bytes, ctype: str) -> ServerInfo | None:
    """ServerInfo if the 200 reply `data` to GET `path` is what `backend`
    answers there, else None (another server that happens to serve the path)."""
    if backend == "opd":
        try:
            return opd_server_info(P.decode(data, P.ModelInfo, ctype))
        except P.ProtocolError:
            return None
    try:
        body = _json(data)
    except ReplyError:
        return None
    if backend == "sglang":
        if not isinstance(body, dict) or "model_path" not in body:
            return None
        return ServerInfo("sglang", str(body["model_path"]), 0, f"model {body['model_path']} ({path})")
    if backend == "vllm":
        cards = body.get("data") if isinstance(body, dict) else None
        if not cards or not isinstance(cards[0], dict) or "id" not in cards[0]:
            return None
        card = cards[0]
        # vLLM answers a prompt of max_model_len - 1 tokens with one sampled token.
        mml = int(card.get("max_model_len") or 0)
        return ServerInfo("vllm", str(card["id"]), max(mml - 1, 0),
                          f"model {card['id']} (owned_by {card.get('owned_by')}), max_model_len {mml}")
    raise ValueError(f"unknown backend {backend!r}")


# --------------------------------------------------------------------------
# opd's teacher_server: /v1/logprobs (the protocol is the result type itself)
# --------------------------------------------------------------------------

class OpdBackend:
    name = "opd"
    path = "/v1/logprobs"
    applies_temperature = True
    # The server names the bad sequence of a 400 (`sequences[i]`): no bisecting.
    bisect_unnamed_400 = False

    def __init__(self, encoding: str = P.CONTENT_TYPE_MSGPACK):
        self.content_type = encoding

    def score_body(self, seqs: Seqs, top_k: int, temperature: float) -> bytes:
        req = P.LogprobsRequest(sequences=[P.ScoreSequence(token_ids=list(ids), start=int(s)) for ids, s in seqs],
                                top_k=top_k, temperature=temperature)
        return P.encode(req, self.content_type)

    def parse_score(self, data: bytes, ctype: str, seqs: Seqs, top_k: int) -> Parsed:
        try:
            resp = P.decode(data, P.LogprobsResponse, ctype)
        except P.ProtocolError as e:
            raise ReplyError(e.message) from e
        if len(resp.results) != len(seqs):
            raise ReplyError(f"teacher returned {len(resp.results)} results for {len(seqs)} sequences")
        return list(resp.results)


# --------------------------------------------------------------------------
# vLLM's OpenAI-compatible server: /v1/completions with prompt_logprobs
# --------------------------------------------------------------------------

class VllmBackend:
    """POST /v1/completions, one request per pack: `prompt` is the list of
    token-id lists (vLLM takes token ids as a prompt and adds nothing to
    them), `prompt_logprobs` = top_k (0: only the given token), `max_tokens` =
    1 (the least vLLM allows without `echo`: the one sampled token is
    discarded), `return_token_ids` so the reply names the ids it scored.

    Reply (vllm/entrypoints/openai/completion/protocol.py CompletionResponse,
    serving.py `request_output_to_completion_response`): one choice per prompt,
    in prompt order (`index`); `choices[i].prompt_logprobs[p]` is null for
    p = 0, else a dict {str(token_id): {"logprob", "rank", "decoded_token"}}
    built by vllm/logprobs.py `append_logprobs_for_next_position`: the given
    token first, then the top-K by rank 1..K. The given token is therefore
    always present, also when it is outside the top-K (then K + 1 entries);
    inside the top-K its key is first but carries its top-K rank (K entries).
    Positions before `start` are skipped. -inf is sent as -9999.0 (vLLM's
    `clamp_prompt_logprobs`)."""

    name = "vllm"
    path = "/v1/completions"
    content_type = P.CONTENT_TYPE_JSON
    applies_temperature = False
    # vLLM refuses a whole request (400) without naming which prompt was bad
    # (too long, an id outside its vocabulary): the client halves the pack
    # until the bad sequence is alone.
    bisect_unnamed_400 = True

    def __init__(self, model: str):
        self.model = model

    def score_body(self, seqs: Seqs, top_k: int, temperature: float) -> bytes:
        if temperature != 1.0:
            raise ValueError("vLLM's prompt logprobs are raw (temperature 1)")
        return msgspec.json.encode({"model": self.model, "prompt": [list(ids) for ids, _ in seqs],
                                    "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k,
                                    "return_token_ids": True})

    def parse_score(self, data: bytes, ctype: str, seqs: Seqs, top_k: int) -> Parsed:
        body = _json(data)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != len(seqs):
            raise ReplyError(f"expected {len(seqs)} choices, got "
                             f"{len(choices) if isinstance(choices, list) else 'none'}")
        try:
            choices = sorted(choices, key=lambda c: c["index"])
        except (KeyError, TypeError) as e:
            raise ReplyError(f"a choice without an index: {e}") from e
        return [_vllm_sequence(c, list(ids), int(start), top_k) for c, (ids, start) in zip(choices, seqs, strict=True)]


def _vllm_sequence(choice: dict, ids: list[int], start: int, top_k: int) -> P.SequenceLogprobs | str:
    plp = choice.get("prompt_logprobs")
    if not isinstance(plp, list) or len(plp) != len(ids):
        return (f"vLLM returned {len(plp) if isinstance(plp, list) else 'no'} prompt_logprobs entries for a "
                f"sequence of {len(ids)} tokens")
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and echoed != ids:
        j = next((j for j, (a, b) in enumerate(zip(echoed, ids)) if a != b), min(len(echoed), len(ids)))
        return f"vLLM scored other token ids than sent (first difference at position {j})"
    lps: list[float] = []
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    for p in range(start, len(ids)):
        entry = plp[p]
        given = entry.get(str(ids[p])) if isinstance(entry, dict) else None
        if given is None:
            return f"vLLM's prompt_logprobs lack the given token {ids[p]} at position {p}"
        lps.append(float(given["logprob"]))
        if top_k:
            items = list(entry.items())
            if len(items) == top_k + 1:
                items = items[1:]  # the given token, outside the top-K
            elif len(items) != top_k:
                return f"vLLM returned {len(items)} logprobs at position {p} for prompt_logprobs={top_k}"
            items.sort(key=lambda kv: kv[1]["rank"])
            top_ids.append([int(k) for k, _ in items])
            top_lps.append([float(v["logprob"]) for _, v in items])
    if not top_k:
        return P.SequenceLogprobs(logprobs=lps)
    return P.SequenceLogprobs(logprobs=lps, top_ids=top_ids, top_logprobs=top_lps)


def vllm_max_logprobs_refusal(message: str) -> bool:
    """True if a 400's message is vLLM refusing prompt_logprobs above its
    --max-logprobs (vllm/sampling_params.py `_validate_logprobs`)."""
    return "prompt logprobs" in message and "greater than max allowed" in message


# Probe texts for the vLLM tokenizer check (see `VllmTokenizerCheck`).
TOKENIZER_PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 0123456789 +-*/=()[]{}<>",
    "  leading spaces,\ttabs,\nnew lines\r\n and trailing spaces   ",
    "Ünïcödé: naïve café, Straße, 東京, Привет, مرحبا, 🙂🚀",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n46<|im_end|>\n<|endoftext|>",
)


def tokenize_body(text: str, add_special_tokens: bool, model: str) -> bytes:
    """POST /tokenize of vLLM's server (vllm/entrypoints/serve/tokenize/protocol.py)."""
    return msgspec.json.encode({"model": model, "prompt": text, "add_special_tokens": add_special_tokens,
                                "return_token_strs": True})


def tokenizer_probe_differences(student: P.TokenizerInfo, replies: Sequence[tuple[str, bool, dict]]) -> list[str]:
    """What the teacher's /tokenize answers show to differ from the student's
    tokenizer (empty: no difference seen).

    `replies`: (text, add_special_tokens, reply) per probe. Checked: every
    (id, token string) the teacher produced maps the same in the student's
    vocabulary, and the ids the teacher adds around a text (add_special_tokens
    true vs false, e.g. a BOS) are the student's `prefix_ids`/`suffix_ids`.
    Not checked: tokens that no probe text produces."""
    out: list[str] = []
    bad: dict[int, tuple[str, int | None]] = {}
    plain: dict[str, list[int]] = {}
    full: dict[str, list[int]] = {}
    for text, special, reply in replies:
        ids, strs = reply.get("tokens"), reply.get("token_strs")
        if not isinstance(ids, list) or not isinstance(strs, list) or len(ids) != len(strs):
            out.append(f"the teacher's /tokenize reply for {text[:30]!r} has no token_strs of matching length")
            continue
        (full if special else plain)[text] = ids
        for i, s in zip(ids, strs, strict=True):
            if student.vocab.get(s) != i:
                bad.setdefault(int(i), (s, student.vocab.get(s)))
    if bad:
        shown = "; ".join(f"teacher id {i} = {s!r}, student id of {s!r}: {sid}" for i, (s, sid) in
                          sorted(bad.items())[:6])
        out.append(f"{len(bad)} token id{'s' if len(bad) != 1 else ''} of the probe texts map differently: {shown}")
    for text in plain.keys() & full.keys():
        p, f = plain[text], full[text]
        k = next((k for k in range(len(f) - len(p) + 1) if f[k:k + len(p)] == p), None)
        pre, suf = (f, []) if k is None else (f[:k], f[k + len(p):])
        if (pre, suf) != (list(student.prefix_ids), list(student.suffix_ids)):
            out.append(f"the teacher adds ids {pre} before and {suf} after every text, the student's tokenizer "
                       f"{list(student.prefix_ids)} and {list(student.suffix_ids)} (e.g. a BOS token one of them "
                       f"expects)")
            break
    return out


# --------------------------------------------------------------------------
# SGLang: /generate with return_logprob (not run against a real server here)
# --------------------------------------------------------------------------

class SglangBackend:
    """POST /generate, one request per pack (SGLang's native API; the request
    and reply shapes follow sgl-project/sglang `GenerateReqInput`,
    `scheduler_output_processor_mixin.add_input_logprob_return_values` /
    `_process_input_token_logprobs` and `tokenizer_manager.
    detokenize_logprob_tokens`, and slime's on-policy distillation client):

        {"input_ids": [[...], ...], "sampling_params": {"max_new_tokens": 0, "temperature": 0},
         "return_logprob": true, "logprob_start_len": [start_i - 1, ...], "top_logprobs_num": K,
         "return_text_in_logprobs": false}

    Reply: a list, one object per sequence, with `meta_info.input_token_logprobs`
    = [[logprob, token_id, null], ...] for the tokens logprob_start_len ..
    len-1, whose FIRST entry's logprob is null (SGLang computes each position's
    logprob from the logits before it and prepends None); so entries 1.. are
    the tokens start .. len-1. `meta_info.input_top_logprobs` has the same
    length (first entry null), each entry [[logprob, token_id, null], ...]
    sorted most likely first. Not run against a real SGLang server (it does
    not install on the CPU machine the tests run on: README, "Teacher")."""

    name = "sglang"
    path = "/generate"
    content_type = P.CONTENT_TYPE_JSON
    applies_temperature = False
    bisect_unnamed_400 = True

    def score_body(self, seqs: Seqs, top_k: int, temperature: float) -> bytes:
        if temperature != 1.0:
            raise ValueError("SGLang's input logprobs are raw (temperature 1)")
        return msgspec.json.encode({
            "input_ids": [list(ids) for ids, _ in seqs],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True, "logprob_start_len": [int(s) - 1 for _, s in seqs],
            "top_logprobs_num": top_k, "return_text_in_logprobs": False})

    def parse_score(self, data: bytes, ctype: str, seqs: Seqs, top_k: int) -> Parsed:
        body = _json(data)
        if isinstance(body, dict) and len(seqs) == 1:
            body = [body]
        if not isinstance(body, list) or len(body) != len(seqs):
            raise ReplyError(f"expected a list of {len(seqs)} results, got "
                             f"{len(body) if isinstance(body, list) else type(body).__name__}")
        return [_sglang_sequence(r, list(ids), int(start), top_k) for r, (ids, start) in zip(body, seqs, strict=True)]


def _sglang_sequence(result: Any, ids: list[int], start: int, top_k: int) -> P.SequenceLogprobs | str:
    meta = result.get("meta_info") if isinstance(result, dict) else None
    tok = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    n = len(ids) - start
    if not isinstance(tok, list) or len(tok) != n + 1:
        return (f"SGLang returned {len(tok) if isinstance(tok, list) else 'no'} input_token_logprobs for "
                f"{n} scored positions (+1 leading null)")
    lps: list[float] = []
    for j, entry in enumerate(tok[1:]):
        lp, tid = entry[0], entry[1]
        if tid != ids[start + j]:
            return f"SGLang scored token {tid} at position {start + j}, not the sent {ids[start + j]}"
        if lp is None:
            return f"SGLang returned no logprob at position {start + j}"
        lps.append(float(lp))
    if not top_k:
        return P.SequenceLogprobs(logprobs=lps)
    top = meta.get("input_top_logprobs")
    if not isinstance(top, list) or len(top) != n + 1:
        return f"SGLang returned {len(top) if isinstance(top, list) else 'no'} input_top_logprobs entries"
    top_ids, top_lps = [], []
    for j, row in enumerate(top[1:]):
        if not isinstance(row, list) or len(row) != top_k:
            return f"SGLang returned {len(row) if isinstance(row, list) else 'no'} top logprobs at position " \
                   f"{start + j} for top_logprobs_num={top_k}"
        row = sorted(row, key=lambda e: -e[0])
        top_ids.append([int(e[1]) for e in row])
        top_lps.append([float(e[0]) for e in row])
    return P.SequenceLogprobs(logprobs=lps, top_ids=top_ids, top_logprobs=top_lps)


def logits_not_logprobs(results: Sequence[P.SequenceLogprobs]) -> bool:
    """True when a probe's scores cannot be log-probabilities: a positive value,
    or top-K entries whose probabilities add up to more than 1 (a vLLM server
    run with --logprobs-mode raw_logits/processed_logits returns logits in
    the logprob fields)."""
    for r in results:
        if any(x > 1e-6 for x in r.logprobs):
            return True
        for row in r.top_logprobs or ():
            if row and math.fsum(math.exp(x) for x in row) > 1.0 + 1e-4:
                return True
    return False
