"""A model hub on 127.0.0.1 that knows no repository: online-path tests of hub ids and timm names."""

import http.server


class NoSuchRepo(http.server.BaseHTTPRequestHandler):
    """A hub endpoint that knows no repository (answers every request 404 at once)."""

    def _404(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _404

    def log_message(self, *args):
        pass
