"""The explorer's web app (Starlette): one page and a small JSON API, every request checked.

- Every route needs the access token: ``?token=`` on the page's URL, then the page sends it as
  ``Authorization: Bearer``; else 401. It is compared in constant time.
- Bodies over ``MAX_BODY_BYTES`` are refused (413) before they are read in full; malformed JSON,
  unknown fields, unknown lenses and over-long prompts get a 4xx and one line
  (``explore.parse_request``). No route reads or writes a path a client names.
- Requests go to the one ``LensWorker``: a full queue answers 429, a request superseded by the
  same client's newer one 409. Any other failure answers 500 with one line; the traceback goes
  to the server's log, never to the client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from layers_core.serve.explore import BadRequest, LensRequest
from layers_core.serve.worker import LensWorker, QueueFull, Superseded

MAX_BODY_BYTES = 256 * 1024
CLIENT_ID_CHARS = 64
NO_TOKEN = "a valid token is needed: open the URL the server printed"
log = logging.getLogger("layers_core.serve")


@dataclass
class Explorer:
    """What the app serves: the ``worker`` owning the model (it computes ``(kind, request)``,
    kind ``lens`` or ``zip``), the ``parse`` of a JSON body (raises ``BadRequest``), the
    ``token`` (None: none asked, loopback only), the page's HTML and the server's ``info``
    (model, lenses, limits)."""

    worker: LensWorker
    parse: Callable[[Any], LensRequest]
    token: str | None
    page: str
    info: dict


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _authorised(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.query_params.get("token", "")
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


async def _json_body(request: Request) -> Any:
    """The body as JSON, read at most ``MAX_BODY_BYTES`` (``BadRequest`` 413 past it, 400 if not
    JSON)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise BadRequest(f"the body is over {MAX_BODY_BYTES // 1024} KB", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(f"the body is over {MAX_BODY_BYTES // 1024} KB", 413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the body is not JSON", 400) from None


def create_app(explorer: Explorer) -> Starlette:
    """The Starlette app of ``explorer`` (see the module doc for what every route promises)."""

    async def submit(request: Request, kind: str) -> Any:
        body = await _json_body(request)
        parsed = explorer.parse(body)
        client = str(body.get("client") or (request.client.host if request.client else "anonymous"))
        future = explorer.worker.submit(f"{kind}:{client[:CLIENT_ID_CHARS]}", (kind, parsed))
        return await asyncio.wrap_future(future)

    async def guarded(request: Request, kind: str, respond: Callable[[Any], Response]) -> Response:
        if not _authorised(request, explorer.token):
            return _error(NO_TOKEN, 401)
        try:
            return respond(await submit(request, kind))
        except BadRequest as error:
            return _error(str(error), error.status)
        except QueueFull:
            return _error("busy: the queue is full, try again in a moment", 429)
        except Superseded:
            return _error("superseded by a newer request from the same client", 409)
        except ValueError as error:  # the lens refuses this input (e.g. a prompt it cannot score)
            return _error(str(error).splitlines()[0][:300] or "the lens refused this input", 422)
        except Exception:
            log.exception("request failed")
            return _error("the lens failed on this input (the server's log has the details)", 500)

    async def lens(request: Request) -> Response:
        return await guarded(request, "lens", lambda data: JSONResponse(data))

    async def download(request: Request) -> Response:
        return await guarded(request, "zip", lambda blob: Response(
            blob, media_type="application/zip",
            headers={"content-disposition": 'attachment; filename="layers-and-logits.zip"'}))

    async def page(request: Request) -> Response:
        if not _authorised(request, explorer.token):
            return HTMLResponse("<!DOCTYPE html><p>401: open the URL the server printed (with its token).</p>",
                                status_code=401)
        return HTMLResponse(explorer.page, headers={"cache-control": "no-store", "referrer-policy": "no-referrer"})

    async def info(request: Request) -> Response:
        if not _authorised(request, explorer.token):
            return _error(NO_TOKEN, 401)
        return JSONResponse({**explorer.info, "waiting": explorer.worker.waiting})

    async def any_error(request: Request, error: Exception) -> Response:
        log.exception("unhandled error")
        return _error("internal error (the server's log has the details)", 500)

    routes = [Route("/", page), Route("/api/info", info), Route("/api/lens", lens, methods=["POST"]),
              Route("/api/download", download, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={Exception: any_error})
