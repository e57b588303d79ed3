"""A stand-in for vLLM's OpenAI API server, for tests of the server lifecycle, the load
client and tuning studies in seconds instead of minutes.

Takes the flags VLLMServer passes (--port, --host, --served-model-name, --max-num-seqs ...).
Streams `max_tokens` chunks per completion: the first after TTFT_S, the next every
token_delay(max_num_seqs) seconds, so a tuning study has a known best (max_num_seqs 8),
and usage in the last chunk. Starts a child process in its own process group (as vLLM's
engine core is), to show that stopping kills the whole group. Exits with an error at start
for --max-num-seqs 3 (a setting the engine refuses), and at once with FAKE_SERVER_FAIL set.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TTFT_S = 0.03


def token_delay(max_num_seqs: int) -> float:
    return 0.004 * (1 + abs(math.log2(max_num_seqs) - 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--port", type=int)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--served-model-name", default="fake")
    ap.add_argument("--max-num-seqs", type=int, default=4)
    args, _ = ap.parse_known_args()
    if os.environ.get("FAKE_SERVER_FAIL"):
        print("ValueError: fake engine refuses to start (FAKE_SERVER_FAIL)", flush=True)
        sys.exit(1)
    if args.max_num_seqs == 3:
        print("ValueError: max_num_seqs=3 is not supported by this fake engine", flush=True)
        sys.exit(1)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the "engine core"
    delay = token_delay(args.max_num_seqs)

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._json({})
            elif self.path == "/v1/models":
                self._json({"data": [{"id": args.served_model_name}]})
            else:
                self.send_error(404)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = int(req["max_tokens"])
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            time.sleep(TTFT_S)
            for i in range(n):
                if i:
                    time.sleep(delay)
                self.wfile.write(b"data: " + json.dumps({"choices": [{"text": f" t{i}"}]}).encode() + b"\n\n")
                self.wfile.flush()
            prompt = req["prompt"]
            usage = {"prompt_tokens": len(prompt) if isinstance(prompt, list) else len(prompt.split()),
                     "completion_tokens": n}
            self.wfile.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    print(f"fake server on {args.host}:{args.port}", flush=True)
    ThreadingHTTPServer((args.host, args.port), H).serve_forever()


if __name__ == "__main__":
    main()
