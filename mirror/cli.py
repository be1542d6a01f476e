"""The `mirror` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from mirror import __version__
from mirror.app import create_app
from mirror.config import Overrides, load
from mirror.errors import ConfigError

DESCRIPTION = """\
A pull-through caching mirror for Docker/OCI registries. Point the Docker daemon
(registry-mirrors), containerd (hosts.toml), CRI-O/podman (registries.conf) or skopeo at it;
it serves what it has cached and fetches the rest from the upstream registries once."""

SERVE_EPILOG = """\
Settings come from defaults < the YAML file (--config or $MIRROR_CONFIG) < environment
($MIRROR_LISTEN, $MIRROR_CACHE_DIR, $MIRROR_UPSTREAMS="NAME=URL ...", $MIRROR_DEFAULT_UPSTREAM,
$MIRROR_LOG_LEVEL) < these flags. With no file and no flags, docker.io means Docker Hub.

Clients name the upstream per request: containerd's ?ns=<registry>, or the registry as the
first path segment (/v2/ghcr.io/owner/repo/...). Bare names (/v2/library/nginx/...) go to the
default upstream, where a one-segment name means library/<name> as on Docker Hub.

examples:
  mirror serve
  mirror serve --listen 127.0.0.1:5000 --cache-dir /var/cache/mirror
  mirror serve --upstream docker.io=http://127.0.0.1:5001 --upstream ghcr.io=https://ghcr.io"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the mirror", description="Run the mirror.",
                                epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--cache-dir", metavar="DIR", help="where cached content lives (default ./mirror-cache)")
    serve.add_argument("--upstream", action="append", default=[], metavar="[NAME=]URL",
                       help="add an upstream registry, or change the URL of a configured one; NAME is the "
                            "registry host clients use (default: the URL's host). Repeatable.")
    serve.add_argument("--default-upstream", metavar="NAME",
                       help="the upstream for names without a registry (default docker.io)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = Overrides(listen=args.listen, cache_dir=args.cache_dir, upstreams=tuple(args.upstream),
                          default_upstream=args.default_upstream, log_level=args.log_level)
    try:
        config = load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"mirror: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("mirror")
    for upstream in config.upstreams:
        log.info("upstream %s -> %s%s", upstream.name, upstream.url,
                 " (default)" if upstream.name == config.default_upstream else "")
    # Said once the socket is bound and start-up (cache sweep, index) is done: scripts wait for it.
    web.run_app(create_app(config), host=config.host, port=config.port,
                print=lambda _: log.info("listening on http://%s:%d", config.host, config.port))
    return 0
