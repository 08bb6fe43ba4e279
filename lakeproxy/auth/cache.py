"""Refresh-ahead cache of the workspace token and the database credential.

Each credential lives in a :class:`_Slot`:

* it is refreshed in the background once half of its lifetime (expiry minus
  the time the response arrived) has passed, so callers almost never wait;
* one with less than a tenth of its lifetime left is never handed out;
* callers arriving while no usable credential is held share ONE in-flight
  request (single-flight), each waiting no longer than its own deadline;
* retryable failures are retried with exponential backoff and full jitter,
  honouring ``Retry-After``, as long as a waiter's deadline or the current
  credential's expiry leaves room; a final refusal reaches waiters at once;
* a database credential dropped because the endpoint refused it
  (:meth:`CachedCredentials.invalidate`) is minted again at most once every
  :data:`MIN_REMINT_INTERVAL` seconds, whatever clients do: a re-mint asked
  for sooner waits for the interval (single-flight, so one wait for all).

Metrics hooks are plain callables so this module imports no metrics library:
``on_request(kind, result)`` once per API request, with ``kind`` one of
``"oauth"``, ``"database"``, ``"endpoint"`` and ``result`` one of ``"ok"``,
``"error"`` (retryable) and ``"refused"`` (final); ``on_credential(kind,
expires_wall)`` whenever a new credential is cached; ``on_remint_limited(kind,
seconds)`` whenever a re-mint waits ``seconds`` for the minimum interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, TypeVar

from lakeproxy.auth.backoff import backoff_delays
from lakeproxy.auth.databricks import HINT_UNREACHABLE, DatabricksApi
from lakeproxy.auth.provider import Credential
from lakeproxy.auth.status import TargetStatus
from lakeproxy.errors import CredentialError
from lakeproxy.wire import sqlstate

log = logging.getLogger(__name__)

T = TypeVar("T")

RequestObserver = Callable[[str, str], None]
CredentialObserver = Callable[[str, float], None]
RemintObserver = Callable[[str, float], None]

KIND_OAUTH: Final = "oauth"
KIND_DATABASE: Final = "database"
KIND_ENDPOINT: Final = "endpoint"
KIND_IDENTITY: Final = "identity"
RESULT_OK: Final = "ok"
RESULT_ERROR: Final = "error"
RESULT_REFUSED: Final = "refused"

#: A background refresh that was refused (e.g. the secret was revoked) is
#: retried this often while the current credential lasts.
_REFUSED_RETRY_DELAY: Final = 10.0

#: Least seconds between two mints of the database credential when the second
#: one replaces a credential the endpoint refused (SPEC: "never minted more
#: often than once every few seconds per endpoint, whatever clients do").
MIN_REMINT_INTERVAL: Final = 3.0

_DESCRIPTION: Final = {
    KIND_OAUTH: "workspace OAuth token",
    KIND_DATABASE: "database credential",
    KIND_ENDPOINT: "endpoint status",
    KIND_IDENTITY: "signed-in identity",
}


class CredentialUnavailable(CredentialError):
    """No credential before the deadline: the API kept failing or did not answer.

    SQLSTATE 08006; ``last_error`` is the last failure seen (None if the only
    attempt was still running).
    """

    last_error: CredentialError | None

    def __init__(self, kind: str, last_error: CredentialError | None) -> None:
        while isinstance(last_error, CredentialUnavailable):
            last_error = last_error.last_error
        what = _DESCRIPTION.get(kind, kind)
        if last_error is None:
            message = f"no {what} before the deadline: the Databricks API did not answer in time"
        else:
            message = f"no {what} before the deadline; last error: {last_error}"
        super().__init__(
            message,
            retryable=True,
            status=last_error.status if last_error else None,
            error_code=last_error.error_code if last_error else None,
            hint=(last_error.hint if last_error else None) or HINT_UNREACHABLE,
            sqlstate=sqlstate.CONNECTION_FAILURE,
        )
        self.last_error = last_error


def _closed_error() -> CredentialError:
    return CredentialError(
        "the credential provider is closed", retryable=False,
        sqlstate=sqlstate.ADMIN_SHUTDOWN,
    )


def _safe_call(hook: Callable[[str, T], None] | None, kind: str, value: T) -> None:
    """Call a metrics hook; a broken hook is logged, never breaks a login."""
    if hook is None:
        return
    try:
        hook(kind, value)
    except Exception:
        log.exception("credential metrics hook failed")


class _Slot:
    """One cached credential with refresh-ahead and single-flight fetching.

    ``fetch(deadline)`` mints a credential or raises CredentialError; it is
    never run twice at once.
    """

    def __init__(
        self,
        kind: str,
        fetch: Callable[[float], Awaitable[Credential]],
        *,
        request_timeout: float,
        backoff: Callable[[], Iterator[float]],
        on_credential: CredentialObserver | None,
        depends_on: _Slot | None = None,
        min_remint_interval: float = 0.0,
        on_remint_limited: RemintObserver | None = None,
    ) -> None:
        self.kind = kind
        self.depends_on = depends_on
        self.current: Credential | None = None
        self.last_error: CredentialError | None = None
        self.last_ok: bool | None = None
        self._fetch = fetch
        self._request_timeout = request_timeout
        self._backoff = backoff
        self._on_credential = on_credential
        self._task: asyncio.Task[Credential] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadlines: list[float] = []  # of callers waiting on _task
        self._closed = False
        self._min_remint_interval = min_remint_interval
        self._on_remint_limited = on_remint_limited
        #: loop time the last credential was stored; whether it was dropped as refused.
        self._stored_at: float | None = None
        self._dropped = False

    async def get(self, deadline: float) -> Credential:
        """A usable credential; see CredentialProvider.get for the contract."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise _closed_error()
            now = loop.time()
            cur = self.current
            if cur is not None and cur.usable(now):
                if now >= cur.refresh_at():
                    self._start()  # e.g. the timer was late; never waits
                return cur
            if now >= deadline:
                raise CredentialUnavailable(self.kind, self._latest_error())
            task = self._start()
            self._deadlines.append(deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    cred = await asyncio.shield(task)
            except CredentialUnavailable:
                raise
            except CredentialError as err:
                if err.retryable:
                    raise CredentialUnavailable(self.kind, err) from None
                raise
            except TimeoutError:
                raise CredentialUnavailable(self.kind, self._latest_error()) from None
            finally:
                self._deadlines.remove(deadline)
            if cred.usable(loop.time()):
                return cred

    def invalidate(self, cred: Credential) -> None:
        """Forget ``cred`` if it is the one held."""
        if self.current is not None and self.current.token == cred.token:
            log.info("%s was refused; dropping it", _DESCRIPTION[self.kind])
            self.current = None
            self._dropped = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    async def close(self) -> None:
        """Cancel the timer and any in-flight request; waiters get a CredentialError."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(CredentialError, asyncio.CancelledError):
                await task

    # -------------------------------------------------------------- internals

    def _start(self) -> asyncio.Task[Credential]:
        """The in-flight refresh, started if none is running."""
        if self._task is None or self._task.done():
            task = asyncio.get_running_loop().create_task(
                self._refresh(), name=f"lakeproxy-credential-{self.kind}"
            )
            task.add_done_callback(_retrieve)
            self._task = task
        return self._task

    def _latest_error(self) -> CredentialError | None:
        """Our last failure, else that of the slot whose credential ours needs."""
        if self.last_error is None and self.depends_on is not None:
            return self.depends_on._latest_error()
        return self.last_error

    def _horizon(self) -> float:
        """How long retrying is worth it: a waiter's deadline or the current expiry."""
        horizon = max(self._deadlines, default=-math.inf)
        if self.current is not None:
            horizon = max(horizon, self.current.expires_at)
        return horizon

    def _remint_wait(self, now: float) -> float:
        """Seconds a re-mint after a refusal must still wait (0: none)."""
        if not self._dropped or self._stored_at is None:
            return 0.0
        return max(0.0, self._stored_at + self._min_remint_interval - now)

    async def _refresh(self) -> Credential:
        loop = asyncio.get_running_loop()
        delays = self._backoff()
        what = _DESCRIPTION[self.kind]
        try:
            wait = self._remint_wait(loop.time())
            if wait > 0:
                log.info("%s refused again %.1fs after it was minted: the next one is minted "
                         "in %.1fs (at most one every %.0fs)", what,
                         self._min_remint_interval - wait, wait, self._min_remint_interval)
                _safe_call(self._on_remint_limited, self.kind, wait)
                await asyncio.sleep(wait)
            while True:
                # Not bounded by the horizon: a waiter joining later (with a
                # later deadline) must not see a nearly done request cut off.
                # Each waiter leaves at its own deadline anyway.
                try:
                    cred = await self._fetch(loop.time() + self._request_timeout)
                except CredentialError as err:
                    self.last_error = err
                    self.last_ok = False
                    background = not self._deadlines
                    if not err.retryable and not background:
                        raise
                    delay = next(delays)
                    if err.retry_after is not None:
                        delay = max(delay, err.retry_after)
                    if not err.retryable:  # a refusal, in the background: ask less often
                        delay = max(delay, _REFUSED_RETRY_DELAY)
                    if loop.time() + delay >= self._horizon():
                        raise
                    log.log(
                        logging.WARNING if background else logging.INFO,
                        "%s request failed (retrying in %.2fs): %s", what, delay, err,
                    )
                    await asyncio.sleep(delay)
                    continue
                self._store(cred)
                return cred
        except asyncio.CancelledError:
            if self._closed:
                raise _closed_error() from None
            raise

    def _store(self, cred: Credential) -> None:
        self.current = cred
        self.last_error = None
        self.last_ok = True
        self._stored_at = asyncio.get_running_loop().time()
        self._dropped = False
        if math.isfinite(cred.expires_wall):
            log.debug(
                "new %s, valid for %.0fs", _DESCRIPTION[self.kind], cred.expires_wall - time.time()
            )
            _safe_call(self._on_credential, self.kind, cred.expires_wall)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        refresh_at = cred.refresh_at()
        if math.isfinite(refresh_at):
            self._timer = asyncio.get_running_loop().call_at(refresh_at, self._on_timer, cred)

    def _on_timer(self, cred: Credential) -> None:
        self._timer = None
        if not self._closed and self.current is cred:
            self._start()


def _retrieve(task: asyncio.Task[Credential] | asyncio.Task[str]) -> None:
    """Mark a refresh's exception as retrieved (waiters, if any, also get it)."""
    if not task.cancelled():
        task.exception()


class CachedCredentials:
    """A :class:`~lakeproxy.auth.provider.CredentialProvider` over :class:`DatabricksApi`.

    Caches both the workspace OAuth token (step 1) and the database credential
    (step 2), each refreshed ahead of expiry. A 401 on step 2 (or on the
    endpoint lookup) refreshes the step-1 token once and retries. Takes
    ownership of ``api``: :meth:`close` closes it.
    """

    def __init__(
        self,
        api: DatabricksApi,
        *,
        on_request: RequestObserver | None = None,
        on_credential: CredentialObserver | None = None,
        on_remint_limited: RemintObserver | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        min_remint_interval: float = MIN_REMINT_INTERVAL,
    ) -> None:
        self._api = api
        self._on_request = on_request

        def backoff() -> Iterator[float]:
            return backoff_delays(backoff_initial, backoff_max)

        self._backoff = backoff
        self._oauth = _Slot(
            KIND_OAUTH, self._fetch_oauth, request_timeout=api.request_timeout,
            backoff=backoff, on_credential=on_credential,
        )
        self._database = _Slot(
            KIND_DATABASE, self._fetch_database, request_timeout=api.request_timeout,
            backoff=backoff, on_credential=on_credential, depends_on=self._oauth,
            min_remint_interval=min_remint_interval, on_remint_limited=on_remint_limited,
        )
        self._hosts: dict[str, str] = {}
        self._identity: asyncio.Task[str] | None = None

    def __repr__(self) -> str:
        return f"CachedCredentials({self._api!r})"

    async def get(self, *, deadline: float) -> Credential:
        """A usable database credential; see CredentialProvider.get.

        Raises CredentialError: 28000 when refused, 08006
        (:class:`CredentialUnavailable`) when none arrived before ``deadline``.
        """
        return await self._database.get(deadline)

    async def workspace_token(self, *, deadline: float) -> Credential:
        """A usable step-1 token (the static token when one is configured).

        Raises CredentialError as :meth:`get` does.
        """
        return await self._oauth.get(deadline)

    def invalidate(self, cred: Credential) -> None:
        """The endpoint refused ``cred``: the next get() returns a newer credential
        (minted no sooner than ``min_remint_interval`` after ``cred``)."""
        self._database.invalidate(cred)

    def ready(self) -> bool:
        """True if a usable database credential is held or the last request succeeded."""
        cur = self._database.current
        if cur is not None and cur.usable(_now()):
            return True
        return self._database.last_ok is True

    @property
    def static(self) -> bool:
        """True when the workspace token is a static one (``pat``)."""
        return self._api.static_token

    @property
    def method(self) -> str:
        """The workspace sign-in method in use (``oauth-m2m``, ``databricks-cli``, ...)."""
        return self._api.method

    async def endpoint_host(
        self, endpoint_name: str | None = None, *, deadline: float
    ) -> str:
        """The endpoint's Postgres host name (looked up once, then remembered).

        ``endpoint_name`` defaults to the configured ENDPOINT_NAME. Retries like
        :meth:`get`; raises CredentialError (08006 :class:`CredentialUnavailable`
        when the API kept failing until ``deadline``).
        """
        name = endpoint_name or self._api.endpoint_name or ""
        if name in self._hosts:
            return self._hosts[name]
        host = await self._retried(
            KIND_ENDPOINT,
            lambda bearer, d: self._api.endpoint_host(bearer, name or None, deadline=d),
            deadline,
        )
        self._hosts[name] = host
        return host

    async def identity(self, *, deadline: float) -> str:
        """The signed-in identity's name (SCIM ``Me`` ``userName``): the role to log
        in as when none is configured. Asked once, then remembered; callers
        arriving meanwhile share the one request.

        Raises CredentialError as :meth:`target_status` does.
        """
        task = self._identity
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            loop = asyncio.get_running_loop()
            # Not bounded by this caller's deadline: a later caller may wait longer.
            task = loop.create_task(
                self._retried(KIND_IDENTITY, lambda bearer, d: self._api.me(bearer, deadline=d),
                              loop.time() + self._api.request_timeout * 3),
                name="lakeproxy-identity",
            )
            task.add_done_callback(_retrieve)
            self._identity = task
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(task)
        except TimeoutError:
            raise CredentialUnavailable(KIND_IDENTITY, None) from None

    async def target_status(self, *, deadline: float) -> TargetStatus:
        """The configured endpoint's or instance's hosts and state, read now
        (never cached here: the caller decides how fresh it must be).

        Retries like :meth:`get`; raises CredentialError (08006
        :class:`CredentialUnavailable` when the API kept failing until ``deadline``).
        """
        return await self._retried(
            KIND_ENDPOINT,
            lambda bearer, d: self._api.target_status(bearer, deadline=d),
            deadline,
        )

    async def _retried(
        self, kind: str, call: Callable[[str, float], Awaitable[T]], deadline: float
    ) -> T:
        """:meth:`_authorized`, with retryable failures retried with backoff until ``deadline``."""
        loop = asyncio.get_running_loop()
        delays = self._backoff()
        while True:
            try:
                return await self._authorized(kind, call, deadline)
            except CredentialError as err:
                if not err.retryable:
                    raise
                delay = next(delays)
                if err.retry_after is not None:
                    delay = max(delay, err.retry_after)
                if loop.time() + delay >= deadline:
                    raise CredentialUnavailable(kind, err) from None
                log.info("%s request failed (retrying in %.2fs): %s",
                         _DESCRIPTION[kind], delay, err)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Stop background refreshes and close the HTTP session."""
        if self._identity is not None and not self._identity.done():
            self._identity.cancel()
        await self._database.close()
        await self._oauth.close()
        await self._api.close()

    # -------------------------------------------------------------- internals

    async def _observed(self, kind: str, call: Awaitable[T]) -> T:
        """Await one API request, reporting its result to ``on_request``."""
        try:
            result = await call
        except CredentialError as err:
            _safe_call(self._on_request, kind, RESULT_ERROR if err.retryable else RESULT_REFUSED)
            raise
        _safe_call(self._on_request, kind, RESULT_OK)
        return result

    async def _fetch_oauth(self, deadline: float) -> Credential:
        if self._api.static_token:
            return await self._api.oauth_token(deadline=deadline)
        return await self._observed(KIND_OAUTH, self._api.oauth_token(deadline=deadline))

    async def _fetch_database(self, deadline: float) -> Credential:
        return await self._authorized(
            KIND_DATABASE,
            lambda bearer, d: self._api.database_credential(bearer, deadline=d),
            deadline,
        )

    async def _authorized(
        self, kind: str, call: Callable[[str, float], Awaitable[T]], deadline: float
    ) -> T:
        """Run ``call(bearer, deadline)`` with the step-1 token.

        A 401 refreshes the token once (unless it is a static token) and retries.
        """
        bearer = await self._oauth.get(deadline)
        try:
            return await self._observed(kind, call(bearer.token, deadline))
        except CredentialError as err:
            if err.status != 401 or self._api.static_token:
                raise
            log.info(
                "workspace token refused by the %s API (HTTP 401); refreshing it once",
                _DESCRIPTION[kind],
            )
        self._oauth.invalidate(bearer)
        bearer = await self._oauth.get(deadline)
        return await self._observed(kind, call(bearer.token, deadline))


def _now() -> float:
    """``loop.time()`` of the running loop (both asyncio and uvloop use the monotonic clock)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()
