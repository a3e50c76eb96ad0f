"""Judge backends: an OpenAI-compatible HTTP server, or a local Hugging Face model.

Both answer one judge prompt at a time with :meth:`ask`, returning an :class:`Answered`
(the raw answer, or the reason it failed, and how many requests it took). A row-level problem
(a bounded number of retries exhausted, a 400) is an ``Answered`` with a failure; a problem that
stops the whole run (401/403, unknown model, a server never reached) raises
:class:`~tracekit.errors.JudgeError`.

The API key lives only in the HTTP client's headers: it is never logged, never part of an
error message (server error bodies are scrubbed of it), never cached and never in metadata.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from tracekit.config.judge import DEFAULT_BASE_URL, DEFAULT_OPENAI_MODEL, JudgeConfig
from tracekit.errors import JudgeError, ModelError
from tracekit.judge.scoring import (
    RawAnswer,
    canonical_number,
    digit_mass,
    extends_number,
    looks_digit_split,
    single_digits_only,
    split_digits,
    starts_with_digit,
)
from tracekit.models.compat import cache_kwarg, output_cache

if TYPE_CHECKING:
    import httpx

    from tracekit.models.loading import LoadedModel

logger = logging.getLogger(__name__)

POOL_SIZE = 8
"""Connections per HTTP client; concurrency above it spreads over several clients."""

RETRY_STATUSES = frozenset({408, 409, 429})
"""Besides every 5xx: statuses worth retrying (timeout, conflict, rate limit)."""


@dataclass(frozen=True)
class _Sent:
    """One request's outcome after retries: the parsed body or a failure, attempts made,
    ``retry``: ask again (the server rejected logprobs), ``unsupported``: no such endpoint."""

    value: Any
    failure: str | None
    attempts: int
    retry: bool = False
    unsupported: bool = False


@dataclass(frozen=True)
class Answered:
    """The outcome of one judge prompt: ``raw`` or ``failure`` (a reason), requests sent, and
    how many of them were retries (the rest: the question and any next-digit requests)."""

    raw: RawAnswer | None
    failure: str | None
    requests: int
    retries: int = 0


class JudgeBackend(Protocol):
    """What the judge job needs from a backend."""

    name: str
    """``openai`` or ``local`` (part of the cache key)."""
    model_id: str
    """The judge model as it enters the cache key."""

    @property
    def text_only(self) -> bool:
        """Whether this run's scores must all come from the answer text (the server rejected
        logprobs, or splits numbers into digits and cannot be asked for the next digit)."""
        ...

    async def ask(self, prompt: str) -> Answered: ...

    def describe(self) -> dict[str, Any]:
        """Provenance for metadata (nothing secret)."""
        ...

    async def aclose(self) -> None: ...


# --- OpenAI-compatible HTTP ------------------------------------------------------------------
def chat_completions_url(base_url: str) -> str:
    """``http://host:8000`` or ``.../v1`` -> ``.../v1/chat/completions`` (OpenAI SDK convention)."""
    import httpx

    url = httpx.URL(base_url)
    path = url.path.rstrip("/")
    if path == "":
        path = "/v1"
    return str(url.copy_with(path=path + "/chat/completions"))


def server_url(base_url: str, path: str) -> str:
    """Another endpoint of the server behind ``base_url``: ``v1/completions`` under the base,
    ``/apply-template`` (llama.cpp) or ``/tokenize`` (vLLM) at its root."""
    import httpx

    url = httpx.URL(chat_completions_url(base_url))
    base = url.path.removesuffix("/chat/completions")
    if path.startswith("v1/"):
        return str(url.copy_with(path=f"{base}/{path.removeprefix('v1/')}"))
    return str(url.copy_with(path=f"{base.removesuffix('/v1')}/{path}"))


def display_url(url: str) -> str:
    """A URL safe to print or store: no user, password or query string."""
    import httpx

    parsed = httpx.URL(url)
    return str(parsed.copy_with(username=None, password=None, query=None, fragment=None))


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_chat_completion(data: Any) -> RawAnswer:
    """A :class:`RawAnswer` from a chat-completions JSON body (raises KeyError/TypeError/...)."""
    choice = data["choices"][0]
    message = choice.get("message") or {}
    refusal = message.get("refusal")
    text = message.get("content") or (refusal if isinstance(refusal, str) else "") or ""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    top: tuple[tuple[str, float], ...] | None = None
    split = False
    if content:
        first = content[0]
        alternatives = first.get("top_logprobs") or [
            {"token": first["token"], "logprob": first["logprob"]}
        ]
        top = tuple((str(a["token"]), float(a["logprob"])) for a in alternatives)
        # A tokenizer that splits "85" into "8" "5": first-token math would average 0-9. Seen
        # in the greedy answer (two digit tokens) or in the alternatives (digits only).
        greedy_split = (
            len(content) > 1
            and str(first["token"]).strip().isdigit()
            and starts_with_digit(str(content[1]["token"]))
            and not str(content[1]["token"])[:1].isspace()
        )
        split = greedy_split or looks_digit_split(top)
    return RawAnswer(text=str(text), top_logprobs=top, split_number=split, refused=bool(refusal))


def parse_next_token(data: Any) -> tuple[tuple[str, float], ...]:
    """The first generated token's alternatives from a ``/v1/completions`` body, in the legacy
    OpenAI shape (``top_logprobs: [{token: logprob}]``, vLLM) or the chat shape
    (``content: [{top_logprobs: [{token, logprob}]}]``, recent llama.cpp)."""
    logprobs = data["choices"][0]["logprobs"]
    content = logprobs.get("content")
    if content:
        first = content[0]
        items = first.get("top_logprobs") or [first]
        return tuple((str(a["token"]), float(a["logprob"])) for a in items)
    return tuple((str(t), float(lp)) for t, lp in logprobs["top_logprobs"][0].items())


TEMPLATE_PROBE = "TRACEKIT-JUDGE-PROMPT-5e1c"
"""A user message rendered once through the server's chat template to find where a judge
prompt goes in the text that ``/v1/completions`` continues."""


class OpenAIBackend:
    """Chat completions over ``httpx.AsyncClient`` with bounded, jittered retries."""

    name = "openai"

    def __init__(self, config: JudgeConfig, base_url: str | None, api_key: str | None) -> None:
        import httpx

        self.config = config
        self.model_id = config.judge_model or DEFAULT_OPENAI_MODEL
        self.url = chat_completions_url(base_url or DEFAULT_BASE_URL)
        self.display_url = display_url(self.url)
        self._key = (api_key or "").strip() or None
        self._key_env = config.api_key_env
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        # httpcore's pool scans every connection on each request (O(pool size)); several
        # small pools, each lent out at most its size at a time, keep that cost flat at high
        # concurrency (benchmarks/bench_judge.py).
        sizes = [
            min(POOL_SIZE, config.concurrency - start)
            for start in range(0, config.concurrency, POOL_SIZE)
        ]
        tls = httpx.create_ssl_context()  # one CA bundle load (~50 ms), not one per client
        self._clients = [
            httpx.AsyncClient(
                verify=tls,
                headers=headers,
                timeout=httpx.Timeout(config.timeout),
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            )
            for size in sizes
        ]
        self._slots: asyncio.Queue[httpx.AsyncClient] | None = None
        self._sizes = sizes
        self._succeeded = 0
        self._logprobs = True
        self._rng = random.Random()
        self._base_url = base_url or DEFAULT_BASE_URL
        # next-digit requests: None until tried, then whether the server answers them
        self._next_digits: bool | None = None
        self._why_not = ""
        self._split_seen = False  # a clearly digit-split answer came (see ask)
        self._warned = False
        self._template: tuple[str, str] | None = None
        self._template_lock: asyncio.Lock | None = None

    @property
    def text_only(self) -> bool:
        return not self._logprobs or self._digits_state == "unsupported"

    @property
    def _digits_state(self) -> str:
        """``completions`` (next-digit requests answered), ``unsupported`` (a digit-split
        answer came and the server cannot answer them) or ``unseen``."""
        if self._next_digits:
            return "completions"
        if self._split_seen and self._next_digits is False:
            return "unsupported"
        return "unseen"

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "judge_model": self.model_id,
            "endpoint": self.display_url,
            "api_key_env": self._key_env,
            "api_key_set": self._key is not None,
            "top_logprobs": self.config.top_logprobs,
            "max_tokens": self.config.max_tokens,
            "logprobs": self._logprobs,
            "digit_split": self._digits_state,
        }

    def _scrub(self, text: str) -> str:
        """Server text with the key (if echoed back) removed, one line, short."""
        if self._key:
            text = text.replace(self._key, "***")
        return " ".join(text.split())[:160]

    def _body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.config.max_tokens,
            "temperature": 0,
            "seed": 0,
        }
        if self._logprobs:
            body.update(logprobs=True, top_logprobs=self.config.top_logprobs)
        return body

    def _rejects_logprobs(self, response: httpx.Response) -> bool:
        """Whether a 400 rejects logprobs (some models and servers do). If so, every later
        request goes without them and scores come from the answer text (method ``text``)."""
        if "logprob" not in self._error_message(response).lower():
            return False
        if self._logprobs:
            self._logprobs = False
            logger.warning(
                "the judge server rejects logprobs for '%s'; scoring from the answer text",
                self.model_id,
            )
        return True

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.config.retry_after_max)
        ceiling = min(self.config.backoff_max, self.config.backoff * 2 ** (attempt - 1))
        return ceiling * (0.5 + 0.5 * self._rng.random())  # "equal jitter": never zero

    def _fatal_status(self, response: httpx.Response) -> JudgeError:
        """The run-stopping error for a 401/403 (the key) or a 404 (URL or model)."""
        status = response.status_code
        if status in (401, 403):
            return JudgeError(
                f"the judge server at {self.display_url} rejected the API key (HTTP {status}): "
                f"the key in ${self._key_env} is wrong or missing",
                f"set {self._key_env}, or name another variable with --api-key-env",
            )
        return JudgeError(
            f"the judge server at {self.display_url} answered 404 for model "
            f"'{self.model_id}': {self._error_message(response)}",
            "check --base-url (it should end in /v1) and --judge-model",
        )

    def _error_message(self, response: httpx.Response) -> str:
        try:
            data = response.json()
            message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        except ValueError:
            message = None
        return self._scrub(str(message) if message else response.text or "no details")

    async def _post(self, url: str, body: dict[str, Any]) -> httpx.Response:
        if self._slots is None:  # created here: a Queue binds to the running loop
            self._slots = asyncio.Queue()
            for client, size in zip(self._clients, self._sizes, strict=True):
                for _ in range(size):
                    self._slots.put_nowait(client)
        client = await self._slots.get()
        try:
            return await client.post(url, json=body)
        finally:
            self._slots.put_nowait(client)

    async def _send(
        self, url: str, body: dict[str, Any], parse: Callable[[Any], Any], *, question: bool
    ) -> _Sent:
        """POST with bounded, jittered retries. ``question``: the chat request itself (a 404
        stops the run); otherwise a 400/404/405/501, or an answer without the expected fields
        (say, no logprobs), means the server lacks the endpoint."""
        import httpx

        reason = "no attempt made"
        unreachable = False
        attempt = 0
        for attempt in range(1, self.config.max_attempts + 1):
            retry_after: float | None = None
            unreachable = False
            try:
                response = await self._post(url, body)
            except httpx.TimeoutException:
                reason = f"timed out after {self.config.timeout:g} s"
            except httpx.TransportError as exc:
                unreachable = isinstance(exc, httpx.ConnectError)
                reason = f"connection error ({type(exc).__name__})"
            else:
                status = response.status_code
                if status in (401, 403) or (question and status == 404):
                    raise self._fatal_status(response)
                if status in RETRY_STATUSES or (status >= 500 and status != 501):
                    reason = f"HTTP {status}"
                    retry_after = parse_retry_after(response.headers)
                elif question and status == 400 and body.get("logprobs"):
                    if self._rejects_logprobs(response):
                        return _Sent(None, "the server rejected logprobs", attempt, retry=True)
                    return _Sent(None, f"HTTP 400: {self._error_message(response)}", attempt)
                elif status >= 400:
                    return _Sent(
                        None,
                        f"HTTP {status}: {self._error_message(response)}",
                        attempt,
                        unsupported=not question and status in (400, 404, 405, 501),
                    )
                else:
                    try:
                        parsed = parse(response.json())
                    except ValueError:
                        reason = "malformed JSON in the response"
                    except (KeyError, IndexError, TypeError, AttributeError):
                        reason = "unexpected response shape"
                        if not question:  # e.g. no logprobs in a completion: not transient
                            return _Sent(None, reason, attempt, unsupported=True)
                    else:
                        self._succeeded += 1
                        return _Sent(parsed, None, attempt)
            if attempt < self.config.max_attempts:
                delay = self._backoff(attempt, retry_after)
                logger.debug(
                    "judge request failed (%s); retry %d in %.2f s", reason, attempt, delay
                )
                await asyncio.sleep(delay)
        if unreachable and self._succeeded == 0:
            raise JudgeError(
                f"cannot reach the judge server at {self.display_url} "
                f"({self.config.max_attempts} attempts)",
                "check --base-url / OPENAI_BASE_URL and that the server is running",
            )
        return _Sent(None, f"{reason} after {self.config.max_attempts} attempts", attempt)

    async def ask(self, prompt: str) -> Answered:
        requests = retries = 0
        while True:
            sent = await self._send(
                self.url, self._body(prompt), parse_chat_completion, question=True
            )
            requests += sent.attempts
            retries += sent.attempts - 1
            if not sent.retry:
                break
            retries += 1  # asked again without logprobs
        raw: RawAnswer | None = sent.value
        if raw is None:
            return Answered(None, sent.failure, requests, retries)
        top = raw.top_logprobs
        if raw.split_number:
            self._split_seen = True
            self._warn_text_only()
        # A lone single digit among the alternatives may be a digit-splitting judge too (the
        # others fell out of the top 20): its next digit is asked for when the server can
        # answer; when it cannot, the answer keeps first-token scoring (it may be an OpenAI
        # tokenizer's whole number), unless clearly split answers make the run text-only.
        maybe = top is not None and not raw.split_number and single_digits_only(top)
        if top is not None and (raw.split_number or maybe) and self._next_digits is not False:
            probs, failure, more, again = await self._whole_numbers(prompt, top)
            requests += more
            retries += again
            if failure is not None:
                return Answered(None, failure, requests, retries)
            if probs is not None:
                raw = replace(raw, number_probs=tuple(probs), split_number=True)
        return Answered(raw, None, requests, retries)

    async def _render(self, prompt: str) -> tuple[str | None, int]:
        """(the judge prompt as the text the model continues: the server's chat template
        around it up to the assistant's turn, or None when the server cannot render it;
        requests made). The template is asked for once per run: llama.cpp's
        ``/apply-template``, else vLLM's ``/tokenize`` + ``/detokenize``."""
        if self._template_lock is None:
            self._template_lock = asyncio.Lock()
        requests = 0
        async with self._template_lock:
            if self._template is None and self._next_digits is not False:
                self._template, requests = await self._fetch_template()
                if self._template is None:
                    self._unsupported("renders no chat template (/apply-template, /tokenize)")
        if self._template is None:
            return None, requests
        before, after = self._template
        return before + prompt + after, requests

    async def _fetch_template(self) -> tuple[tuple[str, str] | None, int]:
        messages = [{"role": "user", "content": TEMPLATE_PROBE}]
        sent = await self._send(
            server_url(self._base_url, "apply-template"),
            {"messages": messages},
            lambda data: str(data["prompt"]),
            question=False,
        )
        text, requests = sent.value, sent.attempts
        if text is None:
            tokens = await self._send(
                server_url(self._base_url, "tokenize"),
                {"model": self.model_id, "messages": messages, "add_generation_prompt": True},
                lambda data: [int(t) for t in data["tokens"]],
                question=False,
            )
            requests += tokens.attempts
            if tokens.value is not None:
                detokenized = await self._send(
                    server_url(self._base_url, "detokenize"),
                    {"model": self.model_id, "tokens": tokens.value},
                    lambda data: str(data["prompt"]),
                    question=False,
                )
                text = detokenized.value
                requests += detokenized.attempts
        if text is None or text.count(TEMPLATE_PROBE) != 1:
            return None, requests
        before, _, after = text.partition(TEMPLATE_PROBE)
        return (before, after), requests

    def _unsupported(self, why: str) -> None:
        if self._next_digits is not False:
            self._next_digits = False
            self._why_not = why
        self._warn_text_only()

    def _warn_text_only(self) -> None:
        """One warning, once a digit-split answer and a server without next digits met."""
        if self._digits_state == "unsupported" and not self._warned:
            self._warned = True
            logger.warning(
                "the judge '%s' writes numbers one digit per token, and the server %s: the "
                "next digit cannot be asked for, so every score of this run comes from the "
                "answer text (method 'text'); serve it with vLLM or llama.cpp for exact scores",
                self.model_id,
                self._why_not,
            )

    async def _next_token(self, text: str) -> _Sent:
        """The distribution of the token after ``text`` (``/v1/completions``, one token)."""
        body = {
            "model": self.model_id,
            "prompt": text,
            "max_tokens": 1,
            "temperature": 0,
            "seed": 0,
            "logprobs": self.config.top_logprobs,
        }
        return await self._send(
            server_url(self._base_url, "v1/completions"), body, parse_next_token, question=False
        )

    async def _whole_numbers(
        self, prompt: str, first: tuple[tuple[str, float], ...]
    ) -> tuple[list[float] | None, str | None, int, int]:
        """P(answer == n), n = 0..100, for a judge that writes numbers one digit per token:
        (probabilities or None when the server cannot say, a failure, requests, retries).

        From the first token's alternatives, every prefix that can still grow into a number
        0-100 (one digit, or ``10``) is sent back with ``/v1/completions`` for the next
        token's distribution: digits extend it, the rest end it (``P(end) = 1 - P(digit)``).
        A two-digit prefix other than 10, and 100, are taken to end there. At most 11 extra
        requests per judgment (10 first digits, then ``10``), asked concurrently."""
        rendered, requests = await self._render(prompt)
        retries = 0
        if rendered is None:
            return None, None, requests, retries
        probs = [0.0] * 101
        # (text after the prompt, the number's digits so far, probability of that text)
        frontier: list[tuple[str, str, float]] = []

        def place(text: str, digits: str, whole: bool, prob: float) -> None:
            value = canonical_number(digits)
            if value is None:
                return
            if whole and extends_number(digits):
                frontier.append((text, digits, prob))
            else:
                probs[value] += prob

        seen: set[str] = set()
        for token, logprob in first:
            if token in seen:
                continue
            seen.add(token)
            body = token.lstrip()
            found = split_digits(body)
            if found is not None:
                place(token, found[0], found[1], math.exp(logprob))
        while frontier:
            level, frontier = frontier, []
            answers = await asyncio.gather(*(self._next_token(rendered + t) for t, _, _ in level))
            for (text, digits, prob), sent in zip(level, answers, strict=True):
                requests += sent.attempts
                retries += sent.attempts - 1
                if sent.unsupported:
                    self._unsupported(f"has no usable /v1/completions ({sent.failure})")
                    return None, None, requests, retries
                if sent.value is None:
                    return None, f"next-digit request: {sent.failure}", requests, retries
                self._next_digits = True
                alternatives: tuple[tuple[str, float], ...] = sent.value
                probs[int(digits)] += prob * max(0.0, 1.0 - digit_mass(alternatives))
                seen = set()
                for token, logprob in alternatives:
                    if token in seen:
                        continue
                    seen.add(token)
                    found = split_digits(token)
                    if found is not None:
                        place(text + token, digits + found[0], found[1], prob * math.exp(logprob))
        return probs, None, requests, retries

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


# --- local Hugging Face model ----------------------------------------------------------------
def local_model_id(judge_model: str | None) -> str:
    """The local judge as it enters the cache key (the embedded model is marked as such)."""
    if judge_model is None:
        from tracekit.models.embedded import EMBEDDED_DISPLAY_NAME

        return f"embedded:{EMBEDDED_DISPLAY_NAME}"
    return judge_model


def _is_embedded(model: LoadedModel) -> bool:
    from tracekit.models.embedded import embedded_model_dir

    try:
        return model.source_path == str(embedded_model_dir())
    except ModelError:
        return False


class LocalBackend:
    """The score from a local model's exact next-token distribution over the numbers 0-100.

    The answer "n" is a token sequence ``t(n)`` (several tokens when the tokenizer splits
    digits, as SmolLM2's does). ``P(answer == n) = prod_i P(t_i | prompt, t_<i) * P(stop)``,
    where ``P(stop)`` is the probability that the next token does not continue the number
    (does not start with a digit). One forward pass over the prompt, then one pass over the
    trie of all ``t(n)`` prefixes (tree attention on the prompt's KV cache: each prefix token
    sees the prompt and its ancestors), gives all 101 probabilities; the second pass costs
    about as much as a prompt of one token per trie node (101 for SmolLM2).
    """

    name = "local"
    text_only = False

    def __init__(self, config: JudgeConfig, model: LoadedModel | None = None) -> None:
        self.config = config
        self.model_id = local_model_id(config.judge_model)
        if model is not None and not _is_embedded(model):
            self.model_id = model.name
        self._model = model
        self._lock = asyncio.Lock()
        self._number_tokens: list[tuple[int, ...]] = []
        self._prefixes: list[tuple[int, ...]] = []
        self._digit_start: Any = None
        self._tree_tokens: Any = None
        self._tree_depths: Any = None
        self._tree_ancestors: Any = None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.name, "judge_model": self.model_id}
        if self._model is not None:
            info["model"] = self._model.describe()
        return info

    def _prepare(self) -> None:
        import torch

        if self._model is None:
            from tracekit.models.loading import ModelConfig, load_model

            self._model = load_model(
                ModelConfig(
                    model=self.config.judge_model,
                    device=self.config.device,
                    dtype=self.config.dtype,
                )
            )
        tokenizer = self._model.tokenizer
        self._number_tokens = [
            tuple(tokenizer.encode(str(n), add_special_tokens=False)) for n in range(101)
        ]
        prefixes = {seq[:i] for seq in self._number_tokens for i in range(1, len(seq) + 1)}
        self._prefixes = sorted(prefixes, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(self._prefixes)}
        self._tree_tokens = torch.tensor([p[-1] for p in self._prefixes], dtype=torch.long)
        self._tree_depths = torch.tensor([len(p) - 1 for p in self._prefixes], dtype=torch.long)
        ancestors = torch.zeros((len(self._prefixes), len(self._prefixes)), dtype=torch.bool)
        for i, p in enumerate(self._prefixes):
            for k in range(1, len(p) + 1):
                ancestors[i, index[p[:k]]] = True
        self._tree_ancestors = ancestors
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        digit_ids = [
            i for i, tok in enumerate(vocab) if tok and tok[:1].isascii() and tok[:1].isdigit()
        ]
        self._digit_start = torch.tensor(digit_ids, dtype=torch.long, device=self._model.device)

    def _tree_mask(self, length: int, dtype: Any, device: Any) -> Any:
        """Additive 4D mask [1, 1, tree, prompt + tree]: prompt and own ancestors visible."""
        import torch

        tree = len(self._prefixes)
        allowed = torch.ones((tree, length + tree), dtype=torch.bool)
        allowed[:, length:] = self._tree_ancestors
        mask = torch.zeros((tree, length + tree), dtype=dtype)
        mask[~allowed] = torch.finfo(dtype).min
        return mask.to(device)[None, None]

    def _loaded(self) -> LoadedModel:
        """The model, loaded (and the number tokens prepared) on first use."""
        if self._model is None or not self._prefixes:
            self._prepare()
        if self._model is None:  # pragma: no cover - _prepare sets it or raises
            raise ModelError("the local judge model did not load")
        return self._model

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the judge prompt as the model's user turn (chat template if any)."""
        model = self._loaded()
        tokenizer = model.tokenizer
        if model.has_chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(tokenizer(prompt)["input_ids"])

    def number_distribution(self, prompt: str) -> tuple[list[float], list[tuple[str, float]]]:
        """(P(answer == n) for n = 0..100, the first token's top (text, logprob) alternatives)."""
        import torch

        model = self._loaded()
        device = model.device
        ids = torch.tensor([self.prompt_ids(prompt)], dtype=torch.long, device=device)
        length = ids.shape[1]
        with torch.no_grad():
            out = model.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1
            )
            root = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            # Tree attention: every prefix of every number is one token after the prompt that
            # sees the prompt and its own ancestors only, at the position it would have in a
            # plain sequence. One pass gives the distribution after every prefix.
            logits = model.model(
                input_ids=self._tree_tokens.to(device)[None],
                position_ids=(self._tree_depths.to(device) + length)[None],
                attention_mask=self._tree_mask(length, model.dtype, device),
                use_cache=True,
                **{cache_kwarg(model.model): output_cache(out)},
            ).logits
            after = torch.log_softmax(logits[0].float(), dim=-1)
        dist = {(): root, **{p: after[i] for i, p in enumerate(self._prefixes)}}
        probs: list[float] = []
        for seq in self._number_tokens:
            logp = sum(float(dist[seq[:i]][tok]) for i, tok in enumerate(seq))
            stop = 1.0 - float(dist[seq].exp()[self._digit_start].sum())
            probs.append(float(torch.tensor(logp).exp()) * max(stop, 0.0))
        top = torch.topk(root, k=self.config.top_logprobs)
        tokenizer = model.tokenizer
        alternatives = [
            (tokenizer.decode([int(i)]), float(v))
            for v, i in zip(top.values, top.indices, strict=True)
        ]
        return probs, alternatives

    def _judge(self, prompt: str) -> RawAnswer:
        probs, alternatives = self.number_distribution(prompt)
        return RawAnswer(
            text=alternatives[0][0], top_logprobs=tuple(alternatives), number_probs=tuple(probs)
        )

    async def ask(self, prompt: str) -> Answered:
        async with self._lock:  # one forward at a time: the model is not shared across threads
            raw = await asyncio.to_thread(self._judge, prompt)
        return Answered(raw, None, 1)

    async def aclose(self) -> None:
        return None
