"""A chat branch through HTTP, as SillyTavern sends one: a ~1,500-token history once, then three
follow-ups that replace the last reply with other text and add a new message; each against a
fresh ~50-token prompt (time to the first SSE event of /api/extra/generate/stream).

    kobold-api serve --port 5123 &   # the default model
    python benchmarks/branch_followups.py
"""
import json, time, http.client, random
def ttft(prompt, n=1):
    c = http.client.HTTPConnection("localhost", 5123, timeout=120)
    body = json.dumps({"prompt": prompt, "max_length": n, "temperature": 0.01, "top_k": 1, "max_context_length": 4096})
    t = time.perf_counter(); c.request("POST", "/api/extra/generate/stream", body, {"Content-Type": "application/json"})
    r = c.getresponse(); first = None
    for line in r:
        if line.startswith(b"data:") and first is None: first = time.perf_counter() - t
    c.close(); return first
rng = random.Random(1)
words = "the sea lighthouse keeper storm night ship light rock wave wind old man boat harbor".split()
def text(n): return " ".join(rng.choice(words) for _ in range(n))
history = "".join(f"User: {text(40)}\nBot: {text(60)}\n" for _ in range(13))
reply_start = history.rfind("Bot:")
base = history[:reply_start]
print("history ttft", round(ttft(history, 4), 3))
for k in range(3):
    follow = base + f"Bot: {text(25)}\nUser: {text(20)}\nBot:"
    b = ttft(follow)
    f = ttft(f"User: {text(30)}\nBot:")  # fresh ~50 tokens
    print(f"branch {k}: {b*1000:.0f} ms, fresh {f*1000:.0f} ms, ratio {b/f:.2f}")
