#!/usr/bin/env python3
"""serve_check.py LOG — the client half of gpu-check.sh's serve stage.

`qvc serve ... --port 0` is running and writing LOG. Waits for its
`listening on http://HOST:PORT` line, then over plain HTTP (standard library
only: the GPU machine has no network to install a client):
  * GET /health until it answers 200: the server listens at once and loads
    the model behind a 503 (on a GPU the context, the modules and the weight
    upload take seconds), as a client of any OpenAI-style server waits;
    a failed load ends the check with the server's reason;
  * GET /v1/models;
  * two chat completions at once with the same greedy prompt, one of them
    streamed (server-sent events up to `data: [DONE]`): both must answer,
    the streamed deltas must add up to the other's text (two sequences
    decoded side by side give each the tokens it gets alone), and the usage
    must count 1 to MAX_TOKENS completion tokens;
  * one bad request (no messages), which must get a 4xx with an error body.
Prints one summary line; exits 1 with the reason on stderr on any failure.
"""
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request

MAX_TOKENS = 6
WAIT_S = 120


def fail(msg):
    print(f"serve_check: {msg}", file=sys.stderr)
    sys.exit(1)


def wait_for_url(log):
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        try:
            with open(log, encoding="utf-8", errors="replace") as f:
                m = re.search(r"listening on (http://[^\s]+)", f.read())
            if m:
                return m.group(1).rstrip("/")
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    fail(f"no 'listening on' line in {log} after {WAIT_S} s")


def wait_for_ready(base):
    """Polls /health until 200; returns the seconds it took."""
    t0 = time.time()
    last = "no answer"
    while time.time() - t0 < WAIT_S:
        try:
            with urllib.request.urlopen(base + "/health", timeout=10) as r:
                if r.status == 200:
                    return time.time() - t0
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            if body.get("status") == "failed":
                fail(f"the model failed to load: {body.get('error')}")
            last = f"HTTP {e.code} {body}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    fail(f"/health not ready after {WAIT_S} s (last: {last})")


def http_error_text(e):
    """An HTTPError with the error message of its JSON body, if any."""
    try:
        msg = json.loads(e.read() or b"{}").get("error", {}).get("message")
    except (ValueError, AttributeError):
        msg = None
    return f"{e}: {msg}" if msg else str(e)


def post(url, body, stream=False):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=WAIT_S) as r:
        if not stream:
            return json.loads(r.read())
        text, done = "", False
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            for ch in json.loads(data).get("choices", []):
                text += (ch.get("delta") or {}).get("content") or ""
        if not done:
            fail("the stream ended without data: [DONE]")
        return text


def main():
    if len(sys.argv) != 2:
        fail("usage: serve_check.py SERVE_LOG")
    base = wait_for_url(sys.argv[1])
    ready_s = wait_for_ready(base)
    with urllib.request.urlopen(base + "/v1/models", timeout=60) as r:
        models = json.loads(r.read())
    ids = [m.get("id") for m in models.get("data", [])]
    if not ids:
        fail(f"/v1/models lists no model: {models}")
    body = {
        "model": ids[0],
        "messages": [{"role": "user", "content": "Describe a red square in one sentence."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    out, errs = {}, []

    def run(key, stream):
        try:
            out[key] = post(base + "/v1/chat/completions", dict(body, stream=stream), stream)
        except urllib.error.HTTPError as e:
            errs.append(f"{key}: {http_error_text(e)}")
        except Exception as e:  # reported below, with the other thread's outcome
            errs.append(f"{key}: {e}")

    t0 = time.time()
    threads = [threading.Thread(target=run, args=(k, s)) for k, s in (("plain", False), ("stream", True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = (time.time() - t0) * 1e3
    if errs:
        fail("; ".join(errs))
    plain = out["plain"]
    try:
        text = plain["choices"][0]["message"]["content"]
        used = plain["usage"]["completion_tokens"]
    except (KeyError, IndexError, TypeError):
        fail(f"malformed completion: {plain}")
    if not (1 <= used <= MAX_TOKENS):
        fail(f"usage.completion_tokens {used} not in 1..{MAX_TOKENS}")
    if out["stream"] != text:
        fail(f"streamed text {out['stream']!r} differs from the other request's {text!r}")
    try:
        post(base + "/v1/chat/completions", {"model": ids[0], "messages": []})
        fail("a request without messages was accepted")
    except urllib.error.HTTPError as e:
        if not 400 <= e.code < 500:
            fail(f"a request without messages got HTTP {e.code}, not a 4xx")
        err = json.loads(e.read() or b"{}").get("error", {})
        if not err.get("message"):
            fail("the 4xx for a request without messages has no error message")
    print(
        f"ready in {ready_s:.1f} s; 2 concurrent chat completions (one streamed) equal, "
        f"{used} tokens each, {ms:.0f} ms; bad request 4xx"
    )


if __name__ == "__main__":
    main()
