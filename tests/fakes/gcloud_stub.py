"""A stub ``gcloud`` executable backed by the fake Google's ``/mint``.

Supported, with gcloud 528's behaviour and messages:

- ``gcloud auth print-identity-token [ACCOUNT] [--audiences=A]
  [--impersonate-service-account=SA] [--include-email]``: prints a JWT.
  Without ``--audiences`` the ``aud`` is gcloud's OAuth client id
  (``32555940559.apps.googleusercontent.com``).  As in real gcloud,
  ``--audiences`` needs a service-account (or impersonated) credential: for a
  user account the stub fails with "Invalid account type for `--audiences`".
- ``gcloud auth print-access-token``: an access token (cloud-platform scope)
  from the fake Google's ``/mint-access``, for the active account.
- ``gcloud config get-value account``.

"Logged out" (a file ``not-logged-in`` in the stub's directory, or
``FAKE_GCLOUD_LOGGED_OUT=1``): print-identity-token exits 1 with gcloud's
"You do not currently have an active account selected" message; get-value
prints ``(unset)`` on stderr.  Every invocation appends its argv as a JSON line
to ``gcloud-calls.jsonl`` beside the script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .google import DEFAULT_USER_EMAIL, GCLOUD_CLIENT_ID

LOGGED_OUT_FILE = "not-logged-in"
CALLS_FILE = "gcloud-calls.jsonl"

_SCRIPT = r'''#!{python}
# Test stub for gcloud, written by tests/fakes/gcloud_stub.py. Never reaches Google.
import json, os, sys, urllib.error, urllib.parse, urllib.request

FAKE_GOOGLE = {fake_google!r}
ACCOUNT = {account!r}
CLIENT_ID = {client_id!r}
HERE = os.path.dirname(os.path.abspath(__file__))

NO_ACCOUNT = """You do not currently have an active account selected.
Please run:

  $ gcloud auth login

to obtain new credentials.

If you have already logged in with a different account, run:

  $ gcloud config set account ACCOUNT

to select an already authenticated account to use."""


def fail(command, message, code=1):
    sys.stderr.write("ERROR: ({{}}) {{}}\n".format(command, message))
    sys.exit(code)


def logged_out():
    return os.environ.get("FAKE_GCLOUD_LOGGED_OUT") == "1" or os.path.exists(
        os.path.join(HERE, {logged_out_file!r})
    )


def print_identity_token(args):
    command = "gcloud.auth.print-identity-token"
    audiences = impersonate = None
    include_email = False
    account = None
    for arg in args:
        if arg.startswith("--audiences="):
            audiences = arg.split("=", 1)[1]
        elif arg.startswith("--impersonate-service-account="):
            impersonate = arg.split("=", 1)[1]
        elif arg == "--include-email":
            include_email = True
        elif arg.startswith("--"):
            fail(command, "unrecognized arguments: " + arg, 2)
        else:
            account = arg
    if logged_out():
        fail(command, NO_ACCOUNT)
    account = account or ACCOUNT
    email = impersonate or account
    is_service_account = email.endswith(".gserviceaccount.com")
    if audiences and not is_service_account:
        fail(command, "Invalid account type for `--audiences`. Requires valid service account.")
    if include_email and not impersonate:
        fail(command, "Invalid account type for `--include-email`. "
                      "Requires an impersonate service account.")
    query = {{"audience": audiences or CLIENT_ID, "email": email}}
    if impersonate and not include_email:
        query["include_email"] = "0"
    if not is_service_account:
        query["azp"] = CLIENT_ID
    url = FAKE_GOOGLE + "/mint?" + urllib.parse.urlencode(query)
    # No proxies: the fake Google is on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
    try:
        with opener.open(url, timeout=10) as response:
            token = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        fail(command, "There was a problem refreshing your current auth tokens: {{}}".format(exc))
    print(token)


def print_access_token(args):
    command = "gcloud.auth.print-access-token"
    if args:
        fail(command, "unrecognized arguments: " + " ".join(args), 2)
    if logged_out():
        fail(command, NO_ACCOUNT)
    url = FAKE_GOOGLE + "/mint-access?" + urllib.parse.urlencode({{"email": ACCOUNT}})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
    try:
        with opener.open(url, timeout=10) as response:
            print(response.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        fail(command, "There was a problem refreshing your current auth tokens: {{}}".format(exc))


def main(argv):
    with open(os.path.join(HERE, {calls_file!r}), "a") as log:
        log.write(json.dumps(argv) + "\n")
    if argv[:2] == ["auth", "print-identity-token"]:
        print_identity_token(argv[2:])
    elif argv[:2] == ["auth", "print-access-token"]:
        print_access_token(argv[2:])
    elif argv[:3] == ["config", "get-value", "account"]:
        if logged_out():
            sys.stderr.write("(unset)\n")
        else:
            print(ACCOUNT)
    else:
        fail("gcloud", "the test stub does not implement: " + " ".join(argv), 2)


main(sys.argv[1:])
'''


def install_gcloud_stub(
    dir: str | Path,
    fake_google_url: str,
    account: str = DEFAULT_USER_EMAIL,
    python: str = sys.executable,
) -> Path:
    """Write an executable ``gcloud`` into ``dir``; returns its path."""
    directory = Path(dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gcloud"
    path.write_text(
        _SCRIPT.format(
            python=python,
            fake_google=fake_google_url,
            account=account,
            client_id=GCLOUD_CLIENT_ID,
            logged_out_file=LOGGED_OUT_FILE,
            calls_file=CALLS_FILE,
        )
    )
    path.chmod(0o755)
    return path


class GcloudStub:
    """Handle on an installed stub: switch login state, read its invocations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dir = path.parent

    def log_out(self) -> None:
        """Make the stub behave like gcloud with no active account."""
        (self.dir / LOGGED_OUT_FILE).touch()

    def log_in(self) -> None:
        (self.dir / LOGGED_OUT_FILE).unlink(missing_ok=True)

    def invocations(self) -> list[list[str]]:
        """argv (without ``gcloud``) of every run so far."""
        calls = self.dir / CALLS_FILE
        if not calls.exists():
            return []
        return [json.loads(line) for line in calls.read_text().splitlines() if line]
