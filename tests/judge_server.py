"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for judge tests and benchmarks.

Each judge prompt carries its own script inside the answer under review, as
``<<key=value;key=value>>`` (the response column text ends up in the prompt), so concurrent
requests stay deterministic:

- ``lp=85:0.5,90:0.25,REF:0.1``: the first token's ``top_logprobs`` (token:probability);
- ``text=...``: the message content (default: the most likely ``lp`` token, else ``50``);
- ``nolp``: answer without ``logprobs`` (``"logprobs": null``);
- ``split``: the content tokens are ``8``, ``5`` (a tokenizer that splits digits);
- ``digits=85:0.6,90:0.3,7:0.1``: a model that writes numbers one digit per token and answers
  the number n with that probability (the rest: the word ``The``). The chat answer's first
  token has the first digits as alternatives (``"8"``, ``"9"``, ``"7"``, then ``"The"``), its
  content the greedy number's digits; ``/v1/completions`` on the rendered prompt plus some
  digits answers the next token's distribution under the same model (digits, or
  ``<|im_end|>`` for the number's end), as llama.cpp and vLLM serve such a model;
- ``fault=KIND`` or ``fault=KINDxN``: the first N attempts of this prompt (default 1) fail with
  KIND: ``429``/``500``/``503``/``408``/``400``/``404`` (that status), ``slow`` (answer after
  ``slow_s``, longer than the client's timeout), ``badjson`` (truncated JSON body), ``shape``
  (valid JSON that is not a completion), ``drop`` (close the connection without answering);
- ``ra=SECONDS``: the ``Retry-After`` header sent with 429/503.

The server checks ``Authorization: Bearer <api_key>`` when built with ``api_key`` and answers
401 with an error body that echoes the key it got (as careless servers do), so tests can check
that tracekit scrubs it. ``reject_logprobs`` answers 400 to requests asking for logprobs (as
some models do). ``latency`` delays every answer (benchmarks). ``completions`` serves
``/v1/completions`` and renders the chat template (``template="apply"``: llama.cpp's
``/apply-template``; ``"tokenize"``: vLLM's ``/tokenize`` + ``/detokenize``); ``completions_shape``
is ``"legacy"`` (``top_logprobs: [{token: logprob}]``, vLLM), ``"content"`` (llama.cpp) or
``"none"`` (``logprobs: null``: a server that ignores them).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_SCRIPT = re.compile(r"<<(.*?)>>", re.DOTALL)


def parse_script(prompt: str) -> dict[str, str]:
    match = _SCRIPT.search(prompt)
    if match is None:
        return {}
    items: dict[str, str] = {}
    for part in match.group(1).split(";"):
        key, _, value = part.partition("=")
        items[key.strip()] = value.strip()
    return items


USER, ASSISTANT = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
"""The chat template of the imitated model (ChatML, as SmolLM2 and Qwen use)."""
END = "<|im_end|>"


def digit_model(script: dict[str, str]) -> dict[str, float]:
    """``digits=85:0.6,7:0.1`` -> {"85": 0.6, "7": 0.1} (the answer's number distribution)."""
    numbers: dict[str, float] = {}
    for item in script.get("digits", "").split(","):
        if item:
            number, _, prob = item.partition(":")
            numbers[number] = float(prob)
    return numbers


def next_token(numbers: dict[str, float], written: str) -> list[tuple[str, float]]:
    """The next token's distribution after the digits ``written`` (empty: the first token)."""
    if written == "":
        first: dict[str, float] = {}
        for number, prob in numbers.items():
            first[number[0]] = first.get(number[0], 0.0) + prob
        rest = 1.0 - sum(numbers.values())
        top = sorted(first.items(), key=lambda t: -t[1])
        return top + ([("The", rest)] if rest > 1e-12 else [])
    total = sum(p for n, p in numbers.items() if n.startswith(written))
    if total <= 0:
        return [(END, 1.0)]
    after: dict[str, float] = {}
    for number, prob in numbers.items():
        if number.startswith(written) and len(number) > len(written):
            digit = number[len(written)]
            after[digit] = after.get(digit, 0.0) + prob / total
    end = numbers.get(written, 0.0) / total
    top = sorted(after.items(), key=lambda t: -t[1])
    return top + ([(END, end)] if end > 1e-12 else [])


def completion(model: str, script: dict[str, str]) -> dict[str, Any]:
    top: list[tuple[str, float]] = []
    if script.get("lp"):
        for item in script["lp"].split(","):
            token, _, prob = item.rpartition(":")
            top.append((token, float(prob)))
    numbers = digit_model(script)
    if numbers:
        top = next_token(numbers, "")
    best = max(top, key=lambda t: t[1])[0] if top else "50"
    text = script.get("text", best)
    tokens = ["8", "5"] if "split" in script else [text]
    if numbers:
        text = max(numbers, key=lambda n: numbers[n])
        tokens = list(text)
    logprobs = None
    if "nolp" not in script:
        content = []
        for i, token in enumerate(tokens):
            alternatives = top if i == 0 and top else [(token, 1.0)]
            if numbers and i > 0:
                alternatives = next_token(numbers, text[:i])
            content.append(
                {
                    "token": token,
                    "logprob": math.log(max(dict(alternatives).get(token, 1.0), 1e-12)),
                    "top_logprobs": [
                        {"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
                        for t, p in alternatives
                    ],
                }
            )
        logprobs = {"content": content}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": len(tokens), "total_tokens": 12},
    }


def model_steps(loaded: Any, text: str, steps: int, k: int) -> list[list[tuple[str, float]]]:
    """A real model's greedy continuation of ``text``: per step, the top-``k`` (token,
    logprob), the chosen token first (what llama.cpp serves for a GGUF model)."""
    import torch

    tokenizer = loaded.tokenizer
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        top = torch.topk(torch.log_softmax(logits, -1), k)
        out.append(
            [
                (tokenizer.decode([int(i)]), float(v))
                for v, i in zip(top.values, top.indices, strict=True)
            ]
        )
        ids.append(int(top.indices[0]))
    return out


def model_chat(loaded: Any, content: str) -> str:
    """The model's chat template around one user message, up to the assistant's turn."""
    return loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def model_completion(model: str, steps: list[list[tuple[str, float]]]) -> dict[str, Any]:
    """A chat completion whose tokens and top logprobs come from a real model."""
    content = [
        {
            "token": top[0][0],
            "logprob": top[0][1],
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top],
        }
        for top in steps
    ]
    text = "".join(top[0][0] for top in steps)
    choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    return {
        "object": "chat.completion",
        "model": model,
        "choices": [{**choice, "logprobs": {"content": content}, "finish_reason": "length"}],
    }


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # many simultaneous connects: the default backlog of 5 drops SYNs
    daemon_threads = True


class JudgeServer:
    """Start with ``with JudgeServer(...) as server:``; ``server.base_url`` ends in ``/v1``."""

    def __init__(
        self,
        latency: float = 0.0,
        api_key: str | None = None,
        slow_s: float = 1.0,
        reject_logprobs: bool = False,
        completions: bool = True,
        template: str = "apply",
        completions_shape: str = "legacy",
        model: Any = None,
    ) -> None:
        self.model = model
        self.model_lock = threading.Lock()
        self.latency = latency
        self.reject_logprobs = reject_logprobs
        self.completions = completions
        self.template = template
        self.completions_shape = completions_shape
        self.api_key = api_key
        self.slow_s = slow_s
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()  # prompt -> attempts seen
        self.log: list[dict[str, Any]] = []  # one entry per request
        self.in_flight = 0
        self.max_in_flight = 0
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> int:
        with self.lock:
            return len(self.log)

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body in one segment, sent at once: two small writes would meet the
            # client's delayed ACK (Nagle) and add ~40 ms to every request
            wbufsize = 1 << 16
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                if self.path != "/v1/chat/completions":
                    with server.lock:
                        server.log.append(
                            {"time": time.monotonic(), "body": body, "path": self.path}
                        )
                    self._other(body)
                    return
                prompt = body["messages"][-1]["content"]
                auth = self.headers.get("Authorization")
                with server.lock:
                    server.attempts[prompt] += 1
                    attempt = server.attempts[prompt]
                    server.log.append(
                        {"time": time.monotonic(), "body": body, "auth": auth, "path": self.path}
                    )
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body, prompt, auth, attempt)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _other(self, body: dict[str, Any]) -> None:
                """The endpoints besides chat completions: template rendering, completions."""
                missing = b'{"error": {"message": "File Not Found"}}'
                if not server.completions:
                    self._send(404, missing)
                elif self.path == "/apply-template" and server.template == "apply":
                    content = body["messages"][-1]["content"]
                    rendered = (
                        model_chat(server.model, content)
                        if server.model is not None
                        else USER + content + ASSISTANT
                    )
                    self._send(200, json.dumps({"prompt": rendered}).encode())
                elif self.path == "/tokenize" and server.template == "tokenize":
                    text = USER + body["messages"][-1]["content"] + ASSISTANT
                    self._send(200, json.dumps({"tokens": [ord(c) for c in text]}).encode())
                elif self.path == "/detokenize" and server.template == "tokenize":
                    text = "".join(chr(t) for t in body["tokens"])
                    self._send(200, json.dumps({"prompt": text}).encode())
                elif self.path == "/v1/completions":
                    self._send(200, json.dumps(self._completions(body)).encode())
                else:
                    self._send(404, missing)

            def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
                """One token after a rendered prompt, under the ``digits=`` model it holds (or
                the real model the server was given)."""
                prompt = body["prompt"]
                if server.model is not None:
                    with server.model_lock:
                        (top,) = model_steps(server.model, prompt, 1, int(body["logprobs"]))
                    item = {
                        "token": top[0][0],
                        "logprob": top[0][1],
                        "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top],
                    }  # llama.cpp's shape
                    choice = {"index": 0, "text": top[0][0], "logprobs": {"content": [item]}}
                    return {"object": "text_completion", "choices": [choice]}
                if not prompt.startswith(USER) or ASSISTANT not in prompt:
                    raise ValueError(f"not a rendered chat prompt: {prompt[:60]!r}")
                content, _, written = prompt[len(USER) :].rpartition(ASSISTANT)
                top = next_token(digit_model(parse_script(content)), written.strip())
                top = top[: int(body.get("logprobs") or 1)]
                token, prob = top[0]
                if server.completions_shape == "none":  # a server that ignores logprobs
                    logprobs: dict[str, Any] | None = None
                elif server.completions_shape == "content":
                    alternatives = [{"token": t, "logprob": math.log(p)} for t, p in top]
                    item = {"token": token, "logprob": math.log(prob), "top_logprobs": alternatives}
                    logprobs = {"content": [item]}
                else:
                    logprobs = {
                        "tokens": [token],
                        "token_logprobs": [math.log(prob)],
                        "top_logprobs": [{t: math.log(p) for t, p in top}],
                        "text_offset": [len(prompt)],
                    }
                choice = {
                    "index": 0,
                    "text": token,
                    "logprobs": logprobs,
                    "finish_reason": "length",
                }
                return {"id": "cmpl-test", "object": "text_completion", "choices": [choice]}

            def _answer(self, body: dict[str, Any], prompt: str, auth: str | None, attempt: int):
                if server.latency:
                    time.sleep(server.latency)
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "no such route"}}')
                    return
                if server.api_key is not None and auth != f"Bearer {server.api_key}":
                    got = (auth or "").removeprefix("Bearer ")
                    message = {"error": {"message": f"Incorrect API key provided: {got}"}}
                    self._send(401, json.dumps(message).encode())
                    return
                if server.reject_logprobs and body.get("logprobs"):
                    error = {"error": {"message": "logprobs is not supported for this model"}}
                    self._send(400, json.dumps(error).encode())
                    return
                script = parse_script(prompt)
                kind, _, times = script.get("fault", "").partition("x")
                if kind and attempt <= int(times or 1):
                    headers = {"Retry-After": script["ra"]} if "ra" in script else {}
                    if kind.isdigit():
                        error = {"error": {"message": f"injected {kind}"}}
                        self._send(int(kind), json.dumps(error).encode(), headers)
                        return
                    if kind == "slow":
                        time.sleep(server.slow_s)
                    elif kind == "badjson":
                        self._send(200, b'{"choices": [{"message": {"content": "8')
                        return
                    elif kind == "shape":
                        self._send(200, b'{"object": "error", "detail": "overloaded"}')
                        return
                    elif kind == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                if server.model is not None:
                    with server.model_lock:
                        text = model_chat(server.model, prompt)
                        steps = model_steps(
                            server.model, text, body["max_tokens"], body.get("top_logprobs", 1)
                        )
                    self._send(200, json.dumps(model_completion(body["model"], steps)).encode())
                    return
                self._send(200, json.dumps(completion(body["model"], script)).encode())

        return Handler
