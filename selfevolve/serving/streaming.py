"""Streaming for `selfevolve serve`: an answer sent as server-sent events while its tokens are
generated (the model thread calls back with each one), holding back only text that may still
change."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi.responses import StreamingResponse

from selfevolve.types import first_stop


def decode_exact(tokenizer, ids: list[int]) -> str:
    """The tokens' own text: special tokens dropped, spaces not cleaned up (a clean-up rewrites
    text already streamed)."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class StreamText:
    """One streamed choice's text: the tokens so far, decoded, less what may still change — an
    unfinished character, a tail that could begin a `stop` string, and, for chat (whose answer
    is trimmed), leading and trailing whitespace. `add` returns the text newly safe to send.
    Decoded without the tokenizer's clean-up of spaces, which rewrites text already sent (the
    completions text is decoded so too; a chat answer from a tokenizer that cleans up may then
    end the stream with less than the whole answer's text)."""

    def __init__(self, tokenizer, stop, strip: bool):
        self.tokenizer, self.ids, self.sent, self.strip = tokenizer, [], "", strip
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = decode_exact(self.tokenizer, self.ids)
        text = text.strip() if self.strip else text
        at = first_stop(text, self.stops)
        if at >= 0:
            text = text[:at]
        else:  # hold back a tail that may begin a stop string
            text = text[: len(text) - max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                                          default=0)]
        text = text.rstrip("\ufffd")
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


async def stream(handler, req, tokenizer, chat: bool) -> StreamingResponse:
    """`handler(req, emit)` answered as server-sent events while it generates: each
    choice's text is sent as its tokens arrive (`StreamText`), then what the finished
    answer adds (a cut at `stop`), its finish_reason and, on the last chunk, the
    `selfevolve` field; the choice's log-probs, when asked for, come whole on its last
    chunk (clients join the chunks' lists). A refinement's drafts (`emit(("draft", turn),
    token)`: attempts that may not be its answer) stream as `delta.reasoning_content`, as
    vLLM streams a reasoning model's thinking; its answer then comes as `content` (streamed
    live when it is the last allowed attempt). The response starts once the first token is out or the answer is
    done, so a request refused before generating is still a plain 4xx. Without a
    `tokenizer` (a gateway's refinement, whose engine does not stream to it) the answer
    comes whole."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()

    def emit(c: int, t: int) -> None:  # from the model thread
        loop.call_soon_threadsafe(tokens.put_nowait, (c, t))

    # an echo's prompt comes first: its answer is sent whole
    task = asyncio.ensure_future(handler(req, None if getattr(req, "echo", False) or tokenizer is None else emit))
    first = asyncio.ensure_future(tokens.get())
    await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
    if task.done() and task.exception() is not None:
        first.cancel()
        raise task.exception()
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": req.model, "object": "chat.completion.chunk" if chat else "text_completion"}
    texts: dict[int, StreamText] = {}
    drafts: dict[int, StreamText] = {}  # a refinement's attempts that may not be its answer, by turn
    roled: set[int] = set()  # choices whose role has been sent

    def chunk(index: int, text: str | None, finish: str | None = None, field: str = "content", logprobs=None,
              **more) -> str:
        delta = {} if text is None else {field: text}
        if chat and text is not None and index not in roled:  # the role once, on a choice's first delta, as OpenAI
            roled.add(index)
            delta = {"role": "assistant", **delta}
        part = {"delta": delta} if chat else {"text": text or ""}
        choice = {"index": index, **part, "logprobs": logprobs, "finish_reason": finish}
        return f"data: {json.dumps(head | more | {'choices': [choice]})}\n\n"

    async def events():
        nonlocal first
        while True:
            await asyncio.wait({first, task}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done():
                break  # the answer is done; what its tokens did not send, its end sends
            c, t = first.result()
            if isinstance(c, tuple):  # a refinement's draft: reasoning, each attempt after a blank line
                draft = drafts.setdefault(c[1], StreamText(tokenizer, None, strip=True))
                new = draft.add(t)
                if new:
                    yield chunk(0, ("\n\n" if len(drafts) > 1 and draft.sent == new else "") + new,
                                field="reasoning_content")
            elif new := texts.setdefault(c, StreamText(tokenizer, req.stop, strip=chat)).add(t):
                yield chunk(c, new)
            first = asyncio.ensure_future(tokens.get())
        first.cancel()
        try:
            out = task.result()
        except Exception as e:  # noqa: BLE001 - after the first byte: an error event, as OpenAI's stream sends one
            status, message = getattr(e, "status", 500), getattr(e, "message", f"{type(e).__name__}: {e}")
            yield f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"
            yield "data: [DONE]\n\n"
            return
        extra = {"selfevolve": out["selfevolve"]} if "selfevolve" in out else {}
        for k, c in enumerate(out["choices"]):
            final = c["message"]["content"] if chat else c["text"]
            sent = texts[c["index"]].sent if c["index"] in texts else ""
            if final.startswith(sent) and final != sent:
                yield chunk(c["index"], final[len(sent):])
            yield chunk(c["index"], None, c["finish_reason"], logprobs=c.get("logprobs"),
                        **(extra if k == len(out["choices"]) - 1 else {}))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
