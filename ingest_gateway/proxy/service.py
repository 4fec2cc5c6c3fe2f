"""The proxy's request path: authenticate, attribute, reserve, forward, meter, settle, record.

One ``Proxy`` per gateway process (owned by the app's lifespan): the upstream aiohttp session (a
bounded connection pool), the stored provider keys, the hard-budget ledger and the recorder.
``ProxyFrontDoor`` serves ``/proxy/...`` as a plain ASGI handler in front of FastAPI's stack (as
``POST /v1/events`` is, see ingest.py): routing, middleware and request wrappers cost more CPU
than the proxy's own work on a small call. Bodies and responses pass through byte for byte, with
three exceptions, all documented in docs/proxy.md: the auth header in stored-key mode,
``stream_options.include_usage`` added to OpenAI streams that did not ask for it (its extra chunk
is then dropped before the client), and ``accept-encoding: identity`` towards the upstream (the
proxy reads usage from the bytes).

Why aiohttp and not httpx as the upstream client: per proxied call httpx/httpcore cost about a
third of the gateway's CPU (pool scans, anyio wrappers, header models); aiohttp's client hands
back raw header tuples and reads the body straight off its protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ingest_gateway import logic
from ingest_gateway.budget_view import BudgetView
from ingest_gateway.proxy import costs
from ingest_gateway.proxy.errors import ProxyError, budget_exceeded, forbidden, invalid, unauthenticated, unavailable
from ingest_gateway.proxy.keys import ProviderKeyCache
from ingest_gateway.proxy.metrics import ProxyMetrics
from ingest_gateway.proxy.recorder import Recorder
from ingest_gateway.proxy.usage import (
    ANTHROPIC,
    HEAD_BYTES,
    OPENAI,
    TAIL_BYTES,
    CallRequest,
    SseSplitter,
    StreamMeter,
    extract_body,
    extract_head_tail,
    flavour,
    read_request,
)
from spendstream import asgi, keys
from spendstream.budgets import Attribution
from spendstream.budgets.reservations import Denial, Ledger, Reservation
from spendstream.pricing import Catalog
from spendstream.settings import Settings

log = logging.getLogger(__name__)

PROVIDERS = (OPENAI, ANTHROPIC)
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
#: request headers never forwarded: hop-by-hop (RFC 9110), ours, and what the client sets itself
_DROP_REQUEST = frozenset({
    b"host", b"content-length", b"connection", b"keep-alive", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"accept-encoding", b"x-spendstream-key",
})  # fmt: skip
_DROP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})  # fmt: skip
_SPENDSTREAM = b"x-spendstream-"
ATTRIBUTION_HEADERS = {
    "x-spendstream-project": ("project", logic.MAX_ID_LEN),
    "x-spendstream-agent": ("agent", logic.MAX_ID_LEN),
    "x-spendstream-user": ("user", logic.MAX_ATTRIBUTION_LEN),
    "x-spendstream-session": ("session_id", logic.MAX_ATTRIBUTION_LEN),
}
_READY_WAIT_S = 2.0
#: what aiohttp would add on its own when the caller did not send it: the caller's request goes as sent
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_IDENTITY = ("accept-encoding", "identity")
#: the upstream read errors that mean "the response was cut" (timeouts included)
_CUT = (aiohttp.ClientError, asyncio.TimeoutError)


@dataclass
class Call:
    """One proxied call, from its request to its recorded event."""

    request_id: str
    provider: str
    tenant: str
    ctx: logic.RequestContext
    started: float
    attribution: dict[str, Any]
    operation: str
    api_flavour: str | None
    request: CallRequest
    reservation: Reservation | None = None
    status: int = 0
    model: str | None = None
    tokens: dict[str, int] | None = None
    ok: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_tags(value: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> tags (the header's bounds are the event's)."""
    tags: dict[str, str] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key:
            raise ValueError(f"each tag must be key=value, got {part.strip()[:64]!r}")
        if len(key) > logic.MAX_TAG_KEY_LEN or len(val) > logic.MAX_TAG_VALUE_LEN:
            raise ValueError(
                f"tag keys are at most {logic.MAX_TAG_KEY_LEN}, values {logic.MAX_TAG_VALUE_LEN} characters"
            )
        tags[key] = val
    if len(tags) > logic.MAX_TAGS:
        raise ValueError(f"at most {logic.MAX_TAGS} tags")
    return tags


def _read_headers(raw: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """One pass over a request's headers: all of them by name (the last of a repeated one), and
    those that may go upstream, in order (auth headers included: ``_open`` replaces them)."""
    headers: dict[str, str] = {}
    forwarded: list[tuple[str, str]] = []
    for k, v in raw:
        name, value = k.decode("latin-1"), v.decode("latin-1")
        headers[name] = value
        if k not in _DROP_REQUEST and not k.startswith(_SPENDSTREAM):
            forwarded.append((name, value))
    return headers, forwarded


def route(path: str) -> tuple[str, str] | None:
    """``/proxy/<provider>/v1/<rest>`` -> (provider, rest), else None (FastAPI answers: 404)."""
    if not path.startswith("/proxy/"):
        return None
    provider, sep, rest = path[7:].partition("/v1/")
    if not sep or "/" in provider:
        return None
    return provider, rest


class ProxyFrontDoor:
    """``/proxy/<provider>/v1/...`` served before FastAPI's stack; every other path goes on to it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in METHODS:
            found = route(scope["path"])
            if found is not None:
                proxy: Proxy | None = getattr(scope["app"].state, "proxy", None)
                if proxy is not None:
                    await proxy.serve(scope, receive, send, found[0])
                    return
        await self.app(scope, receive, send)


class ProxyCall(Response):
    """What the documented FastAPI routes return: the same proxy, served from the route."""

    def __init__(self, proxy: Any, provider: str):
        self.proxy, self.provider = proxy, provider
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.proxy.serve(scope, receive, send, self.provider)


def _upstream_path(scope: Scope) -> str:
    """The path after ``/v1/`` as the client sent it (still percent-encoded), with its query."""
    raw = scope.get("raw_path")
    # (without its query: some ASGI clients, httpx's among them, put it in raw_path too)
    path = raw.decode("latin-1").partition("?")[0] if raw else scope["path"]
    rest = path.split("/v1/", 1)[1] if "/v1/" in path else ""
    query = scope.get("query_string")
    return f"{rest}?{query.decode('latin-1')}" if query else rest


class Proxy:
    def __init__(
        self,
        settings: Settings,
        key_store: keys.KeyStore,
        budget_view: BudgetView,
        provider_keys: ProviderKeyCache,
        recorder: Recorder,
        catalog: Catalog,
        metrics: ProxyMetrics,
    ):
        self.settings = settings
        cfg = settings.proxy
        self._cfg = cfg
        self._keys = key_store
        self._budgets = budget_view
        self.provider_keys = provider_keys
        self.recorder = recorder
        self._catalog = catalog
        self.metrics = metrics
        self._tenant_calls: dict[str, int] = {}
        # labelled once: a labels() lookup per call costs more than the increment
        self._calls = {(p, status): metrics.calls.labels(p, status) for p in PROVIDERS for status in ("ok", "error")}
        self.ledger = Ledger(cfg.replicas, int(cfg.settled_hold_s * 1000), int(cfg.reservation_ttl_s * 1000))
        self._bases = {OPENAI: cfg.openai_base_url.rstrip("/"), ANTHROPIC: cfg.anthropic_base_url.rstrip("/") + "/v1"}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.max_connections, limit_per_host=0, ttl_dns_cache=60),
            # connect: waiting for a pooled connection and opening one; sock_read: the longest
            # silence between two reads (a stream's chunks); no total: streams last what they last
            timeout=aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s),
            auto_decompress=False,  # bytes as sent (the proxy asks for identity anyway)
            cookie_jar=aiohttp.DummyCookieJar(),  # an upstream's cookies never reach another caller
            skip_auto_headers=_NO_AUTO_HEADERS,
            trust_env=False,
            raise_for_status=False,
        )

    async def close(self) -> None:
        await self.session.close()

    # -- the request ---------------------------------------------------------------------------
    async def serve(self, scope: Scope, receive: Receive, send: Send, provider: str) -> None:
        """One proxied call, answered on ``send``: the upstream's response forwarded as it arrives,
        or the proxy's refusal in the provider's error shape."""
        request_id = logic.uuid7(time.time_ns() // 1_000_000)
        if provider not in PROVIDERS:
            error = ProxyError(404, "not_found", f"unknown provider {provider!r}; use openai or anthropic")
            await error.response(OPENAI, request_id)(scope, receive, send)
            return
        tenant_calls = self._tenant_calls
        tenant: str | None = None
        try:
            headers, forwarded = _read_headers(scope["headers"])
            principal, auth, default_project = await self._authenticate(headers, provider)
            tenant = principal.tenant
            held = tenant_calls.get(tenant, 0)
            if held >= self._cfg.max_calls_per_tenant:
                tenant = None
                raise ProxyError(
                    429, "rate_limit_exceeded", f"{held} calls of this tenant are in flight through this gateway; "
                    "retry shortly", retry_after_s=1,
                )  # fmt: skip
            tenant_calls[tenant] = held + 1
            call, upstream = await self._open(scope, receive, headers, forwarded, provider, request_id, principal,
                                              auth, default_project)  # fmt: skip
        except ProxyError as exc:
            if tenant is not None:
                self._release_tenant(tenant)
            self.metrics.refused.labels(provider, str(exc.status)).inc()
            await exc.response(provider, request_id)(scope, receive, send)
            return
        except asgi.ClientGone:  # hung up before its request was read: nobody to answer
            if tenant is not None:
                self._release_tenant(tenant)
            return
        except BaseException:
            if tenant is not None:  # a call that gets no upstream response is counted until here
                self._release_tenant(tenant)
            raise
        try:
            await Forwarding(self, call, upstream).run(receive, send)
        finally:
            self._release_tenant(principal.tenant)

    def _release_tenant(self, tenant: str) -> None:
        held = self._tenant_calls[tenant] - 1
        if held:
            self._tenant_calls[tenant] = held
        else:
            del self._tenant_calls[tenant]

    async def _authenticate(self, headers: dict[str, str], provider: str) -> tuple[keys.Principal, dict[str, str], str]:
        """The caller's principal, the upstream auth headers to replace (an empty value drops the
        header; none: pass the caller's) and the stored key's default project."""
        own = headers.get("x-spendstream-key")
        try:
            if own is not None:  # passthrough: the caller's provider key goes upstream untouched
                principal = await keys.authenticate(self._keys, None, own, ("ingest",))
                # ...unless a Spendstream key sits in the provider's headers too: never sent upstream
                leaked = [h for h in _AUTH_HEADERS if _is_spendstream_key(headers.get(h), own)]
                return principal, dict.fromkeys(leaked, ""), ""
            principal = await keys.authenticate(
                self._keys, headers.get("authorization"), headers.get("x-api-key"), ("ingest",)
            )
        except keys.AuthError as exc:
            hint = (
                " (send your Spendstream API key as the SDK's API key, or your own provider key with the "
                "Spendstream key in X-Spendstream-Key)"
            )
            if exc.status == 401:
                raise unauthenticated(provider, exc.message + hint) from None
            raise forbidden(provider, exc.message) from None
        stored = await self.provider_keys.find(principal.tenant, provider, headers.get("x-spendstream-provider-key"))
        if stored is None:
            raise unauthenticated(
                provider,
                f"no stored {provider} key for this tenant (POST /v1/provider-keys on the query API), "
                "or send your own provider key with the Spendstream key in X-Spendstream-Key",
            )
        # both auth headers are replaced: the caller's (holding the Spendstream key) never go upstream
        if provider == OPENAI:
            auth = {"authorization": f"Bearer {stored.api_key}", "x-api-key": ""}
        else:
            auth = {"x-api-key": stored.api_key, "authorization": ""}
        return principal, auth, stored.project

    def _attribution(
        self, headers: dict[str, str], call: CallRequest, default_project: str, provider: str
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for header, (name, limit) in ATTRIBUTION_HEADERS.items():
            value = headers.get(header)
            if value is None:
                continue
            value = value.strip()
            if not value or len(value) > limit:
                raise invalid(provider, header, f"must be 1 to {limit} characters")
            out[name] = value
        if "user" not in out and call.user:
            out["user"] = call.user[: logic.MAX_ATTRIBUTION_LEN]
        tags = headers.get("x-spendstream-tags")
        if tags is not None:
            try:
                out["tags"] = parse_tags(tags)
            except ValueError as exc:
                raise invalid(provider, "x-spendstream-tags", str(exc)) from None
        out.setdefault("project", default_project or "default")
        out.setdefault("agent", "default")
        return out

    async def _open(
        self, scope: Scope, receive: Receive, headers: dict[str, str], forwarded: list[tuple[str, str]],
        provider: str, request_id: str, principal: keys.Principal, auth: dict[str, str], default_project: str,
    ) -> tuple[Call, aiohttp.ClientResponse]:  # fmt: skip
        """Read and check the request, reserve, send it upstream: the call and the upstream's
        response (its headers read, its body not yet)."""
        started = time.perf_counter()
        cfg = self._cfg
        method = scope["method"]
        path = scope["path"].split("/v1/", 1)[1]
        if "." in path and any(part in (".", "..") for part in path.split("/")):
            raise invalid(provider, "path", "dot segments are not forwarded")
        try:
            body = await asgi.read_body(receive, headers.get("content-length"), cfg.max_request_body_bytes)
        except asgi.BodyTooLarge as exc:
            raise invalid(provider, "body", str(exc), status=413) from None
        call_req = read_request(provider, path, body) if method == "POST" else CallRequest()
        api_flavour, operation = flavour(provider, path)
        call = Call(
            request_id, provider, principal.tenant, logic.RequestContext.now(), started,
            self._attribution(headers, call_req, default_project, provider), operation, api_flavour, call_req,
        )  # fmt: skip
        if method == "POST":
            call.reservation = await self._reserve(call, len(body))
        if auth:  # the auth headers replaced (an empty value: the header is dropped)
            forwarded = [(k, v) for k, v in forwarded if k not in auth]
            forwarded += [(k, v) for k, v in auth.items() if v]
        forwarded.append(_IDENTITY)
        url = f"{self._bases[provider]}/{_upstream_path(scope)}"
        data = call_req.rewritten or body
        try:
            upstream = await self.session.request(
                method, url, headers=forwarded, data=data if data or method != "GET" else None, allow_redirects=False
            )
        except _CUT as exc:
            self._finish(call)
            status, kind = (504, "timeout") if isinstance(exc, asyncio.TimeoutError) else (502, "upstream_error")
            self.metrics.upstream_failures.labels(provider).inc()
            raise ProxyError(
                status, kind, f"the upstream {provider} API could not be reached: {type(exc).__name__}"
            ) from None
        except BaseException:
            self._finish(call)  # cancelled (the server shuts down): settled and recorded all the same
            raise
        call.status = upstream.status
        return call, upstream

    # -- hard budgets ----------------------------------------------------------------------------
    async def _reserve(self, call: Call, body_bytes: int) -> Reservation | None:
        view = self._budgets
        # fail closed while the view is loading (after a start): budgets first, then, for a tenant
        # that has some, their spend from budget.state
        deadline = time.monotonic() + _READY_WAIT_S
        while not view.budgets_loaded and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not view.budgets_loaded:
            raise unavailable("budgets are still being loaded; retry shortly")
        if not view.index.has_tenant(call.tenant):
            return None  # no budget of this tenant at all
        while not view.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not view.ready:
            raise unavailable("budget spend is still being loaded; retry shortly")
        model = call.request.model
        provider, norm_model = logic.normalise_names(call.provider, model or "")
        a = call.attribution
        attr = Attribution(a["project"], a["agent"], a.get("user", ""), provider or "", norm_model, a.get("tags") or {})
        now_ms = time.time_ns() // 1_000_000
        _, standings = view.check(call.tenant, attr, 0, now_ms)
        enforced = [s for s in standings if s.budget.enforce]
        if not enforced:
            return None
        estimate = None
        if model:
            out = costs.output_bound(
                call.provider, norm_model, call.request.max_output_tokens, self.settings.proxy.uncapped_output_tokens
            )
            estimate = costs.max_cost_nanos(
                self._catalog, call.provider, norm_model, body_bytes, out, call.ctx.received_at_str
            )
        if estimate is None:
            self.metrics.denied.labels(call.provider).inc()
            names = ", ".join(f"'{s.budget.name}' ({s.budget.id})" for s in enforced)
            raise budget_exceeded(
                f"Hard budget {names} applies to this call, but its cost cannot be bounded: "
                + (f"model {model!r} has no price in the catalog." if model else "the request names no model.")
            )
        result = self.ledger.reserve(enforced, estimate, now_ms)
        if isinstance(result, Denial):
            self.metrics.denied.labels(call.provider).inc()
            raise budget_exceeded(result.message())
        return result

    # -- the end of a call ---------------------------------------------------------------------
    def _finish(self, call: Call) -> None:
        """Settle the reservation and record the event (never raises: runs in finally blocks)."""
        try:
            latency_ms = int((time.perf_counter() - call.started) * 1000)
            model = call.model or call.request.model or "unknown"
            event: dict[str, Any] = {
                "event_id": call.request_id,
                "timestamp": call.ctx.received_at_str,
                **call.attribution,
                "operation": call.operation,
                "provider": call.provider,
                "model": model[: logic.MAX_MODEL_LEN],
                **(call.tokens or {"input_tokens": 0, "output_tokens": 0}),
                "latency_ms": min(latency_ms, logic.MAX_LATENCY_MS),
                "status": "ok" if call.ok else "error",
            }
            # the contract's own checks, from the dict (validate_event's JSON round trip costs more)
            validated = logic.validate_objects([event], call.ctx)
            normalised = next(iter(validated.by_project.values()))[0] if validated.by_project else None
            if call.reservation is not None:
                now_ms = time.time_ns() // 1_000_000
                if call.tokens is not None and normalised is not None:
                    cost = costs.cost_nanos(self._catalog, msgspec.to_builtins(normalised))
                    self.ledger.settle(call.reservation, call.reservation.amount if cost is None else cost, now_ms)
                elif 200 <= call.status < 300:
                    # answered, usage unknown (a stream cut before its usage): assume the most
                    self.ledger.settle(call.reservation, call.reservation.amount, now_ms)
                else:
                    self.ledger.release(call.reservation)
            self._calls[call.provider, event["status"]].inc()
            if normalised is None:
                errors = validated.rejected[0]["errors"] if validated.rejected else []
                log.error("proxy call %s made an invalid event (%s); not recorded", call.request_id, errors)
                self.metrics.invalid_events.inc()
                return
            self.recorder.record(call.tenant, call.ctx.received_at_str, normalised)
        except Exception:
            log.exception("proxy call %s: recording failed", call.request_id)


_AUTH_HEADERS = frozenset({"authorization", "x-api-key"})


def _is_spendstream_key(value: str | None, own: str) -> bool:
    if not value:
        return False
    credential = value.partition(" ")[2].strip() if value.lower().startswith("bearer ") else value.strip()
    return credential == own.strip() or keys.key_id_of(credential) is not None


class Forwarding:
    """The upstream response forwarded as it arrives; usage read on the way; the call finished
    (settled, recorded) however the forwarding ends: complete, upstream cut, client gone."""

    __slots__ = ("proxy", "call", "upstream", "sse", "raw_headers")

    def __init__(self, proxy: Proxy, call: Call, upstream: aiohttp.ClientResponse):
        self.proxy = proxy
        self.call = call
        self.upstream = upstream
        sse = False
        raw: list[tuple[bytes, bytes]] = []
        for k, v in upstream.raw_headers:
            k = k.lower()
            if k == b"content-type" and v.startswith(b"text/event-stream"):
                sse = True
            if k not in _DROP_RESPONSE:
                raw.append((k, v))
        if sse:
            raw = [(k, v) for k, v in raw if k != b"content-length"]
        raw.append((b"x-spendstream-request-id", call.request_id.encode()))
        self.sse = sse
        self.raw_headers = raw

    async def run(self, receive: Receive, send: Send) -> None:
        """Forward; for a stream, stop forwarding (closing the upstream connection, so the
        provider stops generating) as soon as the client hangs up. A whole body follows its
        headers at once: it is forwarded without watching (a hang-up shows as a failed send)."""
        if not self.sse:
            await self._forward(send)
            return
        # the forwarding runs in this task, from its first byte on (no task to start first); a
        # watcher task cancels it when the client hangs up
        task = asyncio.current_task()
        assert task is not None
        forwarding = True
        hung_up = False

        def on_watch_done(watch: asyncio.Task[None]) -> None:
            nonlocal hung_up
            if not watch.cancelled():
                watch.exception()  # retrieved: whatever ended the watch, the forwarding stops
            if forwarding and not watch.cancelled():
                hung_up = True
                task.cancel()  # the client is gone: the event says error, with the usage so far

        watch = asyncio.ensure_future(_disconnected(receive))
        watch.add_done_callback(on_watch_done)
        try:
            # its own finally (close upstream, settle, record) runs to its end; UpstreamCut
            # propagates: the server aborts the client's connection
            await self._forward(send)
        except asyncio.CancelledError:
            if not hung_up or task.uncancel() > 0:
                raise  # cancelled from outside (the server shuts down)
        finally:
            forwarding = False
            watch.cancel()

    async def _forward(self, send: Send) -> None:
        call, upstream, cfg = self.call, self.upstream, self.proxy._cfg
        ok_status = 200 <= upstream.status < 300
        meter = StreamMeter(call.provider, call.api_flavour, call.request.drop_usage_chunk) if self.sse else None
        splitter = SseSplitter(cfg.max_sse_event_bytes) if self.sse else None
        kept: list[bytes] = []
        kept_bytes = 0
        head = tail = b""
        complete = False
        cut: BaseException | None = None
        try:
            await send({"type": "http.response.start", "status": upstream.status, "headers": self.raw_headers})
            content = upstream.content
            ended = False
            while chunk := await content.readany():
                if splitter is not None and meter is not None and ok_status:
                    out = [raw for raw, parse in splitter.feed(chunk) if not parse or meter.event(raw)]
                    if not out:
                        continue
                    chunk = out[0] if len(out) == 1 else b"".join(out)
                else:
                    kept_bytes += len(chunk)
                    if kept_bytes <= cfg.max_usage_body_bytes:
                        kept.append(chunk)
                    else:  # too large to keep whole: its first and last bytes only
                        if kept:
                            joined = b"".join(kept)
                            head, tail, kept = joined[:HEAD_BYTES], joined[-TAIL_BYTES:], []
                        tail = (tail + chunk)[-TAIL_BYTES:]
                # the upstream's last bytes (a whole body usually comes with its headers): the
                # response ends with them, not with one more, empty, message
                ended = splitter is None and content.is_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                if ended:
                    break
            if not ended:
                if splitter is not None:
                    rest = splitter.flush()
                    if rest:
                        await send({"type": "http.response.body", "body": rest, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
        except _CUT as exc:
            # the upstream cut the response: so is the client's (the server aborts the connection,
            # the client sees a truncated body, as it would calling the provider directly)
            cut = exc
        except OSError as exc:  # the client went away: the event says error, with the usage so far
            log.info("proxy call %s: client gone: %r", call.request_id, exc)
        finally:
            if complete:
                upstream.release()  # the connection goes back to the pool
            else:
                upstream.close()  # closed: the provider stops generating
            if meter is not None:
                call.model, call.tokens = meter.model, meter.usage()
                call.ok = complete and ok_status and (meter.completed or call.tokens is not None)
            else:
                call.ok = complete and ok_status
                if ok_status:
                    if kept_bytes <= cfg.max_usage_body_bytes:
                        found = extract_body(
                            call.provider, call.api_flavour, kept[0] if len(kept) == 1 else b"".join(kept)
                        )
                    else:
                        found = extract_head_tail(call.provider, call.api_flavour, head, tail)
                    if found is not None:
                        call.model, call.tokens = found
            self.proxy._finish(call)
        if cut is not None:
            raise UpstreamCut(f"the upstream ended the response early: {cut!r}") from cut


async def _disconnected(receive: Receive) -> None:
    """Returns when the client hangs up (the request body was read before: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class UpstreamCut(Exception):
    """Raised after a cut upstream response was forwarded so far and recorded: the ASGI server
    then aborts the client's connection instead of ending the response as if it were whole."""
