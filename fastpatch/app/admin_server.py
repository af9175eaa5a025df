"""A standalone HTTP server for patch governance: the admin API, Prometheus metrics, and (optionally) a small
generation endpoint that serves a Hugging Face model through :class:`fastpatch.lifecycle.Serving`.

Standard library only (``http.server.ThreadingHTTPServer``: one thread per connection, so concurrent
generation requests run together on one model). Every route needs a bearer token
(``Authorization: Bearer <token>``); tokens map to an actor and a role:

- ``read``  : GET routes and ``POST /v1/generate``
- ``admin`` : everything, including changes; every change is audited with the token's actor.

No token or an unknown one → 401; a read token on a change → 403. Errors are JSON ``{"error": ...}``:
400 bad input (bad semver, bad name, policy violation, bad patch file, unknown label, a body shorter than
its ``Content-Length`` or a malformed ``Content-Length``), 404 unknown set or version, 408 a declared body
that did not arrive within ``read_timeout`` seconds, 409 conflict (version exists / not newer), 411 a chunked
body (send a ``Content-Length``), 413 body too large, 503 a version
this server cannot serve (its patch file is missing or corrupted; never served unpatched). A request is
executed only once its whole body has arrived; every socket read waits at most ``read_timeout`` seconds
(default 10), so a silent client never holds a server thread for long (an idle keep-alive connection is
closed after that time too).

Routes (``{name}`` is a patch set):

    GET  /v1/sets                         names
    GET  /v1/sets/{name}                  policy, rollout, versions with status
    GET  /v1/audit?name=&since=           audit entries
    GET  /v1/alerts?name=                 alerts
    GET  /metrics                         Prometheus text
    POST /v1/sets/{name}                  {"policy": {...}}: create the set or replace its policy
    POST /v1/sets/{name}/versions         {"version", "patches": {patch: base64 .safetensors}, "expires_at", "note"}
    POST /v1/sets/{name}/activate         {"version"}
    POST /v1/sets/{name}/rollout          {"version", "percent"} | {"arms": {arm: [version, weight]}}
    POST /v1/sets/{name}/promote          {"arm": optional}
    POST /v1/sets/{name}/abort|pause|resume|rollback
    POST /v1/sets/{name}/expire           {"version", "at": optional UNIX seconds}
    POST /v1/sets/{name}/guard            {"action": "pause"|"abort"|"rollback"|null, "bands": {metric: [lo, hi]}}
    POST /v1/report                       {"patch_set", "version", "arm", "metric", "value"} (admin)
    POST /v1/generate                     {"patch_set", "key", "labels", "patch", "input_ids" | "prompt",
                                           "max_new_tokens", "return_logits"} → output + "served";
                                           header X-Fastpatch-Version: set@version (arm)
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlparse

import torch

from ..files.patch_file import PatchFileError
from ..lifecycle.governance import Choice, Governance, check_name
from ..lifecycle.policy import PolicyViolation
from ..lifecycle.serving import Unavailable
from ..lifecycle.store import Conflict
from ..lifecycle.telemetry import prometheus

ROLES = ("read", "admin")
MAX_BODY = 96 << 20
READ_TIMEOUT_S = 10.0


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def load_tokens(path) -> dict:
    """``{"tokens": {"<secret>": {"actor": "alice", "role": "admin"}}}`` from a JSON file."""
    data = json.loads(Path(path).read_text())
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, dict) or not tokens:
        raise ValueError(f"{path}: expected {{'tokens': {{secret: {{'actor': ..., 'role': 'read'|'admin'}}}}}}")
    for secret, who in tokens.items():
        if len(secret) < 16 or not isinstance(who, dict) or who.get("role") not in ROLES or not who.get("actor"):
            raise ValueError(f"{path}: each token needs >= 16 characters, an actor and a role in {ROLES}")
    return tokens


class AdminServer:
    """``AdminServer(gov, tokens, serving=None, tokenizer=None).start()`` → (host, port); ``stop()``.

    ``read_timeout``: seconds any one read from a client socket may wait (request line, headers, body)
    before the request is dropped (408 when a declared body stops arriving) and the connection closed."""

    def __init__(self, gov: Governance, tokens: dict, *, serving=None, tokenizer=None,
                 max_body: int = MAX_BODY, read_timeout: float = READ_TIMEOUT_S):
        self.gov, self.tokens, self.serving, self.tokenizer = gov, dict(tokens), serving, tokenizer
        self.max_body = int(max_body)
        if not (isinstance(read_timeout, (int, float)) and 0 < read_timeout < float("inf")):
            raise ValueError(f"read_timeout must be a positive number of seconds, got {read_timeout!r}")
        self.read_timeout = float(read_timeout)
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifetime -------------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple:
        server = self

        class Handler(_Handler):
            app = server
            timeout = server.read_timeout  # StreamRequestHandler.setup: socket timeout of every read

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self._httpd.server_address[:2]

    def serve_forever(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.start(host, port)
        self.join()

    def join(self) -> None:
        """Wait until the server stops (after :meth:`start`)."""
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- auth -----------------------------------------------------------------------------------
    def who(self, header: Optional[str]) -> dict:
        if not header or not header.startswith("Bearer "):
            raise HTTPError(401, "missing bearer token (Authorization: Bearer <token>)")
        given = header[len("Bearer "):].strip()
        for secret, who in self.tokens.items():
            if hmac.compare_digest(secret.encode(), given.encode()):
                return who
        raise HTTPError(401, "unknown token")

    # -- routes ---------------------------------------------------------------------------------
    def get(self, path: str, query: dict, who: dict):
        parts = [unquote(p) for p in path.strip("/").split("/")]
        q = {k: v[0] for k, v in query.items()}
        if parts == ["v1", "sets"]:
            return {"sets": self.gov.sets()}
        if len(parts) == 3 and parts[:2] == ["v1", "sets"]:
            return self.gov.show(check_name(parts[2]))
        if parts == ["v1", "audit"]:
            return {"audit": self.gov.audit(q.get("name"), since=int(q.get("since", 0)))}
        if parts == ["v1", "alerts"]:
            return {"alerts": self.gov.alerts(q.get("name"))}
        if parts == ["metrics"]:
            if self.serving is not None:
                self.serving.flush()
            return prometheus(self.gov.store.telemetry(), alerts=len(self.gov.alerts()),
                              generation=self.gov.store.generation(),
                              active=self.serving.active() if self.serving is not None else None,
                              unavailable=self.serving.unavailable() if self.serving is not None else None)
        raise HTTPError(404, f"no route GET {path}")

    def post(self, path: str, body: dict, who: dict):
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts == ["v1", "generate"]:
            return self.generate(body)
        if who["role"] != "admin":
            raise HTTPError(403, f"token of {who['actor']!r} is read-only")
        actor = who["actor"]
        if parts == ["v1", "report"]:
            choice = Choice(_str(body, "patch_set"), body.get("version"), _str(body, "arm"), None)
            value = body.get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"value must be a number, got {value!r}")
            return {"alert": self.gov.observe(choice, _str(body, "metric"), float(value))}
        if len(parts) < 3 or parts[:2] != ["v1", "sets"]:
            raise HTTPError(404, f"no route POST {path}")
        name = check_name(parts[2])
        op = parts[3] if len(parts) == 4 else None
        if len(parts) > 4:
            raise HTTPError(404, f"no route POST {path}")
        if op is None:
            if self.gov.store.get_set(name) is None:
                self.gov.create_set(name, policy=body.get("policy"), actor=actor)
            else:
                self.gov.set_policy(name, body.get("policy") or {}, actor=actor)
            return self.gov.show(name)
        if op == "versions":
            return self._publish(name, body, actor)
        if op == "activate":
            return self.gov.activate(name, _str(body, "version"), actor=actor)
        if op == "rollout":
            if "arms" in body:
                arms = body["arms"]
                if not isinstance(arms, dict) or not all(isinstance(v, list) and len(v) == 2 for v in arms.values()):
                    raise ValueError("arms: {arm name: [version, weight percent]}")
                return self.gov.experiment(name, {a: (v[0], v[1]) for a, v in arms.items()}, actor=actor)
            return self.gov.canary(name, _str(body, "version"), body.get("percent"), actor=actor)
        if op == "promote":
            return self.gov.promote(name, body.get("arm"), actor=actor)
        if op in ("abort", "pause", "rollback"):
            return getattr(self.gov, op)(name, actor=actor, reason=body.get("reason"))
        if op == "resume":
            return self.gov.resume(name, actor=actor)
        if op == "expire":
            return self.gov.expire(name, _str(body, "version"), at=body.get("at"), actor=actor)
        if op == "guard":
            return self.gov.set_guard(name, body.get("action"), bands=body.get("bands"), actor=actor)
        raise HTTPError(404, f"no route POST {path}")

    def _publish(self, name: str, body: dict, actor: str):
        patches = body.get("patches")
        if not isinstance(patches, dict) or not patches:
            raise ValueError("patches: {patch name: base64 of a fastpatch .safetensors file}")
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for pname, b64 in patches.items():
                check_name(pname, "patch name")
                if not isinstance(b64, str):
                    raise ValueError(f"{pname}: the file must be base64 text")
                try:
                    data = base64.b64decode(b64, validate=True)
                except binascii.Error:
                    raise ValueError(f"{pname}: not valid base64") from None
                if len(data) > self.gov.max_patch_bytes:
                    raise ValueError(f"{pname}: {len(data)} bytes, over the limit of {self.gov.max_patch_bytes}")
                paths[pname] = Path(tmp) / f"{pname}.safetensors"
                paths[pname].write_bytes(data)
            rec = self.gov.publish(name, _str(body, "version"), paths, expires_at=body.get("expires_at"),
                                   note=body.get("note"), actor=actor)
        return rec

    def generate(self, body: dict):
        if self.serving is None:
            raise HTTPError(404, "this server has no model (start it with serving=...)")
        model = self.serving.model
        name = _str(body, "patch_set")
        max_new = body.get("max_new_tokens", 16)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= 512:
            raise ValueError("max_new_tokens must be an integer in 1..512")
        if "input_ids" in body:
            ids = body["input_ids"]
            vocab = model.config.vocab_size
            if not isinstance(ids, list) or not ids or len(ids) > 4096 or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
                raise ValueError(f"input_ids must be a non-empty list of token ids in 0..{vocab - 1}")
            input_ids = torch.tensor([ids])
        elif "prompt" in body and self.tokenizer is not None:
            input_ids = self.tokenizer(_str(body, "prompt"), return_tensors="pt").input_ids
        else:
            raise ValueError("give input_ids (or prompt, when the server has a tokenizer)")
        with self.serving.request(name, key=body.get("key"), labels=body.get("labels"),
                                  patch=body.get("patch")) as served:
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                                     return_dict_in_generate=True, output_logits=bool(body.get("return_logits")))
            new = out.sequences[0, input_ids.shape[1]:]
            served.add_rows(input_ids.shape[1] + len(new) - 1)  # the last token is sampled, never run
        c = served.choice
        resp = {"output_ids": new.tolist(),
                "served": {"patch_set": c.name, "version": c.version, "arm": c.arm, "patch": c.patch,
                           "reason": c.reason, "generation": served.generation}}
        if self.tokenizer is not None:
            resp["text"] = self.tokenizer.decode(new, skip_special_tokens=True)
        if body.get("return_logits"):
            resp["logits"] = [step[0].tolist() for step in out.logits]
        return resp


def handle(app: AdminServer, method: str, path: str, query: dict, authorization: Optional[str],
           read_body) -> tuple:
    """One admin request → (status, payload, headers): the token's role, the route, and every error mapped to
    its status. Shared by this server and the vLLM bridge's routes (fastpatch.app.vllm_governed), so both
    have the same tokens, roles, audit and errors. ``read_body()`` returns the raw body (read after the token
    is checked; it may raise HTTPError)."""
    try:
        who = app.who(authorization)
        if method == "GET":
            result = app.get(path, query, who)
        else:
            raw = read_body()
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise HTTPError(400, "body is not valid JSON") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "body must be a JSON object")
            result = app.post(path, body, who)
        headers = {}
        if isinstance(result, dict) and "served" in result:
            s = result["served"]
            headers["X-Fastpatch-Version"] = f"{s['patch_set']}@{s['version'] or 'none'} ({s['arm']})"
        return 200, result, headers
    except HTTPError as exc:
        return exc.status, {"error": str(exc)}, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    except Conflict as exc:
        return 409, {"error": str(exc)}, None
    except Unavailable as exc:
        return 503, {"error": str(exc)}, None
    except KeyError as exc:
        return 404, {"error": exc.args[0] if exc.args else str(exc)}, None
    except (ValueError, TypeError, PatchFileError, PolicyViolation) as exc:
        return 400, {"error": str(exc)}, None
    except Exception as exc:  # a server bug: report it, keep serving
        return 500, {"error": f"{type(exc).__name__}: {exc}"}, None


def _str(body: dict, key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v:
        raise ValueError(f"{key!r} must be a non-empty string, got {v!r}")
    return v


class _Handler(BaseHTTPRequestHandler):
    app: AdminServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: the audit log is the record
        pass

    def _send(self, status: int, payload, headers: Optional[dict] = None) -> None:
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain; version=0.0.4; charset=utf-8"
        else:
            data, ctype = json.dumps(payload, allow_nan=False, default=str).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        close_after = self.close_connection  # as parse_request set it from the version and Connection header
        if method == "POST" or self.headers.get("Content-Length") not in (None, "0") \
                or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # until the whole body is read: unread bytes must not become a request

        def read_body() -> bytes:
            raw = self._body()
            self.close_connection = close_after
            return raw

        self._send(*handle(self.app, method, url.path, parse_qs(url.query), self.headers.get("Authorization"),
                           read_body))

    def _body(self) -> bytes:
        """The whole declared body, or an HTTPError: nothing is executed on a partial body."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "send the body with a Content-Length (chunked transfer encoding is not accepted)")
        try:
            n = int(length) if length is not None else 0
        except ValueError:
            n = -1
        if n < 0:
            raise HTTPError(400, f"Content-Length must be a whole number of bytes, got {length!r}")
        if n > self.app.max_body:
            raise HTTPError(413, f"body of {n} bytes is over the limit of {self.app.max_body}")
        if n == 0:
            return b"{}"
        chunks, got = [], 0
        try:
            while got < n:
                chunk = self.rfile.read1(n - got)
                if not chunk:
                    break  # the client closed its side
                chunks.append(chunk)
                got += len(chunk)
        except TimeoutError:
            raise HTTPError(408, f"the body stopped arriving: {got} of the {n} bytes of Content-Length came "
                                 f"within {self.app.read_timeout:g} s; nothing was done, send the whole body") from None
        if got < n:
            raise HTTPError(400, f"truncated body: {got} of the {n} bytes of Content-Length arrived before the "
                                 "client closed the connection; nothing was done, send the whole body")
        return b"".join(chunks)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")
