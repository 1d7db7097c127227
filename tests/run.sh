#!/usr/bin/env bash
# Install what the tests need, then run them.
#
#   bash tests/run.sh            everything: unit, integration, browser, soak and fuzz (what CI runs)
#   bash tests/run.sh --quick    the everyday suite: no browser, soak or fuzz tests
#   bash tests/run.sh -- ARGS    extra arguments for pytest (e.g. -- -k websocket)
#
# Debian packages (chromium for the browser tests, nginx-light, wrk, golang-go,
# golang-golang-x-net-dev and nghttp2-client for the benchmark smoke runs, iproute2 for ss, curl, openssl) are installed with apt-get where missing; Python packages
# go into .venv from the project's `test` extra.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --) shift; extra=("$@"); break ;;
    *) extra+=("$1") ;;
  esac
  shift
done

missing=()
# curl drives the proxy by name in tests/test_names_cli.py (the quick suite too).
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "$quick" = 0 ]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || missing+=(nginx-light)
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  # The benchmark's Go peer (bench/goproxy, tests/test_bench_smoke.py).
  { command -v go >/dev/null 2>&1 || [ -x /usr/lib/go/bin/go ]; } || missing+=(golang-go)
  # The HTTP/2 benchmark (bench/h2.py, tests/test_bench_h2_smoke.py): its Go peer and upstream
  # build against Debian's golang.org/x/net (GOPATH mode, nothing fetched), and h2load drives it.
  [ -d /usr/share/gocode/src/golang.org/x/net/http2 ] || missing+=(golang-golang-x-net-dev)
  command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
  # openssl rehash builds the SSL_CERT_DIR of tests/test_https_upstream.py.
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  # ss reads the main listener's accept queue (tests/test_server_backlog.py).
  { command -v ss >/dev/null 2>&1 || [ -x /usr/sbin/ss ] || [ -x /bin/ss ]; } || missing+=(iproute2)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "tests/run.sh: installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "tests/run.sh: not Debian; the tests that need ${missing[*]} will be skipped (they fail when CI=true)" >&2
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

if [ "$quick" = 1 ]; then
  exec .venv/bin/python -m pytest -m "not soak and not browser" "${extra[@]}"
fi
exec .venv/bin/python -m pytest "${extra[@]}"
