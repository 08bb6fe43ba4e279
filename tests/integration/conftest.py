"""Fixtures for the end-to-end tests of the proxy (see proxy_rig.py).

* ``proxy`` (function): ``await proxy(emulator_or_env, warm=True, **overrides)``
  starts lakeproxy in-process in front of an :class:`Emulator` (its ``env()``)
  or an explicit environment, with ``overrides`` on top; every proxy started is
  drained and closed after the test. With ``LAKEPROXY_TEST_POOL_MODE=session``
  in the test run's environment every proxy starts with session reuse on (to
  run the real-client suites against it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Protocol

import pytest_asyncio

from lakeproxy.emulator import Emulator

from .proxy_rig import Proxy, start_proxy, stop_proxy


class ProxyFactory(Protocol):
    def __call__(
        self, source: Emulator | Mapping[str, str], /, *, warm: bool = ..., **overrides: str
    ) -> Awaitable[Proxy]: ...


@pytest_asyncio.fixture(loop_scope="session")
async def proxy() -> AsyncIterator[ProxyFactory]:
    started: list[Proxy] = []

    async def make(
        source: Emulator | Mapping[str, str], /, *, warm: bool = True, **overrides: str
    ) -> Proxy:
        base = source.env() if isinstance(source, Emulator) else dict(source)
        mode = os.environ.get("LAKEPROXY_TEST_POOL_MODE")
        if mode:
            base["LAKEPROXY_POOL_MODE"] = mode
        p = await start_proxy({**base, **overrides}, warm=warm)
        started.append(p)
        return p

    try:
        yield make
    finally:
        for p in reversed(started):
            await stop_proxy(p)
