"""Shared fixtures and helpers for the identity and token tests (no tests here)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import google.auth.iam as google_iam
import google.oauth2.credentials as google_oauth2_credentials
import pytest


def closed_port() -> str:
    """``127.0.0.1:PORT`` where nothing listens (a metadata server that is not there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def iam(google: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point google-auth's IAM Credentials calls at the fake.

    google-auth has no override for the generateIdToken URL (it formats the
    module constant ``google.auth.iam._IAM_IDTOKEN_ENDPOINT``), so the one
    constant is patched.
    """
    monkeypatch.setattr(google_iam, "_IAM_IDTOKEN_ENDPOINT", google.iam_idtoken_endpoint)
    return google


@pytest.fixture
def user_token_endpoint(google: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point user-login refreshes at the fake token endpoint.

    ``google.oauth2.credentials.Credentials.from_authorized_user_info`` always
    sets Google's token endpoint (the module constant
    ``_GOOGLE_OAUTH2_TOKEN_ENDPOINT``) whatever the file says, and the proxy
    builds its credentials through it: the constant is patched.
    """
    monkeypatch.setattr(google_oauth2_credentials, "_GOOGLE_OAUTH2_TOKEN_ENDPOINT", google.token_uri)
    return google


@pytest.fixture
def no_metadata(clean_env: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """No metadata server: the ping goes to a closed port (refused at once)."""
    dead = closed_port()
    monkeypatch.setenv("GCE_METADATA_IP", dead)
    monkeypatch.setenv("GCE_METADATA_HOST", dead)
    return dead


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def sa_email(name: str) -> str:
    return f"{name}@fake-project.iam.gserviceaccount.com"
