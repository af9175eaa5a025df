"""Admin endpoints on vLLM's OpenAI server: load, replace and unload patches at run time, behind a token.

A ``vllm.endpoint_plugins`` entry point (vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them,
e.g. ``VLLM_PLUGINS=fastpatch,fastpatch_admin``). The token comes from the server's environment
(``FASTPATCH_ADMIN_TOKEN``); without it every admin route answers 403. The patch file travels in the request
body and is written to a private folder of the server: no route ever takes a file path, and ordinary
requests can only name a patch that is already loaded.

- ``GET    /fastpatch/patches``         -> {"patches": {name: slot}}
- ``PUT    /fastpatch/patches/{name}``  body: the patch file's bytes -> {"name", "slot"} (load or replace)
- ``DELETE /fastpatch/patches/{name}``  -> {"name", "slot"}

The workers need ``--worker-extension-cls fastpatch.integrations.vllm.WorkerExtension`` and the engine
``spare_slots`` (and ``sites`` / ``max_rank``) for new names.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations at run time,
# and `Request` is imported inside attach_router (fastapi is a vLLM dependency, not fastpatch's).
import hmac
import os
import tempfile
import uuid

TOKEN_ENV = "FASTPATCH_ADMIN_TOKEN"
MAX_BYTES = 256 << 20


class AdminEndpoints:
    name = "fastpatch_admin"
    required_tasks = ("generate",)

    def __init__(self):
        self.engine = None
        self.folder = None

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, HTTPException, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        def authorise(request: Request) -> None:
            token = os.environ.get(TOKEN_ENV)
            if not token:
                raise HTTPException(403, f"fastpatch admin endpoints are off: start the server with {TOKEN_ENV} set")
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise HTTPException(401, "fastpatch admin: missing or wrong bearer token")

        def front():
            from .frontend import front_of

            f = front_of(self.engine.input_processor) if self.engine is not None else None
            if f is None:
                raise HTTPException(409, "fastpatch is not active in this engine (no 'fastpatch' additional_config)")
            return f

        def ungoverned(f):
            if f.governed is not None:  # one admin surface: the store's Governance decides what the slots hold
                raise HTTPException(409, "this engine serves governed patch sets: change them through the "
                                         "governance routes (/fastpatch/v1/...), not by loading files into slots")

        async def rpc(method, *args):
            try:
                return (await self.engine.collective_rpc(method, args=args))[0]
            except Exception as exc:  # the worker's message (slots full, rank, site, fingerprint, bad file)
                raise HTTPException(400, f"fastpatch: {exc}") from None

        @router.get("/fastpatch/patches")
        async def list_patches(request: Request):
            authorise(request)
            front()
            return JSONResponse({"patches": await rpc("fastpatch_slots")})

        @router.put("/fastpatch/patches/{name}")
        async def put_patch(name: str, request: Request):
            authorise(request)
            f = front()
            ungoverned(f)
            from .config import FastpatchConfigError, check_name

            try:
                check_name(name)
            except FastpatchConfigError as exc:
                raise HTTPException(400, str(exc)) from None
            body = await request.body()
            if not body or len(body) > MAX_BYTES:
                raise HTTPException(400, f"fastpatch: the body must be a patch file of 1..{MAX_BYTES} bytes")
            if self.folder is None:
                self.folder = tempfile.mkdtemp(prefix="fastpatch_admin_")
            suffix = ".gguf" if body[:4] == b"GGUF" else ".safetensors"
            path = os.path.join(self.folder, f"{uuid.uuid4().hex}{suffix}")
            with open(path, "wb") as out:
                out.write(body)
            slot = await rpc("fastpatch_load", name, path)
            f.loaded(name, path)
            return JSONResponse({"name": name, "slot": slot})

        @router.delete("/fastpatch/patches/{name}")
        async def delete_patch(name: str, request: Request):
            authorise(request)
            f = front()
            ungoverned(f)
            f.unloaded(name)
            slot = await rpc("fastpatch_unload", name)
            return JSONResponse({"name": name, "slot": slot})

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        self.engine = engine_client


def endpoint_plugin() -> AdminEndpoints:
    """The ``vllm.endpoint_plugins`` entry point."""
    return AdminEndpoints()
