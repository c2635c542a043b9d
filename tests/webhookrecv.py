"""A loopback HTTP receiver for webhook and route-forward tests: records path, headers,
Content-Type and body of every POST; `status[path]` lists the codes to answer in turn (the last
repeats), 200 by default; a 3xx answer points Location at a metadata address (for the egress
guard's no-redirect test)."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HookReceiver:
    def __init__(self):
        self.posts: list[dict] = []
        self.status: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                path = self.path.split("?")[0]
                with outer.lock:
                    outer.posts.append({"path": path, "headers": dict(self.headers.items()), "body": body,
                                        "ctype": self.headers.get("Content-Type", "")})
                    codes = outer.status.get(path, [200])
                    code = codes.pop(0) if len(codes) > 1 else codes[0]
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}{path}"

    def to(self, path: str) -> list[dict]:
        with self.lock:
            return [p for p in self.posts if p["path"] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
