"""Tag consolidation with an LLM behind any OpenAI-compatible endpoint (the `openai` client).

The endpoint comes from `OPENAI_BASE_URL` (or `ItemParams.llm_base_url`), the key from
`OPENAI_API_KEY`; the key is never written to the store, the params, the report or a message.
Tags go in batches; each answer must be a JSON object mapping every tag of the batch to a list of
allowed category names (case-insensitive; a bare name counts as a list of one). An answer that is
not JSON, misses a tag or names an unknown category is retried, as are timeouts, connection
errors, 429 and 5xx, with exponential backoff; after `retries` attempts the build stops with an
`ExternalError`. Every valid answer is committed to `llm_cache` at once (outside the prior's
transaction), so a failed build keeps what it paid for and a rerun makes no calls for them.
With `n_categories` instead of names, one first call asks for the category names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import duckdb

from mhr.cache import canonical_json
from mhr.errors import ExternalError, UsageError

if TYPE_CHECKING:
    from mhr.priors.item import ItemParams

BACKOFF_S = 1.0  # first retry delay; doubles each attempt (tests patch it down)

SYSTEM = (
    "You consolidate raw item tags of a recommender system into a small set of categories. "
    "Answer with one JSON object and nothing else."
)


class _BadAnswer(Exception):
    pass


def public_url(url: str | None) -> str | None:
    """The endpoint without user:password (safe to store in params)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _client(base_url: str | None, timeout: float):
    from openai import OpenAI

    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise UsageError(
            "--llm openai needs OPENAI_API_KEY in the environment",
            hint="export OPENAI_API_KEY=… (any value for a local server) and OPENAI_BASE_URL=http://host/v1",
        )
    return OpenAI(base_url=base_url or os.environ.get("OPENAI_BASE_URL"), api_key=key, timeout=timeout,
                  max_retries=0)


def _redact(text: str) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    return text.replace(key, "***") if key else text


def _parse_json(text: str) -> Any:
    body = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", body, re.S)
    if fence:
        body = fence.group(1)
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise _BadAnswer(f"not JSON: {text[:80]!r}") from None


def validate_mapping(answer: str, tags: list[str], categories: list[str]) -> dict[str, list[str]]:
    """The answer as tag -> canonical category names, or _BadAnswer saying what is wrong."""
    data = _parse_json(answer)
    if not isinstance(data, dict):
        raise _BadAnswer("not a JSON object")
    if isinstance(data.get("mapping"), dict):
        data = data["mapping"]
    canon = {c.lower(): c for c in categories}
    lookup = {str(k).strip().lower(): v for k, v in data.items()}
    out: dict[str, list[str]] = {}
    missing = [t for t in tags if t.lower() not in lookup]
    if missing:
        raise _BadAnswer(f"tags missing from the answer: {', '.join(missing[:5])}")
    for t in tags:
        value = lookup[t.lower()]
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise _BadAnswer(f"tag {t!r}: expected a non-empty list of category names")
        unknown = [n for n in names if not isinstance(n, str) or n.strip().lower() not in canon]
        if unknown:
            raise _BadAnswer(f"tag {t!r}: unknown categories {unknown[:3]}")
        out[t] = list(dict.fromkeys(canon[n.strip().lower()] for n in names))
    return out


def validate_names(answer: str, k: int) -> list[str]:
    data = _parse_json(answer)
    names = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise _BadAnswer('expected {"categories": [names]}')
    names = list(dict.fromkeys(n.strip() for n in names))
    if len(names) != k:
        raise _BadAnswer(f"expected {k} distinct names, got {len(names)}")
    return names


def _cache_key(model: str, messages: list[dict]) -> str:
    return hashlib.sha256(canonical_json({"model": model, "messages": messages}).encode()).hexdigest()


class _Session:
    """One consolidation: a lazily made client, the cache, and counters for the report."""

    def __init__(self, con: duckdb.DuckDBPyConnection, p: ItemParams) -> None:
        self.con, self.p = con, p
        self.model = p.model or os.environ.get("OPENAI_MODEL") or "gpt-4o-mini"
        self.client = None
        self.calls = self.cached = self.retried = 0

    def ask(self, prompt: str, validate):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        key = _cache_key(self.model, messages)
        row = self.con.execute("SELECT response FROM llm_cache WHERE key = ?", [key]).fetchone()
        if row is not None:
            try:
                result = validate(row[0])
                self.cached += 1
                return result
            except _BadAnswer:
                self.con.execute("DELETE FROM llm_cache WHERE key = ?", [key])
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        if self.client is None:
            self.client = _client(self.p.llm_base_url, self.p.timeout)
        problem = ""
        for attempt in range(self.p.retries):
            if attempt:
                self.retried += 1
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            self.calls += 1
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=0,
                    response_format={"type": "json_object"},
                )
                text = reply.choices[0].message.content or ""
                result = validate(text)
            except _BadAnswer as e:
                problem = f"invalid answer ({e})"
                continue
            except APITimeoutError:
                problem = f"no answer within {self.p.timeout:g} s"
                continue
            except APIConnectionError as e:
                problem = f"cannot reach the endpoint ({_redact(str(e))})"
                continue
            except APIStatusError as e:
                problem = f"HTTP {e.status_code} ({_redact(str(e))[:200]})"
                if e.status_code in (400, 401, 403, 404):
                    break
                continue
            except (IndexError, AttributeError, TypeError):
                problem = "the reply has no message content"
                continue
            self.con.execute(
                "INSERT OR REPLACE INTO llm_cache VALUES (?, ?, ?, ?, now())",
                [key, self.model, canonical_json(messages), text],
            )
            return result
        endpoint = public_url(self.p.llm_base_url or os.environ.get("OPENAI_BASE_URL")) or "api.openai.com"
        raise ExternalError(
            f"LLM endpoint {endpoint} (model {self.model}) failed after {attempt + 1} "
            f"attempt(s): {problem}",
            hint="check OPENAI_BASE_URL / OPENAI_API_KEY / --model and rerun (answers so far are cached), "
            "or consolidate offline with --categories (MiniLM) or --map FILE",
        )


def consolidate_with_llm(
    con: duckdb.DuckDBPyConnection, tags: list[str], p: ItemParams
) -> tuple[dict[str, list[str]], list[str], dict]:
    """tags (most frequent first) -> (mapping, categories, report)."""
    s = _Session(con, p)
    if p.categories:
        categories = list(p.categories)
    else:
        k = int(p.n_categories or 0)
        shown = tags[:300]
        prompt = (
            f"Here are the {len(shown)} most frequent tags of a catalogue:\n{json.dumps(shown)}\n"
            f"Propose exactly {k} short, distinct category names that together cover them. "
            'Answer as {"categories": ["name", ...]}.'
        )
        categories = s.ask(prompt, lambda text: validate_names(text, k))
    mapping: dict[str, list[str]] = {}
    for start in range(0, len(tags), p.batch_size):
        batch = tags[start : start + p.batch_size]
        prompt = (
            f"Categories: {json.dumps(categories)}\nTags: {json.dumps(batch)}\n"
            "Map every tag to one or more of the categories (several when it clearly belongs to "
            "several; use only the category names given). Answer as a JSON object with every tag "
            'as a key and a list of category names as its value, e.g. {"tag": ["category"]}.'
        )
        mapping.update(s.ask(prompt, lambda text, b=batch: validate_mapping(text, b, categories)))
    report = {"method": "llm", "model": s.model, "llm_calls": s.calls, "llm_cached_answers": s.cached,
              "llm_retries": s.retried}
    return mapping, categories, report
