"""The official `openai` Python client against `qvc serve` (run by tests/serve_openai.rs).

argv[1]: a JSON file written by the Rust test:
  {"base_url", "api_key", "model", "fixture", "cases": [{"name", "max_tokens", "text", "prompt_tokens",
   "completion_tokens"}]}
where text/prompt_tokens/completion_tokens are what `qvc generate --temperature 0 --json` gave for the
fixture's expected.json `chat.NAME` conversation. Exits non-zero with a message on the first mismatch.
"""
import base64
import json
import os
import re
import sys

import openai
from openai import OpenAI

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
        ".gif": "image/gif", ".bmp": "image/bmp"}


def data_url(path):
    with open(path, "rb") as f:
        b = f.read()
    return "data:%s;base64,%s" % (MIME[os.path.splitext(path)[1].lower()], base64.b64encode(b).decode())


def user_content(text, fixture):
    """'Picture 1:<img>a.png</img>\\nQuestion' -> OpenAI content parts (pictures as data URLs)."""
    parts = []
    rest = text
    m = re.match(r"Picture \d+:<img>(.*?)</img>\n?", rest, re.S)
    while m:
        parts.append({"type": "image_url", "image_url": {"url": data_url(os.path.join(fixture, m.group(1)))}})
        rest = rest[m.end():]
        m = re.match(r"Picture \d+:<img>(.*?)</img>\n?", rest, re.S)
    if not parts:
        return rest
    if rest:
        parts.append({"type": "text", "text": rest})
    return parts


def messages(chat, fixture):
    out = []
    if chat.get("system") and chat["system"] != "You are a helpful assistant.":
        out.append({"role": "system", "content": chat["system"]})
    for q, a in chat["history"]:
        out.append({"role": "user", "content": user_content(q, fixture)})
        out.append({"role": "assistant", "content": a})
    out.append({"role": "user", "content": user_content(chat["query"], fixture)})
    return out


def check(cond, what):
    if not cond:
        print("FAIL: " + what, flush=True)
        sys.exit(1)


def main():
    cfg = json.load(open(sys.argv[1]))
    fixture = cfg["fixture"]
    expected = json.load(open(os.path.join(fixture, "expected.json")))
    client = OpenAI(base_url=cfg["base_url"], api_key=cfg["api_key"], max_retries=0, timeout=300)
    print("openai", openai.__version__)

    ids = [m.id for m in client.models.list().data]
    check(cfg["model"] in ids, "models.list() %r lacks %r" % (ids, cfg["model"]))

    for case in cfg["cases"]:
        name = case["name"]
        chat = expected["chat"][name]
        msgs = messages(chat, fixture)
        n_tokens = chat["n_tokens"]
        check(case["prompt_tokens"] == n_tokens, "%s: qvc generate's prompt has %d tokens, the fixture %d"
              % (name, case["prompt_tokens"], n_tokens))

        r = client.chat.completions.create(model=cfg["model"], messages=msgs, max_tokens=case["max_tokens"],
                                           temperature=0)
        check(r.object == "chat.completion" and r.id.startswith("chatcmpl-"), "%s: response shape %r" % (name, r))
        c = r.choices[0]
        check(c.message.role == "assistant", "%s: role %r" % (name, c.message.role))
        check(c.message.content == case["text"], "%s: content %r != qvc generate %r"
              % (name, c.message.content, case["text"]))
        check(c.finish_reason in ("stop", "length"), "%s: finish_reason %r" % (name, c.finish_reason))
        check(r.usage.prompt_tokens == n_tokens, "%s: usage.prompt_tokens %d != n_tokens %d"
              % (name, r.usage.prompt_tokens, n_tokens))
        check(r.usage.completion_tokens == case["completion_tokens"], "%s: completion_tokens %d != %d"
              % (name, r.usage.completion_tokens, case["completion_tokens"]))
        check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "%s: total_tokens" % name)

        stream = client.chat.completions.create(model=cfg["model"], messages=msgs, max_tokens=case["max_tokens"],
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        text, first, finish, usage = "", None, None, None
        for chunk in stream:
            check(chunk.object == "chat.completion.chunk", "%s: chunk object %r" % (name, chunk.object))
            if first is None:
                first = chunk
            for ch in chunk.choices:
                if ch.delta.content:
                    text += ch.delta.content
                if ch.finish_reason:
                    finish = ch.finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
        check(first is not None and first.choices and first.choices[0].delta.role == "assistant",
              "%s: the first chunk has delta.role: %r" % (name, first))
        check(text == case["text"], "%s: streamed %r != qvc generate %r" % (name, text, case["text"]))
        check(finish == c.finish_reason, "%s: streamed finish_reason %r != %r" % (name, finish, c.finish_reason))
        check(usage is not None and usage.prompt_tokens == n_tokens,
              "%s: streamed usage %r (want prompt_tokens %d)" % (name, usage, n_tokens))
        print("ok %s: %d prompt tokens, %d new, %r" % (name, n_tokens, r.usage.completion_tokens, text[:40]))

    # The client's own exception types for the error statuses.
    msgs = [{"role": "user", "content": "hi"}]
    try:
        client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=2)
        check(False, "an unknown model was accepted")
    except openai.NotFoundError as e:
        print("ok unknown model: 404", e.message[:80])
    try:
        client.chat.completions.create(model=cfg["model"], messages=msgs, max_tokens=2, n=2)
        check(False, "n=2 was accepted")
    except openai.BadRequestError as e:
        print("ok n=2: 400", e.message[:80])
    bad = OpenAI(base_url=cfg["base_url"], api_key="wrong-key", max_retries=0, timeout=60)
    try:
        bad.chat.completions.create(model=cfg["model"], messages=msgs, max_tokens=2)
        check(False, "a wrong API key was accepted")
    except openai.AuthenticationError as e:
        print("ok wrong key: 401", e.message[:80])
    print("all ok")


if __name__ == "__main__":
    main()
