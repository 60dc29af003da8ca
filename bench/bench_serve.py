"""`selfevolve serve model=tiny` under load, over loopback, through the real `openai` client:
200 concurrent chat requests (arith questions, greedy, max_tokens=48) against the same
requests sent one after another. The server batches concurrent requests (max_batch=64);
sequential requests cannot be batched. Errors are counted; latency is per request, from
the client's call to its return. One warm-up request first.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from selfevolve import arith
from selfevolve.server_process import ServerProcess

N, SEQUENTIAL_N, MAX_TOKENS = 200, 40, 48


def _ask(client, prompt):
    t0 = time.perf_counter()
    try:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=MAX_TOKENS)
        return time.perf_counter() - t0, None
    except Exception as e:  # counted, not raised: the benchmark reports errors
        return time.perf_counter() - t0, repr(e)


def run() -> dict:
    import tempfile
    prompts = [t.prompt for t in arith.tasks("test", n=N, seed=7)]
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess("model=tiny", "max_batch=64", f"traces={tmp}/t.sqlite")
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
            _ask(client, prompts[0])
            t0 = time.perf_counter()
            seq = [_ask(client, p) for p in prompts[:SEQUENTIAL_N]]
            seq_time = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(N) as pool:
                conc = list(pool.map(lambda p: _ask(client, p), prompts))
            conc_time = time.perf_counter() - t0
        finally:
            server.stop()
    errors = [e for _, e in seq + conc if e]
    lat = sorted(t for t, _ in conc)
    seq_rps, conc_rps = SEQUENTIAL_N / seq_time, N / conc_time
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    return {"title": "Serving: 200 concurrent chat requests vs sequential (selfevolve serve, openai client)",
            "doc": __doc__.strip(),
            "rows": [(f"{N} concurrent requests", f"{conc_rps:.1f} req/s",
                      f"p50 {p(0.5) * 1000:.0f} ms, p99 {p(0.99) * 1000:.0f} ms, {len(errors)} errors"),
                     (f"{SEQUENTIAL_N} sequential requests", f"{seq_rps:.1f} req/s",
                      f"p50 {statistics.median(t for t, _ in seq) * 1000:.0f} ms")],
            "ratios": [("concurrent / sequential throughput (target >= 3)", conc_rps / seq_rps)],
            "errors": errors}


if __name__ == "__main__":
    r = run()
    print(r["rows"], r["ratios"], r["errors"][:3])
