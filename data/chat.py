"""
The one client for OpenAI-compatible POST {base_url}/chat/completions, with retries and backoff: used by the LLM
judge (data/rewards.py) and by the caption and question stages of data/make_reason_data.py.
"""
import json
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class Endpoint:
    """An OpenAI-compatible endpoint and how to call it. The defaults are the judge's (data/rewards.py names this
    class JudgeConfig): a one-word reply, short timeouts."""
    base_url: str  # e.g. "http://127.0.0.1:8000/v1"; we POST {base_url}/chat/completions
    model: str  # model name the server expects
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the key; unset -> no Authorization header (local servers)
    timeout_s: float = 30.0  # per HTTP attempt (connect and each read)
    max_retries: int = 2  # extra attempts after the first, so at most 1 + max_retries requests per call
    retry_backoff_s: float = 0.5  # sleep before retry k is backoff * 2**(k-1)
    concurrency: int = 8  # requests in flight at once in chat_many (and the judge's batch)
    max_tokens: int = 8  # reply length cap (the judge's reply should be one word)


def chat_once(ep: Endpoint, messages: list, temperature: float) -> str:
    """One POST {base_url}/chat/completions; the reply's text. Raises on any failure."""
    body = {"model": ep.model, "messages": messages, "temperature": temperature, "max_tokens": ep.max_tokens}
    headers = {"Content-Type": "application/json"}
    if os.environ.get(ep.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[ep.api_key_env]}"
    req = urllib.request.Request(ep.base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=ep.timeout_s) as resp:  # HTTP 4xx/5xx raise HTTPError
        content = json.loads(resp.read().decode())["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise ValueError(f"reply content is {type(content).__name__}, not text")
    return content


def with_retries(ep: Endpoint, call) -> tuple:
    """(call(), tries made, "") or (None, 1 + max_retries, last error): call is tried up to 1 + ep.max_retries
    times with exponential backoff between tries. Never raises: every exception is a failed try, so a call that
    also parses the reply (the judge's yes/no) retries a reply it cannot read like a dropped connection."""
    error = ""
    for attempt in range(1 + ep.max_retries):
        if attempt > 0 and ep.retry_backoff_s > 0:
            time.sleep(ep.retry_backoff_s * 2 ** (attempt - 1))
        try:
            return call(), attempt + 1, ""
        except Exception as e:  # refused, timeout, HTTP error, bad envelope, unreadable reply: all transient to us
            error = f"{type(e).__name__}: {e}"
    return None, 1 + ep.max_retries, error


def chat(ep: Endpoint, messages: list, temperature: float) -> tuple:
    """(text, "") or (None, last error) after 1 + max_retries attempts with backoff. Never raises."""
    text, _, error = with_retries(ep, lambda: chat_once(ep, messages, temperature))
    return text, error


def chat_many(ep: Endpoint, conversations: list, temperature: float) -> list:
    """chat() for each conversation, ep.concurrency at a time (threads: the work is waiting on sockets)."""
    with ThreadPoolExecutor(max_workers=max(1, ep.concurrency)) as pool:
        return list(pool.map(lambda m: chat(ep, m, temperature), conversations))
