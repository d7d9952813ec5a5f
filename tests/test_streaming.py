"""The stream pass-through helpers: recovering the text of a stream from its raw chunks."""

from __future__ import annotations

from serving.streaming import stream_texts


def test_stream_texts_of_chat_and_completion_chunks() -> None:
    chat = (
        b'[{"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]},'
        b'{"id":"x","choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]},'
        b'{"id":"x","choices":[{"index":1,"delta":{"content":"lo \\u00e9"},"finish_reason":"stop"}]},'
        b'{"id":"x","choices":[],"usage":{"prompt_tokens":3}}]'
    )
    assert stream_texts(chat, chat=True) == [(0, "", None), (0, "Hel", None), (1, "lo é", "stop")]
    completion = b'[{"choices":[{"index":0,"text":" a","finish_reason":null}]},{"choices":null}]'
    assert stream_texts(completion, chat=False) == [(0, " a", None)]


def test_stream_texts_of_unexpected_shapes_falls_back_to_plain_json() -> None:
    odd = b'[{"choices":[{"index":"0","delta":{"content":[{"type":"text"}]},"finish_reason":7}]},' \
        b'{"choices":[{"delta":{"content":"ok"}}]}]'  # fmt: skip
    assert stream_texts(odd, chat=True) == [(0, None, None), (0, "ok", None)]
