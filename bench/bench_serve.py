"""`selfevolve serve model=tiny` under load, over loopback, through the real `openai` client:
200 concurrent chat requests (arith questions, greedy, max_tokens=48) against the same
requests sent one after another. The server batches concurrent requests (max_batch=64);
sequential requests cannot be batched. Errors are counted; latency is per request, from
the client's call to its return. One warm-up request first.

Fairness: 30 chats (greedy, max_tokens=48) sent one after another, alone and then beside
a client that keeps sending a large completions request (64 prompts × n=8 × 32 tokens): the
server fills batches round-robin over waiting requests (scheduling.FairQueue), so a short
chat waits for a batch, not for the large request.

Streaming: 30 chats asking for a worked sum (about 25 tokens of answer; sampled, seeded),
stream=true, one after another: the time to the first token's chunk against the time to
the last chunk. Then 30 refinements of the same (two attempts: a verifier critic told a
wrong reference, so the first is always revised), streamed: the first draft token's chunk
(`reasoning_content`), the first answer token's, and the last chunk.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from selfevolve.data import arith
from selfevolve.serving.process import ServerProcess

N, SEQUENTIAL_N, MAX_TOKENS, SMALL_N = 200, 40, 48, 30


def _ask(client, prompt):
    t0 = time.perf_counter()
    try:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=MAX_TOKENS)
        return time.perf_counter() - t0, None
    except Exception as e:  # counted, not raised: the benchmark reports errors
        return time.perf_counter() - t0, repr(e)


def _stream(client, prompt, seed, refine=None):
    """(time to the first chunk with text, to the first content chunk, to the last chunk) of
    one streamed chat (`refine`: a refinement, whose drafts stream as reasoning_content)."""
    t0, first, answer = time.perf_counter(), None, None
    for c in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                            temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, stream=True,
                                            extra_body={"refine": refine} if refine else None):
        delta = c.choices[0].delta if c.choices else None
        if first is None and delta and (delta.content or (delta.model_extra or {}).get("reasoning_content")):
            first = time.perf_counter() - t0
        if answer is None and delta and delta.content:
            answer = time.perf_counter() - t0
    return first, answer, time.perf_counter() - t0


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
            alone = [_ask(client, p)[0] for p in prompts[:SMALL_N]]
            stop = threading.Event()

            def large():
                while not stop.is_set():
                    client.completions.create(model="tiny", prompt=prompts[:64], n=8, max_tokens=32, temperature=1.0)

            heavy = threading.Thread(target=large)
            heavy.start()
            time.sleep(1.0)
            beside = [_ask(client, p)[0] for p in prompts[:SMALL_N]]
            stop.set()
            heavy.join()
            chains = [f"What is {t.prompt.removeprefix('What is ').rstrip('?')} + 7 - 3 + 5?" for t in
                      arith.tasks("test", n=SMALL_N, seed=9)]
            streamed = [_stream(client, p, i) for i, p in enumerate(chains)]
            refined = [_stream(client, p, i, {"critic": "verifier", "reference": "-1000", "max_turns": 2})
                       for i, p in enumerate(chains)]
        finally:
            server.stop()
    errors = [e for _, e in seq + conc if e]
    ttft, full = [a for _, a, _ in streamed], [b for _, _, b in streamed]
    r_first, r_answer, r_full = ([x[k] for x in refined] for k in range(3))
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    lat = sorted(t for t, _ in conc)
    seq_rps, conc_rps = SEQUENTIAL_N / seq_time, N / conc_time
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    return {"title": "Serving: 200 concurrent chat requests vs sequential (selfevolve serve, openai client)",
            "doc": __doc__.strip(),
            "rows": [(f"{N} concurrent requests", f"{conc_rps:.1f} req/s",
                      f"p50 {p(0.5) * 1000:.0f} ms, p99 {p(0.99) * 1000:.0f} ms, {len(errors)} errors"),
                     (f"{SEQUENTIAL_N} sequential requests", f"{seq_rps:.1f} req/s",
                      f"p50 {statistics.median(t for t, _ in seq) * 1000:.0f} ms"),
                     (f"{SMALL_N} short chats alone", f"p50 {q(alone, .5) * 1000:.0f} ms",
                      f"p99 {q(alone, .99) * 1000:.0f} ms"),
                     (f"{SMALL_N} short chats beside 64 prompts × n=8", f"p50 {q(beside, .5) * 1000:.0f} ms",
                      f"p99 {q(beside, .99) * 1000:.0f} ms"),
                     (f"{SMALL_N} streamed chats: first token", f"p50 {q(ttft, .5) * 1000:.0f} ms",
                      f"p99 {q(ttft, .99) * 1000:.0f} ms"),
                     (f"{SMALL_N} streamed chats: last chunk", f"p50 {q(full, .5) * 1000:.0f} ms",
                      f"p99 {q(full, .99) * 1000:.0f} ms"),
                     (f"{SMALL_N} streamed refinements: first draft token", f"p50 {q(r_first, .5) * 1000:.0f} ms",
                      f"p99 {q(r_first, .99) * 1000:.0f} ms"),
                     (f"{SMALL_N} streamed refinements: first answer token", f"p50 {q(r_answer, .5) * 1000:.0f} ms",
                      f"p99 {q(r_answer, .99) * 1000:.0f} ms"),
                     (f"{SMALL_N} streamed refinements: last chunk", f"p50 {q(r_full, .5) * 1000:.0f} ms",
                      f"p99 {q(r_full, .99) * 1000:.0f} ms")],
            "ratios": [("concurrent / sequential throughput (target >= 3)", conc_rps / seq_rps),
                       ("short-chat p99 beside a large request / alone", q(beside, .99) / q(alone, .99)),
                       ("streaming: first token / whole answer, p50", q(ttft, .5) / q(full, .5)),
                       ("streamed refinement: first token / whole, p50", q(r_first, .5) / q(r_full, .5))],
            "errors": errors}


if __name__ == "__main__":
    r = run()
    print(r["rows"], r["ratios"], r["errors"][:3])
