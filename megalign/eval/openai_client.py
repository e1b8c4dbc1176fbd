"""A client for OpenAI-compatible servers (vLLM `vllm serve`, SGLang, `transformers serve`, a hosted API): chat and
text completions, greedy by default, many calls at once with a progress bar, and a cheap check before any work.

What a retry can fix is retried, with exponential backoff (and the server's Retry-After on a 429): a refused or
dropped connection, a timeout, HTTP 429 and 5xx. Any other 4xx is a bad request that stays bad: it fails at once,
as a one-line ServerError naming the URL, the status and the server's message. So does a call whose retries ran out.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2 as httpx  # the maintained continuation of httpx (same API); huggingface_hub already depends on it
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt
from tqdm import tqdm

from megalign.errors import MegalignError

Item = TypeVar("Item")
_MESSAGE_CHARS = 300  # of the server's message, in an error (a server may answer with a whole HTML page)
_LISTED_MODELS = 20  # of a hosted API's many models, in an error


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None  # "stop", "length" (max_tokens reached), ...
    prompt_tokens: int | None  # None where the server reports no usage
    completion_tokens: int | None


class ServerError(MegalignError):
    """A request the server refused (4xx) or that kept failing after the retries; `status` None: no HTTP answer."""

    def __init__(self, message: str, url: str, status: int | None = None):
        super().__init__(message)
        self.url, self.status = url, status
        self.retryable = status is None or _is_transient_status(status)  # the same call may work once the server does


class _TransientStatus(Exception):
    """An HTTP answer worth retrying (429, 5xx): raised inside the retry loop only."""

    def __init__(self, response: httpx.Response):
        super().__init__(response.status_code)
        self.response = response


def _is_transient_status(status: int) -> bool:
    return status == 429 or status >= 500


def _server_message(response: httpx.Response) -> str:
    """The server's own words, on one line: OpenAI's {"error": {"message"}}, vLLM's {"message"},
    FastAPI's {"detail"}, else the body itself."""
    try:
        body = response.json()
    except ValueError:
        body = None
    text = response.text
    if isinstance(body, dict):
        error = body.get("error")
        found = error.get("message") if isinstance(error, dict) else error
        found = found or body.get("message") or body.get("detail")
        if found:
            text = found if isinstance(found, str) else str(found)
    text = " ".join(text.split()) or response.reason_phrase
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."


def _retry_after_s(response: httpx.Response) -> float | None:
    """A 429's Retry-After in seconds (the HTTP-date form is rare from these servers: ignored)."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class OpenAIClient:
    """Calls one model on one server. Thread-safe: `map` shares one connection pool among its threads."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 600,
                 max_retries: int = 5, concurrency: int = 8, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        """`max_retries` more tries after the first, waiting backoff_s, 2*backoff_s, ... (at most max_backoff_s);
        `transport` replaces httpx's network one (tests: httpx.MockTransport)."""
        # The OpenAI SDK's base_url ends in /v1 and servers document both forms: take either.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model, self.timeout_s, self.max_retries = model, timeout_s, max_retries
        self.concurrency, self.backoff_s, self.max_backoff_s = max(1, concurrency), backoff_s, max_backoff_s
        self.api_key_env = api_key_env
        api_key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            headers=headers, transport=transport,
            # A call waiting for a free connection is not the server being slow: no pool timeout.
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0), pool=None),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def chat(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0,
             stop: list[str] | None = None) -> Reply:
        """One assistant turn after `messages` ([{"role": ..., "content": ...}]); the server applies the chat
        template."""
        body = self._post("/v1/chat/completions", self._body(messages=messages, max_tokens=max_tokens,
                                                              temperature=temperature, stop=stop))
        return self._reply(body, lambda choice: (choice.get("message") or {}).get("content"), stop)

    def complete(self, prompt: str, max_tokens: int, temperature: float = 0.0, stop: list[str] | None = None) -> Reply:
        """The continuation of `prompt` as it is (no chat template)."""
        body = self._post("/v1/completions", self._body(prompt=prompt, max_tokens=max_tokens,
                                                        temperature=temperature, stop=stop))
        return self._reply(body, lambda choice: choice.get("text"), stop)

    def map(self, function: Callable[[Item], Any], items: Iterable[Item],
            progress: bool = True) -> Iterator[tuple[Item, Any]]:
        """(item, function(item)) as each call finishes, `concurrency` at a time; a call that raised gives
        (item, the exception), so the caller records that item as failed with its reason and goes on.

        Items are submitted as threads free up (not all at once), so stopping early wastes at most `concurrency` calls.
        """
        pending = iter(items)
        total = len(items) if hasattr(items, "__len__") else None
        failed = 0
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="openai") as pool, \
                tqdm(total=total, unit="item", desc=self.model, disable=not progress, dynamic_ncols=True) as bar:
            running: dict = {}
            try:
                while True:
                    for item in pending:
                        running[pool.submit(function, item)] = item
                        if len(running) >= self.concurrency:
                            break
                    if not running:
                        return
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        item = running.pop(future)
                        error = future.exception()
                        if error is not None:
                            failed += 1
                            bar.set_postfix(failed=failed)
                        bar.update()
                        yield item, error if error is not None else future.result()
            finally:
                for future in running:  # the caller stopped early: drop what has not started
                    future.cancel()

    def check(self) -> list[str]:
        """The models the server lists (GET /v1/models, one try): fails in one line if the server is unreachable,
        refuses the request, or does not serve `model`."""
        url = self.base_url + "/v1/models"
        try:
            response = self._http.get(url, timeout=min(self.timeout_s, 30.0))
        except httpx.TransportError as error:
            raise ServerError(f"cannot reach {url} ({_describe(error)}): is the server running?", url) from None
        if response.status_code >= 400:
            raise self._refused(url, response)
        try:
            served = [entry["id"] for entry in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"{url} answered {response.status_code} with no model list "
                              f"(is it an OpenAI-compatible server?): {_server_message(response)}", url) from None
        if self.model not in served:
            shown = ", ".join(served[:_LISTED_MODELS]) + (f" ... ({len(served) - _LISTED_MODELS} more)"
                                                          if len(served) > _LISTED_MODELS else "")
            raise MegalignError(f"model {self.model!r} is not served by {self.base_url}; "
                                f"it serves: {shown or 'nothing'}")
        return served

    # ---- requests ----

    def _body(self, stop: list[str] | None, **fields) -> dict:
        body = {"model": self.model, **fields}
        if stop:
            body["stop"] = list(stop)
        return body

    def _post(self, path: str, body: dict) -> dict:
        url = self.base_url + path
        attempts = self.max_retries + 1
        retrying = Retrying(
            retry=retry_if_exception_type((httpx.TransportError, _TransientStatus)),
            stop=stop_after_attempt(attempts),
            wait=self._wait,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    response = self._http.post(url, json=body)
                    if _is_transient_status(response.status_code):
                        raise _TransientStatus(response)
        except _TransientStatus as transient:
            response = transient.response
            raise ServerError(f"{url} answered {response.status_code} {_tries(attempts)}: "
                              f"{_server_message(response)}", url, response.status_code) from None
        except httpx.TimeoutException as error:
            raise ServerError(f"{url} did not answer in time ({_describe(error)}, timeout {self.timeout_s:g}s) "
                              f"{_tries(attempts)}", url) from None
        except httpx.TransportError as error:
            raise ServerError(f"cannot reach {url} ({_describe(error)}) {_tries(attempts)}: "
                              "is the server running?", url) from None
        if response.status_code >= 400:
            raise self._refused(url, response)
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"{url} answered {response.status_code} with no JSON: {_server_message(response)}",
                              url, response.status_code) from None

    def _wait(self, retry_state) -> float:
        """Exponential backoff with jitter (so `concurrency` threads do not hit a recovering server together);
        a 429's Retry-After where the server gives one."""
        error = retry_state.outcome.exception()
        if isinstance(error, _TransientStatus) and (after := _retry_after_s(error.response)) is not None:
            return min(after, self.max_backoff_s)
        exponential = self.backoff_s * 2 ** min(retry_state.attempt_number - 1, 60)
        return min(exponential + random.uniform(0, self.backoff_s), self.max_backoff_s)

    def _refused(self, url: str, response: httpx.Response) -> ServerError:
        message = f"{url} refused the request ({response.status_code}): {_server_message(response)}"
        if response.status_code in (401, 403) and self.api_key_env and not os.environ.get(self.api_key_env):
            message += f" (no API key sent: {self.api_key_env} is not set)"
        return ServerError(message, url, response.status_code)

    def _reply(self, body: dict, text_of: Callable[[dict], str | None], stop: list[str] | None) -> Reply:
        try:
            choice = body["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"{self.base_url} sent a reply with no choices: {str(body)[:_MESSAGE_CHARS]}",
                              self.base_url) from None
        text = text_of(choice) or ""
        # OpenAI's API leaves the stop sequence out of the text; some servers (transformers serve) keep it.
        for sequence in stop or ():
            if (at := text.find(sequence)) >= 0:
                text = text[:at]
        usage = body.get("usage") or {}
        return Reply(text=text, finish_reason=choice.get("finish_reason"),
                     prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))


def _tries(attempts: int) -> str:
    return "at its only try" if attempts == 1 else f"on all {attempts} tries"


def _describe(error: Exception) -> str:
    """An httpx error in a few words: its class and its message, if any (a ReadTimeout's message is often empty)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
