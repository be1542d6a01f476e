"""Tag-list paging: `n` and `last` reach the upstream, and its next-page link is rewritten to
the mirror's own path, keeping containerd's `ns`. (Debian's distribution 2.8 does not page tag
lists, so a small upstream that does stands in for it.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import MirrorFactory

TAGS = ["a", "b", "c", "d", "e"]


@pytest.fixture
async def paging_upstream() -> AsyncIterator[str]:
    async def tags(request: web.Request) -> web.Response:
        n = int(request.query.get("n", len(TAGS)))
        after = TAGS.index(request.query["last"]) + 1 if "last" in request.query else 0
        page = TAGS[after:after + n]
        headers = {}
        if after + n < len(TAGS):
            headers["Link"] = f'</v2/team/app/tags/list?last={page[-1]}&n={n}>; rel="next"'
        return web.json_response({"name": "team/app", "tags": page}, headers=headers)

    app = web.Application()
    app.router.add_get("/v2/team/app/tags/list", tags)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_paging_follows_the_mirror(make_mirror: MirrorFactory, paging_upstream: str,
                                         client: aiohttp.ClientSession) -> None:
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9", "registry.test": paging_upstream})
    url: str | None = f"{mirror.url}/v2/team/app/tags/list?n=2&ns=registry.test"
    seen: list[str] = []
    links: list[str] = []
    while url is not None:
        async with client.get(url) as response:
            assert response.status == 200
            seen += (await response.json())["tags"]
            link = response.headers.get("Link")
        url = None
        if link:
            links.append(link)
            url = mirror.url + link.split(";")[0].strip("<>")
    assert seen == TAGS
    assert links[0] == '</v2/team/app/tags/list?last=b&n=2&ns=registry.test>; rel="next"'
