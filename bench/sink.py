"""A tiny upload sink for the benchmark: reads a request body to the end and says how many bytes came.

    python bench/sink.py PORT [--uvloop]

POST (or PUT) any path: the body is read in full and discarded, and the reply
is ``200`` with the byte count as text, so the benchmark can check that a 1 GiB
upload arrived intact. nginx cannot take a large POST to a static file, hence
this helper. It listens on 127.0.0.1 only and prints ``ready`` once it does.

With ``--uvloop`` it runs on uvloop, as the proxy does: the benchmark's
reference for a bare aiohttp server on the proxy's own stack (idle memory, and
cost growth with many connections). For that, ``GET /NNNb`` answers NNN bytes.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


async def sink(request: web.Request) -> web.Response:
    size = request.path[1:-1]
    if request.method == "GET" and request.path.endswith("b") and size.isdigit():
        return web.Response(body=b"x" * int(size))
    seen = 0
    async for chunk in request.content.iter_any():
        seen += len(chunk)
    return web.Response(text=str(seen))


async def main(port: int) -> None:
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", sink)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()  # as the proxy (many-connection runs)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        if "--uvloop" in sys.argv[2:]:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main(int(sys.argv[1])))
        else:
            asyncio.run(main(int(sys.argv[1])))
    except KeyboardInterrupt:
        pass
