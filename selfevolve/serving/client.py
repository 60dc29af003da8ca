"""A client of `selfevolve serve`'s own route: a verdict on a logged answer, after the fact.

    import openai, selfevolve
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is 7 + 8?"}])
    selfevolve.feedback_for(r.model_extra["selfevolve"]["trace_id"], 1.0, text="right")

The server stores it as the answer's feedback (source `user`), where the recipes that train
on logged traffic find it.
"""

from __future__ import annotations

import os

import httpx

from selfevolve.errors import UserError


def feedback_for(trace_id: str, score: float, text: str | None = None, base_url: str = "http://127.0.0.1:8000/v1",
                 api_key: str | None = None, timeout: float = 30.0) -> dict:
    """POST /v1/feedback. `api_key` defaults to SELFEVOLVE_API_KEY; a refusal (unknown id,
    a score outside [0, 1], a wrong key) raises UserError with the server's message."""
    key = api_key or os.environ.get("SELFEVOLVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"trace_id": trace_id, "score": score} | ({"text": text} if text is not None else {})
    try:
        r = httpx.post(base_url.rstrip("/") + "/feedback", json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise UserError(f"feedback for {trace_id}: cannot reach {base_url} ({e})") from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise UserError(f"feedback for {trace_id}: {r.status_code} {message}")
    return r.json()
