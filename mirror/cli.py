"""The `mirror` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mirror import __version__
from mirror.bundle import BundleError, check_output, export, import_bundle, inventory, read_have
from mirror.config import Config, Overrides, load, parse_size
from mirror.errors import CacheBusy, ConfigError, MirrorError
from mirror.imagelist import ImageSpec, from_arguments, load_list
from mirror.index import CachedImage, Miss
from mirror.logs import configure as configure_logs
from mirror.remote import AdminClient
from mirror.routing import Router, manifest_path
from mirror.seeding import seed
from mirror.services import build_store, cached_listing, evict_now, evicts, misses_listing, pin_image

DESCRIPTION = """\
A pull-through caching mirror for Docker/OCI registries. Point the Docker daemon
(registry-mirrors), containerd (hosts.toml), CRI-O/podman (registries.conf) or skopeo at it;
it serves what it has cached and fetches the rest from the upstream registries once."""

SERVE_EPILOG = """\
Settings come from defaults < the YAML file (--config or $MIRROR_CONFIG) < environment
($MIRROR_LISTEN, $MIRROR_CACHE_DIR, $MIRROR_UPSTREAMS="NAME=URL ...", $MIRROR_DEFAULT_UPSTREAM,
$MIRROR_LOG_LEVEL, $MIRROR_PATH_PREFIX, $MIRROR_MAX_SIZE) < these flags. With no file and
no flags, docker.io means Docker Hub.

Clients name the upstream per request: containerd's ?ns=<registry>, or the registry as the
first path segment (/v2/ghcr.io/owner/repo/...), or as a segment before /v2
(/ghcr.io/v2/owner/repo/...). Bare names (/v2/library/nginx/...) go to the
default upstream, where a one-segment name means library/<name> as on Docker Hub.

examples:
  mirror serve
  mirror serve --listen 127.0.0.1:5000 --cache-dir /var/cache/mirror
  mirror serve --upstream docker.io=http://127.0.0.1:5001 --upstream ghcr.io=https://ghcr.io"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration file")
    common.add_argument("--cache-dir", metavar="DIR", help="where cached content lives (default ./mirror-cache)")
    common.add_argument("--storage", metavar="s3://BUCKET/PREFIX",
                        help="keep blobs in shared object storage; the cache dir is then the local spool")
    common.add_argument("--redis", metavar="URL",
                        help="Redis shared by the replicas on one --storage (redis://HOST:6379/0)")

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", metavar="URL",
                        help="act on a running mirror through its admin API (http://mirror:5000) instead of a "
                             "cache directory")
    remote.add_argument("--token-file", type=Path, metavar="FILE",
                        help="with --server: the mirror's admin token (its admin.token_file; or $MIRROR_TOKEN)")
    remote.add_argument("--user", metavar="NAME",
                        help="with --server: log in as this account, with the password in $MIRROR_PASSWORD")

    serve = commands.add_parser("serve", parents=[common], help="run the mirror", description="Run the mirror.",
                                epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)")
    serve.add_argument("--max-size", metavar="SIZE",
                       help="disk budget for the cache, e.g. 50GiB; least recently used content is evicted "
                            "to stay under it (default: no limit)")
    serve.add_argument("--upstream", action="append", default=[], metavar="[NAME=]URL",
                       help="add an upstream registry, or change the URL of a configured one; NAME is the "
                            "registry host clients use (default: the URL's host). Repeatable.")
    serve.add_argument("--default-upstream", metavar="NAME",
                       help="the upstream for names without a registry (default docker.io)")
    serve.add_argument("--path-prefix", metavar="PATH",
                       help="also serve the API under PATH/v2/ (behind a reverse proxy), e.g. /registry")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", choices=("text", "json"),
                       help="text: access lines in Common Log Format; json: one object per line (default text)")
    serve.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help="serve /metrics, /healthz and /readyz on this address instead of beside the API")
    serve.add_argument("--htpasswd", metavar="FILE",
                       help="require clients to log in with an account from this htpasswd file (bcrypt, htpasswd -B); "
                            "every account may pull everything unless the config's auth.access rules say otherwise")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (chain), PEM")
    serve.add_argument("--tls-key", metavar="FILE", help="the certificate's private key, PEM (not world-readable)")
    serve.add_argument("--shutdown-grace", metavar="DURATION",
                       help="after SIGTERM, how long responses under way may take to finish (default 30s)")
    serve.add_argument("--advertise", metavar="URL",
                       help="how the other replicas reach this one (default: from --listen)")
    serve.add_argument("--admin-token-file", metavar="FILE",
                       help="a file holding the token that may use the admin API (pin, unpin, gc, seed)")
    serve.add_argument("--offline", action="store_true",
                       help="never contact an upstream (an air-gapped site): serve what is cached or imported, "
                            "tags as they are whatever their age, and record the rest as misses ($MIRROR_OFFLINE=1)")

    ls = commands.add_parser("ls", parents=[common, remote], help="list what is cached",
                             description="List the cached tags: repository, tag, digest, size on disk, "
                                         "when last pulled and whether pinned. Safe to run beside a serving "
                                         "mirror (access times lag by up to 10 s), or ask it with --server.")
    ls.add_argument("--json", action="store_true", help="one JSON array, for scripts")

    gc = commands.add_parser("gc", parents=[common, remote], help="evict down to the low watermark now",
                             description="Run eviction now: content past its upstream's max_age goes, then "
                                         "least recently used content until the cache is under "
                                         "eviction.low_watermark x max_size. On a cache directory a serving "
                                         "mirror holds, gc refuses: ask the mirror with --server instead; on a "
                                         "cluster (--storage and --redis) it runs beside the replicas.")
    gc.add_argument("--max-size", metavar="SIZE", help="the disk budget, e.g. 50GiB (default: from the config)")
    gc.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    gc.add_argument("--json", action="store_true", help="one JSON object, for scripts")

    seed = commands.add_parser("seed", parents=[common], help="fill the cache with a list of images, and pin them",
                               description="Fetch every image of a list (and, for an index, the platforms asked "
                                           "for) into the cache, through the same downloads as client traffic, and "
                                           "pin it. Works on the cache directory, so no mirror may be serving it.")
    seed.add_argument("references", nargs="*", metavar="IMAGE", help="images as users write them: nginx:1.27, "
                                                                       "ghcr.io/owner/repo@sha256:...")
    seed.add_argument("-f", "--file", type=Path, metavar="FILE",
                      help="an image list: one reference per line, or YAML with platforms, referrers and tag filters")
    seed.add_argument("--from-misses", action="store_true",
                      help="the references an offline mirror on this cache could not serve (mirror misses)")
    seed.add_argument("--upstream", action="append", default=[], metavar="[NAME=]URL",
                      help="add an upstream registry, or change the URL of a configured one. Repeatable.")
    seed.add_argument("--server", metavar="URL",
                      help="seed a running mirror through its own /v2 API (to pre-warm it before a rollout), "
                           "instead of a cache directory; what it caches this way is not pinned")
    seed.add_argument("--dry-run", action="store_true", help="resolve each reference; fetch no blob, pin nothing")
    seed.add_argument("--json", action="store_true", help="one JSON array of results, for scripts")

    export = commands.add_parser("export", parents=[common], help="write a list of images as a bundle to carry",
                                 description="Write every image of a list (fetching what the cache lacks) as an OCI "
                                             "image layout with a bundle manifest: a directory, one tar (-o FILE.tar), "
                                             "or tar volumes of a fixed size, each with its checksum. A second run "
                                             "writes only what is missing (one .tar is written whole again).")
    export.add_argument("references", nargs="*", metavar="IMAGE", help="images as users write them")
    export.add_argument("-f", "--file", type=Path, metavar="FILE", help="an image list, as for seed")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="PATH",
                        help="a directory, or a file ending in .tar")
    export.add_argument("--volume-size", metavar="SIZE", help="split into tar volumes of at most SIZE (e.g. 4GiB)")
    export.add_argument("--have", type=Path, metavar="FILE",
                        help="the far side's `mirror inventory`: leave out the blobs it already holds")
    export.add_argument("--upstream", action="append", default=[], metavar="[NAME=]URL",
                        help="add an upstream registry, or change the URL of a configured one. Repeatable.")
    export.add_argument("--json", action="store_true", help="print the bundle manifest as JSON")

    load = commands.add_parser("import", parents=[common], help="verify and load a bundle into the cache",
                               description="Verify a bundle (its volumes' checksums, every blob's digest and size) "
                                           "and load it into the cache: blobs, then manifests, then tags, pinned. "
                                           "Takes a bundle directory, a tar, volumes in any order, or an OCI image "
                                           "layout written by another tool. Running it again finishes what is left.")
    load.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    load.add_argument("--name", metavar="REPOSITORY",
                      help="for a plain OCI layout whose annotations name no repository: e.g. docker.io/library/alpine")
    load.add_argument("--json", action="store_true", help="one JSON object, for scripts")

    commands.add_parser("inventory", parents=[common], help="list the digests this cache holds",
                        description="The digests of every blob this cache holds, as JSON, for the other side's "
                                    "`mirror export --have`. Safe to run beside a serving mirror.")

    misses = commands.add_parser("misses", parents=[common], help="what an offline mirror was asked for and lacked",
                                 description="The references an offline mirror could not serve, most asked first, "
                                             "as an image list for `mirror seed -f` on the connected side. Safe to "
                                             "run beside a serving mirror.")
    misses.add_argument("--json", action="store_true", help="one JSON array, for scripts")

    for command, verb in (("pin", "Keep"), ("unpin", "Stop keeping")):
        pin = commands.add_parser(command, parents=[common, remote],
                                  help=f"{verb.lower()} a cached image whatever its age",
                                  description=f"{verb} a cached image (and everything it references) out of "
                                              "reach of eviction. The image must be cached: pull it through "
                                              "the mirror first. Safe to run beside a serving mirror, or ask it "
                                              "with --server.")
        pin.add_argument("reference", metavar="IMAGE",
                         help="as a client names it: alpine:3.19, docker.io/library/alpine:3.19, "
                              "ghcr.io/owner/repo@sha256:...")
        pin.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    return parser


def collect(config: Config, dry_run: bool, as_json: bool) -> int:
    if not evicts(config):
        print("mirror: neither max_size (config or --max-size) nor any upstream's max_age is set: "
              "nothing to evict", file=sys.stderr)
        return 2
    try:
        before, after, evicted = asyncio.run(evict_now(config, dry_run))
    except CacheBusy as exc:
        print(f"mirror: {exc}; a serving mirror evicts by itself (gc --server URL asks it to now)", file=sys.stderr)
        return 1
    _print_gc({"dry_run": dry_run, "usage_before": before, "usage_after": after,
               "evicted": [{"digest": str(e.digest), "size": e.size} for e in evicted]},
              as_json, config.eviction.max_size)
    return 0


def _print_gc(result: dict[str, Any], as_json: bool, budget: int | None = None) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    dry_run = result["dry_run"]
    for entry in result["evicted"]:
        print(f"{'would evict' if dry_run else 'evicted'} {entry['digest']} {_human(entry['size'])}")
    of = f" of {_human(budget)}" if budget else ""
    print(f"{len(result['evicted'])} blobs, {_human(result['usage_before'] - result['usage_after'])}"
          f"{' would be' if dry_run else ''} freed; cache {_human(result['usage_after'])}{of}")


def set_pin(config: Config, reference: str, pinned: bool, as_json: bool) -> int:
    try:
        route = Router(config).resolve(manifest_path(reference))
    except MirrorError as exc:
        print(f"mirror: {exc.message}", file=sys.stderr)
        return 2
    digest = asyncio.run(pin_image(config, route.upstream.name, route.name, str(route.reference), pinned))
    if digest is None:
        print(f"mirror: {route.upstream.name}/{route.name}:{route.reference} is not cached; pull it through "
              "the mirror first", file=sys.stderr)
        return 1
    _print_pin({"upstream": route.upstream.name, "name": route.name, "digest": digest, "pinned": pinned}, as_json)
    return 0


def _print_pin(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{'pinned' if result['pinned'] else 'unpinned'} {result['upstream']}/{result['name']} "
              f"{result['digest']}")


def list_cached(config: Config, as_json: bool) -> int:
    _print_images(asyncio.run(cached_listing(config)), as_json)
    return 0


def _print_images(images: Sequence[CachedImage], as_json: bool) -> None:
    if as_json:
        print(json.dumps([dataclasses.asdict(image) for image in images], indent=2))
        return
    rows = [("REPOSITORY", "TAG", "DIGEST", "SIZE", "BLOBS", "LAST PULLED", "PINNED")]
    rows += [(f"{i.upstream}/{i.name}", i.tag, i.digest[:19], _human(i.size), str(i.blobs), _when(i.last_pulled),
              "yes" if i.pinned else "") for i in images]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def run_remote(args: argparse.Namespace) -> int:
    """ls, pin, unpin or gc on the running mirror at --server, through its admin API."""
    if getattr(args, "max_size", None) is not None:
        print("mirror: --max-size does not go with --server: the mirror evicts to its own budget", file=sys.stderr)
        return 2
    if args.user is not None and args.token_file is not None:
        print("mirror: give --user or --token-file, not both", file=sys.stderr)
        return 2
    token = os.environ.get("MIRROR_TOKEN")
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"mirror: --token-file: cannot read {args.token_file}: {getattr(exc, 'strerror', None) or exc}",
                  file=sys.stderr)
            return 2
    user = None
    if args.user is not None:
        password = os.environ.get("MIRROR_PASSWORD")
        if password is None:
            password = getpass.getpass(f"password for {args.user}: ") if sys.stdin.isatty() else ""
        user = (args.user, password)
    client = AdminClient(args.server, token, user)
    try:
        if args.command == "ls":
            names = {f.name for f in dataclasses.fields(CachedImage)}
            _print_images([CachedImage(**{k: v for k, v in image.items() if k in names})
                           for image in asyncio.run(client.images())], args.json)
        elif args.command == "gc":
            _print_gc(asyncio.run(client.gc(args.dry_run)), args.json)
        else:
            _print_pin(asyncio.run(client.pin(args.reference, args.command == "pin")), args.json)
    except MirrorError as exc:
        print(f"mirror: {exc.message}", file=sys.stderr)
        return 2 if exc.status == 400 else 1
    return 0


def run_seed(config: Config, args: argparse.Namespace) -> int:
    try:
        specs = _image_list(config, args.references, args.file, args.from_misses, any_registry=bool(args.server))
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    if not specs:
        print("mirror: no images: name them, or give -f FILE or --from-misses", file=sys.stderr)
        return 2
    try:
        done, failed = asyncio.run(seed(config, specs, args.dry_run, quiet=args.json, server=args.server))
    except CacheBusy as exc:
        print(f"mirror: {exc}; seed works on a cache no mirror is serving", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted("seed")
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in done]
                         + [{"reference": str(spec), "error": error.message} for spec, error in failed], indent=2))
    else:
        for result in done:
            platforms = f" platforms {', '.join(result.platforms_present)}" if result.platforms_present else ""
            missing = f" (missing {', '.join(result.platforms_missing)})" if result.platforms_missing else ""
            print(f"{'resolved' if args.dry_run else 'seeded'} {result.reference} {result.digest}{platforms}"
                  f"{missing}: {len(result.blobs)} blobs, {_human(result.bytes_fetched)} fetched, "
                  f"{_human(result.bytes_cached)} already cached"
                  + (f", {len(result.referrers)} referrers" if result.referrers else ""))
        for spec, error in failed:
            print(f"failed {spec} ({spec.source}): {error.message}", file=sys.stderr)
    return 1 if failed else 0


def run_export(config: Config, args: argparse.Namespace) -> int:
    try:
        specs = _image_list(config, args.references, args.file, False)
        volume_size = parse_size(args.volume_size, "--volume-size") if args.volume_size else None
        check_output(args.output, volume_size)
        have = read_have(args.have) if args.have else set()
    except (ConfigError, BundleError) as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    if not specs:
        print("mirror: no images: name them, or give -f FILE", file=sys.stderr)
        return 2
    try:
        manifest = asyncio.run(export(config, specs, args.output, volume_size, have, quiet=args.json))
    except CacheBusy as exc:
        print(f"mirror: {exc}; export works on a cache no mirror is serving", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted("export")
    except (BundleError, OSError) as exc:
        print(f"mirror: export failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        omitted = manifest["omitted"]
        shipped = sum(b["size"] for d, b in manifest["blobs"].items() if d not in omitted)
        left_out = f", {len(omitted)} left out: the far side has them" if omitted else ""
        print(f"exported {len(manifest['images'])} images, {len(manifest['blobs'])} blobs ({_human(shipped)}"
              f"{left_out}) to {args.output} as bundle {manifest['id']}")
    return 0


def run_import(config: Config, args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(import_bundle(config, args.paths, args.name, quiet=args.json))
    except CacheBusy as exc:
        print(f"mirror: {exc}; import works on a cache no mirror is serving", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted("import")
    except BundleError as exc:
        print(f"mirror: import refused: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mirror: import failed: {exc}; run it again to finish", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        for reference in result.images:
            print(f"imported {reference}")
        for reference in result.incomplete:
            print(f"incomplete {reference}: not served until the rest of its content is imported", file=sys.stderr)
        for problem in result.problems:
            print(f"problem: {problem}", file=sys.stderr)
        print(f"{result.blobs_written} blobs written ({_human(result.bytes_written)}), "
              f"{result.blobs_present} already there")
    return 1 if result.problems or result.incomplete else 0


def run_inventory(config: Config) -> int:
    try:
        listing = asyncio.run(inventory(build_store(config)))
    except FileNotFoundError:
        # Said, not an empty list: a mistyped path would have the other side ship everything.
        print(f"mirror: no cache in {config.cache_dir}", file=sys.stderr)
        return 2
    print(json.dumps(listing, indent=2))
    return 0


def _interrupted(what: str) -> int:
    """Ctrl-C: what was whole is kept (nothing partial is ever published); the same command
    finishes the job."""
    print(f"mirror: {what} interrupted; what was done is kept: run the same command again to finish",
          file=sys.stderr)
    return 130


def _image_list(config: Config, references: Sequence[str], file: Path | None, from_misses: bool,
                any_registry: bool = False) -> list[ImageSpec]:
    specs = from_arguments(references, config, any_registry)
    if file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"{file}: {exc.strerror}") from None
        specs += load_list(text, config, any_registry)
    if from_misses:
        misses = asyncio.run(misses_listing(config))
        specs += load_list("\n".join(_miss_reference(m) for m in misses if m.kind == "manifest"), config)
    return specs


def _miss_reference(miss: Miss) -> str:
    return f"{miss.upstream}/{miss.name}{'@' if miss.reference.startswith('sha256:') else ':'}{miss.reference}"


def list_misses(config: Config, as_json: bool) -> int:
    misses = asyncio.run(misses_listing(config))
    if as_json:
        print(json.dumps([dataclasses.asdict(miss) for miss in misses], indent=2))
        return 0
    print(f"# what the offline mirror in {config.cache_dir} was asked for and did not have, most asked first")
    for miss in misses:
        if miss.kind == "manifest":
            print(f"{_miss_reference(miss)}  # asked {miss.count} times")
        else:
            print(f"# {miss.kind} {miss.upstream}/{miss.name} {miss.reference}: asked {miss.count} times")
    return 0


def _human(size: int) -> str:
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def _when(at: float | None) -> str:
    return "never" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("ls", "gc", "pin", "unpin"):
        if args.server is not None:
            return run_remote(args)
        if args.token_file is not None or args.user is not None:
            print("mirror: --token-file and --user log in to a mirror named with --server", file=sys.stderr)
            return 2
    if args.command == "serve":
        overrides = Overrides(listen=args.listen, cache_dir=args.cache_dir, max_size=args.max_size,
                              upstreams=tuple(args.upstream), default_upstream=args.default_upstream,
                              log_level=args.log_level, path_prefix=args.path_prefix,
                              metrics_listen=args.metrics_listen, log_format=args.log_format,
                              shutdown_grace=args.shutdown_grace, htpasswd=args.htpasswd,
                              tls_cert=args.tls_cert, tls_key=args.tls_key, offline=args.offline,
                              admin_token_file=args.admin_token_file,
                              storage=args.storage, redis=args.redis, advertise=args.advertise)
    else:
        overrides = Overrides(cache_dir=args.cache_dir, max_size=getattr(args, "max_size", None),
                              upstreams=tuple(getattr(args, "upstream", ())), storage=args.storage,
                              redis=args.redis)
    try:
        config = load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"mirror: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "ls":
            return list_cached(config, args.json)
        if args.command == "gc":
            return collect(config, args.dry_run, args.json)
        if args.command in ("pin", "unpin"):
            return set_pin(config, args.reference, args.command == "pin", args.json)
        if args.command == "misses":
            return list_misses(config, args.json)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except MirrorError as exc:
        # A cluster's index or bucket out of reach: said, not answered as an empty cache.
        print(f"mirror: {exc.message}", file=sys.stderr)
        return 1
    if args.command == "seed":
        configure_logs(config.log_level, config.log_format)
        return run_seed(config, args)
    if args.command == "export":
        configure_logs(config.log_level, config.log_format)
        return run_export(config, args)
    if args.command == "import":
        configure_logs(config.log_level, config.log_format)
        return run_import(config, args)
    if args.command == "inventory":
        return run_inventory(config)
    configure_logs(config.log_level, config.log_format)
    log = logging.getLogger("mirror")
    for upstream in config.upstreams:
        log.info("upstream %s -> %s%s", upstream.name, upstream.url,
                 " (default)" if upstream.name == config.default_upstream else "")

    def ready() -> None:
        # Said once the sockets are bound and start-up (cache sweep, index) is done: scripts wait for it.
        log.info("listening on %s://%s:%d", "https" if config.tls else "http", config.host, config.port)
        if config.metrics_listen is not None:
            log.info("metrics and health on http://%s:%d", *config.metrics_listen)

    try:
        # Imported here: the HTTP server is not needed by the commands that only open the cache.
        from mirror.app import serve

        asyncio.run(serve(config, ready))
    except CacheBusy as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"mirror: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0
