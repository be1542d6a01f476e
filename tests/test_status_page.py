"""The status page in a real browser (Debian's headless Chromium), served by `mirror serve` on its
metrics listener, behind a login: a download seen moving while it runs, the hit ratio after pulls,
an image pinned with its button and seen pinned through the API."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import aiohttp
import yaml

from tests.support.browser import Browser, open_browser
from tests.support.fake_upstream import FakeUpstream
from tests.support.pulls import ACCEPT, CACHE, add_image
from tests.support.registry import free_port
from tests.support.served import Served
from tests.test_console import USERS, write_htpasswd

MiB = 1 << 20
REGISTRY = "registry.test"


def shows(selector: str, text: str) -> Callable[[Browser], bool]:
    return lambda browser: browser.text(selector) == text


async def test_the_page_shows_a_download_moving_the_hit_ratio_and_pins_with_its_button(
        fake: FakeUpstream, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    image = add_image(fake, "team/big", "v1", [random.Random(7).randbytes(4 * MiB)])
    layer = image.layers[0]
    stops = [(MiB, asyncio.Event()), (2 * MiB, asyncio.Event())]
    fake.stages[layer] = stops
    metrics_port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "cache_dir": str(tmp_path / "cache"), "metrics_listen": f"127.0.0.1:{metrics_port}",
        "default_upstream": REGISTRY, "upstreams": [{"name": REGISTRY, "url": fake.url}],
        "auth": {"htpasswd": str(write_htpasswd(tmp_path / "htpasswd")),
                 "access": [{"who": ["user:alice"], "allow": ["*"], "permissions": ["pull", "admin"]}]}}))
    alice = {"Authorization": aiohttp.encode_basic_auth("alice", USERS["alice"])}
    page = f"http://127.0.0.1:{metrics_port}/status"

    async with await Served.start("--config", config) as mirror:
        base = f"{mirror.url}/v2/{REGISTRY}/team/big"

        async def pull(path: str, headers: dict[str, str] | None = None) -> str:
            async with client.get(f"{base}/{path}", headers={**alice, **(headers or {})}) as response:
                assert response.status == 200
                await response.read()
                return response.headers[CACHE]

        assert await pull("manifests/v1", {"Accept": ACCEPT}) == "MISS"
        download = asyncio.create_task(pull(f"blobs/{layer}"))
        with open_browser(tmp_path) as browser:
            await asyncio.to_thread(browser.get, page, user="alice", password=USERS["alice"])
            progress = f'#downloads-rows tr[data-digest="{layer}"] .progress'
            for (offset, event), shown in zip(stops, ("1.0 MiB of 4.0 MiB", "2.0 MiB of 4.0 MiB"), strict=True):
                await asyncio.to_thread(browser.wait_for, shows(progress, shown), 20,
                                        message=f"the download at {offset}")
                row = await asyncio.to_thread(browser.text, f'#downloads-rows tr[data-digest="{layer}"]')
                assert f"{REGISTRY}/team/big" in row and layer[7:19] in row
                event.set()
            assert await download == "MISS"
            await asyncio.to_thread(browser.wait_for, shows("#downloads-rows", "nothing downloading"),
                                    20, message="the finished download dropping off")

            # Two hits after two misses: half the requests came from the cache.
            assert await pull("manifests/v1", {"Accept": ACCEPT}) == "HIT"
            assert await pull(f"blobs/{layer}") == "HIT"
            await asyncio.to_thread(browser.wait_for, shows("#hit-ratio-requests", "50.0%"), 20,
                                    message="the hit ratio")
            async with client.get(f"{mirror.url}/api/v1/effectiveness", headers=alice) as response:
                assert (await response.json())["total"]["last_hour"]["hit_ratio"] == 0.5
            assert "ok" in await asyncio.to_thread(browser.text, f'#upstreams-rows tr[data-upstream="{REGISTRY}"]')
            assert "alice" in await asyncio.to_thread(browser.text, "#viewer")

            # Pin it with its button; the API then says it is pinned, and so does the page.
            row = f'#images-rows tr[data-image="{REGISTRY}/team/big:v1"]'
            await asyncio.to_thread(browser.wait_for, shows(f"{row} button.pin", "pin"), 20,
                                    message="the image with its pin button")
            await asyncio.to_thread(browser.click, f"{row} button.pin")
            await asyncio.to_thread(browser.wait_for, shows(f"{row} td.pinned", "pinned"), 20,
                                    message="the image shown pinned")
            async with client.get(f"{mirror.url}/api/v1/images", headers=alice) as response:
                assert [(i["name"], i["pinned"]) for i in await response.json()] == [("team/big", True)]

            shot = await asyncio.to_thread(browser.screenshot, tmp_path / "status.png")
            assert shot.stat().st_size > 10_000
            assert await asyncio.to_thread(browser.console_errors) == []
