"""Bundles for air-gapped sites: `mirror export` writes the images of a list as an OCI image
layout (a directory, one tar, or tar volumes of a fixed size), `mirror import` verifies one and
loads it into a cache, `mirror inventory` says what a cache holds so the other side can ship
only what is missing.

A bundle directory:

    oci-layout, index.json           OCI image layout 1.1: one descriptor per listed image, with its
                                     full reference in org.opencontainers.image.ref.name and
                                     io.containerd.image.name
    blobs/sha256/<hex>               every manifest, config and layer (directory form)
    volume-0001.tar ...              or, with --volume-size, self-contained volumes of whole blobs:
                                     volume.json, then blobs/sha256/<hex> and, for a blob larger than
                                     a volume, parts/<hex>.<n>
    mirror-bundle.json               the bundle manifest (`FORMAT`): id, source, every image with its
                                     digests and platforms, every blob with its size and where it is,
                                     every volume with its sha256, what was left out (--have)
    .mirror-export.json              export's own record (volumes): the plan, the bundle id and each
                                     finished volume's sha256, so a re-run writes only what is missing

Digests never change on the way: manifests are copied byte for byte, a platform filter ships
the index as it is with only the selected children (the bundle records which are present).
Every file is written under a temporary name and renamed once whole, so a re-run after a crash
or Ctrl-C finds only whole files and writes only what is missing. Import reads blobs through
the store's verified writes (size and sha256 checked while streaming), writes manifests after
their blobs and tags last, so a tag never names missing content, and never extracts a tar entry
to a path: each is read by the digest its name gives, and any other entry is refused.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from mirror import __version__
from mirror.config import Config
from mirror.errors import ConfigError, IntegrityError, MirrorError
from mirror.imagelist import ImageSpec, parse_reference
from mirror.index import TagRecord
from mirror.metrics import Metrics
from mirror.oci import (
    OCI_INDEX,
    Digest,
    attachment_subject,
    is_tag,
    manifest_media_type,
    manifest_references,
    parse_tag,
    referrer_descriptors,
    referrers_index,
)
from mirror.progress import Reporter
from mirror.seeding import INDEX_TYPES, CacheFetcher, Seeded, Seeder, reporting, seed_all
from mirror.services import Services, open_services
from mirror.spool import Extent
from mirror.storage import BlobStore

log = logging.getLogger(__name__)

FORMAT = "mirror-bundle/v1"
BUNDLE_FILE = "mirror-bundle.json"
INVENTORY_FORMAT = "mirror-inventory/v1"
_STATE_FILE = ".mirror-export.json"
# Where import keeps the parts of a split blob until the volumes with the other parts arrive
# (under the cache directory, beside the store's own tree, outside tmp/ which start-up sweeps).
_STAGING = "import-parts"
_CHUNK = 4 << 20
# What a tar volume spends beside its blobs: a header per member, the end blocks and the padding
# of the last record, and room for volume.json.
_MEMBER_OVERHEAD = 1024 + 256  # a tar header and padding, and the member's line in volume.json
_VOLUME_OVERHEAD = 64 << 10
_MIN_VOLUME = 1 << 20
# The most a bundle manifest or index.json may hold (a bundle of a million blobs is ~100 MB of JSON).
_JSON_LIMIT = 256 << 20
_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")
_PART_NAME = re.compile(r"parts/([0-9a-f]{64})\.(\d{1,6})")
_VOLUME_NAME = re.compile(r"volume-\d{4,}\.tar")
_LAYOUT_DIRS = ("", ".", "blobs", "blobs/sha256", "parts")
_LAYOUT_FILES = ("oci-layout", "index.json", "volume.json", BUNDLE_FILE)
_IMAGE_STRINGS = ("reference", "upstream", "name", "digest")


class BundleError(Exception):
    """A bundle, volume or image list that cannot be used; the message names the culprit."""


# Export


@dataclass(slots=True)
class Part:
    digest: str
    index: int
    offset: int
    size: int


@dataclass(slots=True)
class Volume:
    number: int
    blobs: list[str] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)

    @property
    def file(self) -> str:
        return f"volume-{self.number:04d}.tar"


async def export(config: Config, specs: Sequence[ImageSpec], output: Path, volume_size: int | None,
                 have: set[str], quiet: bool = False) -> dict[str, Any]:
    """Write the bundle of `specs` to `output` (a directory, or a `.tar` file); the bundle manifest."""
    check_output(output, volume_size)
    async with open_services(config, Metrics()) as services:
        with Reporter("fetching", len(specs), quiet) as reporter:
            fetcher = CacheFetcher(services.proxy, services.referrers, services.index)
            seeder = Seeder(fetcher, reporting(reporter), pin=False)
            images, failed = await seed_all(seeder, list(specs), False)
        if failed:
            raise BundleError("; ".join(f"{spec} ({spec.source}): {error.message}" for spec, error in failed))
        sizes = await _sizes(services.store, images)
        shipped = {d: s for d, s in sizes.items() if d not in have}
        manifest: dict[str, Any] = {
            "format": FORMAT, "id": str(uuid.uuid4()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"mirror": __version__, "host": socket.gethostname()},
            "images": [_image_record(config, image) for image in images],
            "blobs": {d: {"size": s} for d, s in sorted(sizes.items())},
            "omitted": sorted(set(sizes) - set(shipped)),
            "volumes": [],
        }
        volumes = plan_volumes(shipped, volume_size) if volume_size is not None and output.suffix != ".tar" else []
        _check_space(output.parent if output.suffix == ".tar" else output,
                     sum(shipped.values()) - _already_written(output, shipped, volumes))
        stop = threading.Event()
        with Reporter("writing", len(volumes) or len(shipped), quiet, unit="volumes" if volumes else "blobs") \
                as reporter:
            if output.suffix == ".tar":
                write = functools.partial(_write_tar, services.store, output, manifest, shipped, reporter, stop)
            elif volumes:
                write = functools.partial(_write_volumes, services.store, output, manifest, shipped, volumes,
                                          reporter, stop)
            else:
                write = functools.partial(_write_directory, services.store, output, manifest, shipped, reporter,
                                          stop)
            writing = asyncio.ensure_future(asyncio.to_thread(write))
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:
                # Ctrl-C: the thread stops at the next file; what it finished is whole and kept.
                stop.set()
                writing.add_done_callback(lambda done: done.cancelled() or done.exception())
                raise
        return manifest


def check_output(output: Path, volume_size: int | None) -> None:
    """Refuse an output the export cannot write, before anything is fetched."""
    if volume_size is not None and volume_size < _MIN_VOLUME:
        raise BundleError(f"--volume-size must be at least {_MIN_VOLUME} bytes")
    if volume_size is not None and output.suffix == ".tar":
        raise BundleError(f"--volume-size writes volumes into a directory, and {output} names one tar")


async def _sizes(store: BlobStore, images: list[Seeded]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for image in images:
        for digest in (*image.manifests, *image.blobs):
            size = await store.size(Digest.parse(digest))
            if size is None:
                raise BundleError(f"{digest} of {image.reference} left the cache while it was exported: run again")
            sizes[digest] = size
    return sizes


def _image_record(config: Config, image: Seeded) -> dict[str, Any]:
    upstream, _, rest = image.reference.partition("/")
    name, tag = (rest.split("@", 1)[0], None) if "@" in rest else rest.rsplit(":", 1)
    return {"reference": image.reference, "upstream": upstream, "name": name, "tag": tag, "digest": image.digest,
            "media_type": image.media_type, "manifests": image.manifests, "blobs": sorted(image.blobs),
            "platforms_present": image.platforms_present, "platforms_missing": image.platforms_missing,
            "referrers": image.referrers, "referrer_tags": image.referrer_tags,
            "referrer_lists": image.referrer_lists}


def _layout_index(manifest: dict[str, Any]) -> bytes:
    descriptors = []
    for image in manifest["images"]:
        descriptors.append({
            "mediaType": image["media_type"], "digest": image["digest"],
            "size": manifest["blobs"][image["digest"]]["size"],
            "annotations": {"org.opencontainers.image.ref.name": image["reference"],
                            "io.containerd.image.name": image["reference"]},
        })
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": descriptors}, indent=2).encode()


_OCI_LAYOUT = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()


def _check_space(where: Path, needed: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise BundleError(f"{where} has {free} bytes free; the bundle needs {needed}")


def _already_written(output: Path, shipped: dict[str, int], volumes: list[Volume]) -> int:
    """Bytes a previous run of the same export left whole, which a resumed run will not write again."""
    if output.suffix == ".tar":
        return 0
    if volumes:
        state = _read_json(output / _STATE_FILE) if (output / _STATE_FILE).exists() else {}
        recorded = state.get("volumes")
        if not isinstance(recorded, dict):
            return 0
        written = 0
        for name, volume in recorded.items():
            if isinstance(volume, dict) and isinstance(volume.get("size"), int) and (output / str(name)).exists():
                written += volume["size"]
        return written
    blobs = output / "blobs" / "sha256"
    return sum(size for digest, size in shipped.items()
               if (blobs / digest.removeprefix("sha256:")).exists()
               and (blobs / digest.removeprefix("sha256:")).stat().st_size == size)


class _Stopped(Exception):
    """The export was interrupted: the writer stops between two files."""


def _go_on(stop: threading.Event) -> None:
    if stop.is_set():
        raise _Stopped()


def _write_directory(store: BlobStore, output: Path, manifest: dict[str, Any], shipped: dict[str, int],
                     reporter: Reporter, stop: threading.Event) -> None:
    blobs = output / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest, size in sorted(shipped.items()):
        _go_on(stop)
        target = blobs / Digest.parse(digest).hex
        # Written under a temporary name and renamed once whole: a file under its digest is done.
        if not (target.exists() and target.stat().st_size == size):
            with _stored(store, digest) as source:
                def copy(out: BinaryIO, source: BinaryIO = source, size: int = size) -> None:
                    _copy(source, out, size)
                _atomic_write(target, copy)
        reporter.step(size, digest[:19])
    _atomic_bytes(output / "oci-layout", _OCI_LAYOUT)
    _atomic_bytes(output / "index.json", _layout_index(manifest))
    _atomic_bytes(output / BUNDLE_FILE, json.dumps(manifest, indent=2).encode())


def _write_tar(store: BlobStore, output: Path, manifest: dict[str, Any], shipped: dict[str, int],
               reporter: Reporter, stop: threading.Event) -> None:
    """One tar of the whole layout: what `ctr images import` loads."""
    def write(out: BinaryIO) -> None:
        with tarfile.TarFile(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK) as tar:
            _add_bytes(tar, "oci-layout", _OCI_LAYOUT)
            _add_bytes(tar, "index.json", _layout_index(manifest))
            _add_bytes(tar, BUNDLE_FILE, json.dumps(manifest, indent=2).encode())
            for digest, size in sorted(shipped.items()):
                _go_on(stop)
                with _stored(store, digest) as source:
                    _add_file(tar, f"blobs/sha256/{Digest.parse(digest).hex}", source, size)
                reporter.step(size, digest[:19])
    _atomic_write(output, write)


def plan_volumes(shipped: dict[str, int], volume_size: int) -> list[Volume]:
    """Whole blobs packed into volumes in digest order; a blob larger than a volume split into
    parts that fill volumes of their own. The same blobs always give the same plan."""
    room = volume_size - _VOLUME_OVERHEAD
    volumes = [Volume(1)]
    used = 0
    for digest, size in sorted(shipped.items()):
        cost = size + _MEMBER_OVERHEAD
        if cost <= room:
            if used + cost > room:
                volumes.append(Volume(len(volumes) + 1))
                used = 0
            volumes[-1].blobs.append(digest)
            used += cost
            continue
        part_size = room - _MEMBER_OVERHEAD
        for index, offset in enumerate(range(0, size, part_size)):
            if used:
                volumes.append(Volume(len(volumes) + 1))
            volumes[-1].parts.append(Part(digest, index, offset, min(part_size, size - offset)))
            used = room
    return volumes


def _write_volumes(store: BlobStore, output: Path, manifest: dict[str, Any], shipped: dict[str, int],
                   volumes: list[Volume], reporter: Reporter, stop: threading.Event) -> None:
    """The volumes, resuming: `_STATE_FILE` keeps the plan, the bundle id (volume.json names
    it, so a volume of another run is another volume) and each finished volume's checksum, and
    stays after the bundle is done so that a re-run rewrites nothing."""
    output.mkdir(parents=True, exist_ok=True)
    # Lists and dicts only, so that the plan read back from JSON compares equal.
    plan = [{"blobs": v.blobs, "parts": [[p.digest, p.index, p.offset, p.size] for p in v.parts]} for v in volumes]
    state_path = output / _STATE_FILE
    state = _read_json(state_path) if state_path.exists() else {}
    if state.get("plan") != plan or not isinstance(state.get("id"), str) or not isinstance(state.get("volumes"), dict):
        state = {"plan": plan, "id": manifest["id"], "volumes": {}}
    manifest["id"] = state["id"]
    for volume in volumes:
        _go_on(stop)
        path = output / volume.file
        recorded = state["volumes"].get(volume.file)
        if recorded is not None and _is_written(path, recorded):
            reporter.step(recorded["size"], f"{volume.file} (already written)")
        else:
            def record(sha256: str, size: int, file: str = volume.file) -> None:
                # Before the rename: a volume under its name is always one the state knows.
                state["volumes"][file] = {"sha256": sha256, "size": size}
                _atomic_bytes(state_path, json.dumps(state).encode())
            _write_volume(store, path, manifest["id"], volume, shipped, record)
            recorded = state["volumes"][volume.file]
            reporter.step(recorded["size"], volume.file)
        manifest["volumes"].append({"file": volume.file, **recorded})
        for digest in volume.blobs:
            manifest["blobs"][digest]["volume"] = volume.number
        for part in volume.parts:
            manifest["blobs"][part.digest].setdefault("parts", []).append(
                {"volume": volume.number, "index": part.index, "offset": part.offset, "size": part.size})
    _atomic_bytes(output / "oci-layout", _OCI_LAYOUT)
    _atomic_bytes(output / "index.json", _layout_index(manifest))
    _atomic_bytes(output / BUNDLE_FILE, json.dumps(manifest, indent=2).encode())


def _is_written(path: Path, recorded: dict[str, Any]) -> bool:
    """A volume a previous run finished, read back whole to check it is still what it wrote."""
    try:
        return path.stat().st_size == recorded.get("size") and _sha256_file(path) == recorded.get("sha256")
    except FileNotFoundError:
        return False


def _write_volume(store: BlobStore, path: Path, bundle_id: str, volume: Volume, shipped: dict[str, int],
                  record: Callable[[str, int], None]) -> None:
    """Write one volume, hashing it as it is written; `record(sha256, size)` is called once it
    is durable and before it takes its name."""
    listing = {"bundle": bundle_id, "volume": volume.number,
               "blobs": {d: shipped[d] for d in volume.blobs},
               "parts": [{"digest": p.digest, "index": p.index, "offset": p.offset, "size": p.size}
                         for p in volume.parts]}
    hashed: list[str] = []

    def write(out: BinaryIO) -> None:
        hashing = _HashingWriter(out)
        with tarfile.TarFile(fileobj=cast(BinaryIO, hashing), mode="w", format=tarfile.PAX_FORMAT,
                             copybufsize=_CHUNK) as tar:
            _add_bytes(tar, "volume.json", json.dumps(listing, indent=2).encode())
            for digest in volume.blobs:
                with _stored(store, digest) as source:
                    _add_file(tar, f"blobs/sha256/{Digest.parse(digest).hex}", source, shipped[digest])
            for part in volume.parts:
                with _stored(store, part.digest) as source:
                    source.seek(part.offset)
                    _add_file(tar, f"parts/{Digest.parse(part.digest).hex}.{part.index}", source, part.size)
        hashed.append(hashing.hexdigest())
    _atomic_write(path, write, lambda temp: record(hashed[0], temp.stat().st_size))


class _HashingWriter:
    """A file object that hashes what goes through it, for a volume's checksum in one pass."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        return self._out.write(data)

    def tell(self) -> int:
        return self._out.tell()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _stored(store: BlobStore, digest: str) -> BinaryIO:
    source = store.open_blob(Digest.parse(digest))
    if source is None:
        raise BundleError(f"{digest} left the cache while it was exported: run again")
    return source


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, _BytesReader(data))


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self, size: int = -1) -> bytes:
        size = len(self._view) if size < 0 else size
        chunk, self._view = self._view[:size], self._view[size:]
        return bytes(chunk)


def _add_file(tar: tarfile.TarFile, name: str, source: IO[bytes], size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(time.time()), 0o644
    tar.addfile(info, source)


def _copy(source: BinaryIO, out: BinaryIO, size: int) -> None:
    """In the kernel where it can (copy_file_range), as `cp` does."""
    copied = 0
    try:
        while copied < size:
            moved = os.copy_file_range(source.fileno(), out.fileno(), size - copied)
            if moved == 0:
                break
            copied += moved
    except OSError:
        source.seek(copied)
        out.seek(copied)
        shutil.copyfileobj(source, out, _CHUNK)
        return
    if copied != size:
        raise BundleError(f"{source.name}: {copied} of {size} bytes could be read")


def _atomic_write(path: Path, write: Callable[[BinaryIO], object],
                  before_rename: Callable[[Path], None] | None = None) -> None:
    temp = path.with_name(f".{path.name}.partial")
    try:
        with open(temp, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        if before_rename is not None:
            before_rename(temp)
        os.rename(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _atomic_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda out: out.write(data))


def _open_regular(path: Path) -> BinaryIO:
    """`path` to read, if it is a regular file and not a link: a bundle cannot make import read a
    file outside it, nor hang on a pipe or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path}: not a regular file")
    return open(fd, "rb")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with _open_regular(path) as source:
            data = source.read(_JSON_LIMIT + 1)
    except OSError as exc:
        raise BundleError(f"{path}: not readable ({exc.strerror})") from None
    if len(data) > _JSON_LIMIT:
        raise BundleError(f"{path}: larger than {_JSON_LIMIT} bytes")
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise BundleError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(document, dict):
        raise BundleError(f"{path}: not a JSON object")
    return document


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_have(path: Path) -> set[str]:
    """The digests an inventory (`mirror inventory` on the far side) says are there."""
    document = _read_json(path)
    digests = document.get("digests")
    if document.get("format") != INVENTORY_FORMAT or not isinstance(digests, list):
        raise BundleError(f"{path}: not a mirror inventory ({INVENTORY_FORMAT})")
    try:
        return {str(Digest.parse(str(d))) for d in digests}
    except MirrorError as exc:
        raise BundleError(f"{path}: {exc.message}") from None


async def inventory(store: BlobStore) -> dict[str, Any]:
    """What this cache holds, for the other side's `mirror export --have`."""
    return {"format": INVENTORY_FORMAT, "digests": sorted(await store.scan())}


# Import


@dataclass(slots=True)
class Imported:
    images: list[str] = field(default_factory=list)
    """References now served (tag or digest)."""
    incomplete: list[str] = field(default_factory=list)
    """References left out: some of their content is missing (a bad or missing volume)."""
    blobs_written: int = 0
    blobs_present: int = 0
    bytes_written: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Image:
    upstream: str
    name: str
    tag: str | None
    digest: str
    manifests: list[str] | None
    """As the bundle lists them; None for a plain layout, whose manifests are found from the root."""
    reference: str
    referrer_tags: dict[str, str] = field(default_factory=dict)
    referrer_lists: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    """Subject digest -> its referrers as listed when it was seeded."""


async def import_bundle(config: Config, paths: Sequence[Path], name: str | None = None,
                        quiet: bool = False) -> Imported:
    """Verify and load bundles, volumes or OCI layouts into the cache; what was done."""
    sources = _Sources.find(paths)
    images = sources.images(config, name)
    async with open_services(config, Metrics()) as services:
        result = Imported()
        needed = {d: s for d, s in sources.sizes.items() if await services.store.size(Digest.parse(d)) is None}
        _check_space(config.cache_dir, sum(needed.values()))
        with Reporter("importing", len(sources.sizes), quiet, unit="blobs") as reporter:
            await _load_blobs(services, sources, result, reporter)
        await _record(services, sources, images, result)
        if result.incomplete or result.problems:
            # Volumes imported one at a time are not missing once what they held is here.
            result.problems += [f"volume {f} is missing" for f in sources.missing_volumes]
        return result


class _Sources:
    """Where the blobs are: a layout directory, layout tars, and volumes (checked against the
    bundle manifest's checksums before anything is read from them)."""

    def __init__(self) -> None:
        self.bundle: dict[str, Any] | None = None
        self.layout_index: dict[str, Any] | None = None
        self.directory: Path | None = None
        self.tars: list[Path] = []
        self.sizes: dict[str, int] = {}
        self.written: dict[str, int] = {}
        """What this run wrote into the store, with its size: to be indexed."""
        self.missing_volumes: list[str] = []
        """Volumes the bundle lists that were not given: a problem only if content is still missing."""

    @classmethod
    def find(cls, paths: Sequence[Path]) -> _Sources:
        """Sources from what the user named, in any order: bundle directories, bundle manifests
        (`*.json`), volumes, layout tars and layout directories."""
        found = cls()
        for path in paths:
            if path.is_dir():
                found._directory(path)
            elif path.is_file() and path.suffix == ".json":
                found._set_bundle(_read_json(path), path)
            elif path.is_file():
                found._add_tar(path)
            else:
                raise BundleError(f"{path}: no such file or directory")
        volumes = {v["file"] for v in found.bundle["volumes"]} if found.bundle is not None else set()
        for tar in found.tars:
            # A volume holds no index.json or bundle manifest, and is read only once its
            # checksum is the bundle's: a bad one is named and skipped, not a reason to refuse all.
            if tar.name not in volumes:
                found._tar_metadata(tar)
        if found.bundle is None and found.layout_index is None:
            raise BundleError("no mirror-bundle.json or OCI image layout (index.json) in " +
                              ", ".join(map(str, paths)))
        if found.bundle is not None:
            found.sizes = {d: int(b["size"]) for d, b in found.bundle["blobs"].items()
                           if d not in found.bundle.get("omitted", [])}
        return found

    def _add_tar(self, path: Path) -> None:
        """A tar once, however often (and however spelt) it was named."""
        if all(not path.samefile(known) for known in self.tars):
            self.tars.append(path)

    def _directory(self, path: Path) -> None:
        if (path / BUNDLE_FILE).exists():
            self._set_bundle(_read_json(path / BUNDLE_FILE), path / BUNDLE_FILE)
            for volume in self.bundle["volumes"] if self.bundle else []:
                # A regular file, not a link: the bundle names it, and may not name one elsewhere.
                if (path / volume["file"]).is_file() and not (path / volume["file"]).is_symlink():
                    self._add_tar(path / volume["file"])
        if (path / "index.json").exists():
            self.layout_index = _read_json(path / "index.json")
            self.directory = path
        if self.bundle is None and self.layout_index is None:
            raise BundleError(f"{path}: neither a bundle ({BUNDLE_FILE}) nor an OCI image layout (index.json)")

    def _set_bundle(self, document: dict[str, Any], where: Path) -> None:
        if document.get("format") != FORMAT:
            raise BundleError(f"{where}: not a mirror bundle ({FORMAT})")
        for key, kind in (("images", list), ("blobs", dict), ("volumes", list)):
            if not isinstance(document.get(key), kind):
                raise BundleError(f"{where}: {key} is missing or malformed")
        # The id names a directory where split blobs wait for their other parts.
        if not isinstance(document.get("id"), str) or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", document["id"]):
            raise BundleError(f"{where}: the bundle id is missing or malformed")
        if self.bundle is not None and self.bundle.get("id") != document.get("id"):
            raise BundleError(f"{where}: belongs to bundle {document.get('id')}, not {self.bundle.get('id')}")
        for digest, blob in document["blobs"].items():
            try:
                Digest.parse(digest)
            except MirrorError:
                raise BundleError(f"{where}: {digest[:80]!r} is not a digest") from None
            if not isinstance(blob, dict) or not isinstance(blob.get("size"), int) or blob["size"] < 0:
                raise BundleError(f"{where}: blob {digest} has no valid size")
            if not isinstance(blob.get("parts", []), list):
                raise BundleError(f"{where}: blob {digest} has malformed parts")
        for volume in document["volumes"]:
            # Only a name of ours, read beside the bundle manifest: never a path elsewhere.
            if not (isinstance(volume, dict) and isinstance(volume.get("file"), str)
                    and _VOLUME_NAME.fullmatch(volume["file"]) and isinstance(volume.get("sha256"), str)):
                raise BundleError(f"{where}: a malformed volume entry: {str(volume)[:80]!r}")
        for image in document["images"]:
            if not (isinstance(image, dict) and all(isinstance(image.get(k), str) for k in _IMAGE_STRINGS)
                    and all(isinstance(image.get(k), list) for k in ("manifests", "blobs"))):
                raise BundleError(f"{where}: a malformed image entry: {str(image)[:80]!r}")
            try:
                for tag, digest in (image.get("referrer_tags") or {}).items():
                    parse_tag(str(tag))
                    Digest.parse(str(digest))
                if image.get("tag") is not None:
                    parse_tag(str(image["tag"]))
            except (MirrorError, AttributeError):
                raise BundleError(f"{where}: image {image['reference'][:80]!r} has a malformed tag") from None
        self.bundle = document

    def _tar_metadata(self, path: Path) -> None:
        """A layout tar's index.json and bundle manifest, read up front; volumes need nothing yet."""
        try:
            with tarfile.open(path, mode="r:") as tar:
                for member in tar:
                    name = _check_member(path, member)
                    if name in ("index.json", BUNDLE_FILE):
                        data = _member_bytes(tar, member, path)
                        try:
                            document = json.loads(data)
                        except ValueError:
                            raise BundleError(f"{path}: {name} is not JSON") from None
                        if not isinstance(document, dict):
                            raise BundleError(f"{path}: {name} is not a JSON object")
                        if name == BUNDLE_FILE:
                            self._set_bundle(document, path)
                        else:
                            self.layout_index = document
        except tarfile.TarError as exc:
            raise BundleError(f"{path}: not a readable tar ({exc})") from None

    def images(self, config: Config, name: str | None) -> list[_Image]:
        if self.bundle is not None:
            return [_bundle_image(config, i) for i in self.bundle["images"]]
        assert self.layout_index is not None
        return [_layout_image(config, descriptor, name) for descriptor in self.layout_index.get("manifests", [])]

    def verified_volumes(self, result: Imported) -> list[Path]:
        """The tars that may be read: layout tars, and volumes whose checksum is the bundle's."""
        expected = {v["file"]: v["sha256"] for v in (self.bundle or {}).get("volumes", [])}
        usable = []
        for tar in self.tars:
            if tar.name in expected and _sha256_file(tar) != expected[tar.name]:
                result.problems.append(f"{tar}: checksum does not match the bundle's: volume skipped")
                continue
            usable.append(tar)
        listed = {t.name for t in self.tars}
        self.missing_volumes = [f for f in expected if f not in listed]
        return usable


def _bundle_image(config: Config, entry: dict[str, Any]) -> _Image:
    """An image of the bundle manifest, its registry, repository and tag taken from its reference
    as users write it (never from fields that could say something else), every digest checked."""
    reference = str(entry["reference"])
    try:
        upstream, name, parsed = parse_reference(reference, config, "mirror-bundle.json", any_registry=True)
        digest = Digest.parse(str(entry["digest"]))
        manifests = [str(Digest.parse(str(m))) for m in entry["manifests"]]
        referrer_tags = {parse_tag(str(t)): str(Digest.parse(str(d)))
                         for t, d in (entry.get("referrer_tags") or {}).items()}
        # Each list as a referrers index would hold it: malformed descriptors are dropped.
        referrer_lists = {str(Digest.parse(str(subject))): referrer_descriptors(referrers_index(listed))
                          for subject, listed in (entry.get("referrer_lists") or {}).items()}
    except (ConfigError, MirrorError, AttributeError, TypeError) as exc:
        raise BundleError(f"mirror-bundle.json: image {reference[:100]!r}: {getattr(exc, 'message', exc)}") from None
    if parsed is not None and parsed.digest is not None and parsed.digest != digest:
        raise BundleError(f"mirror-bundle.json: image {reference[:100]!r} says digest {digest}")
    tag = parsed.tag if parsed is not None else None
    return _Image(upstream.name, name, tag, str(digest), manifests, reference, referrer_tags, referrer_lists)


def _layout_image(config: Config, descriptor: object, name: str | None) -> _Image:
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
        raise BundleError("index.json: a manifest descriptor has no digest")
    try:
        Digest.parse(descriptor["digest"])
    except MirrorError as exc:
        raise BundleError(f"index.json: {exc.message}") from None
    annotations = descriptor.get("annotations")
    annotations = {k: v for k, v in annotations.items() if isinstance(v, str)} if isinstance(annotations, dict) else {}
    ref_name = annotations.get("io.containerd.image.name") or annotations.get("org.opencontainers.image.ref.name")
    if name is not None:
        tag = annotations.get("org.opencontainers.image.ref.name")
        full = f"{name}:{tag}" if tag and is_tag(tag) else f"{name}@{descriptor['digest']}"
    elif ref_name and ("/" in ref_name or ":" in ref_name or "@" in ref_name):
        full = ref_name
    else:
        raise BundleError(f"index.json: {descriptor['digest']} has no full image name in its annotations: "
                          "give one with --name REPOSITORY")
    try:
        upstream, repository, reference = parse_reference(full, config, "index.json")
    except (ConfigError, MirrorError) as exc:
        raise BundleError(f"index.json: {getattr(exc, 'message', exc)}") from None
    tag = reference.tag if reference is not None else "latest"
    return _Image(upstream.name, repository, tag, str(descriptor["digest"]), None, full)


def _check_member(path: Path, member: tarfile.TarInfo) -> str | None:
    """The layout name of a tar entry (`./` as other tools write it, taken off), or None for one
    of the layout's own directories, which is skipped. Only regular files under the names a
    layout or volume has are read; anything else (an absolute path, `..`, a link, a device) is
    refused before a byte of it is read."""
    name = member.name.removeprefix("./")
    if member.isdir() and name.rstrip("/") in _LAYOUT_DIRS:
        return None
    if not member.isreg() or member.issparse():
        raise BundleError(f"{path}: entry {member.name!r} is not a regular file: refused")
    if name in _LAYOUT_FILES or _BLOB_NAME.fullmatch(name) or _PART_NAME.fullmatch(name):
        return name
    raise BundleError(f"{path}: entry {member.name!r} is not part of a bundle: refused")


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    if member.size > 16 << 20:
        raise BundleError(f"{path}: {member.name} is too large")
    source = tar.extractfile(member)
    assert source is not None
    return source.read()


async def _load_blobs(services: Services, sources: _Sources, result: Imported, reporter: Reporter) -> None:
    store = services.store
    if sources.directory is not None:
        for path in sorted((sources.directory / "blobs" / "sha256").glob("*")):
            if not re.fullmatch(r"[0-9a-f]{64}", path.name):
                continue
            try:
                source = _open_regular(path)
            except BundleError as exc:
                result.problems.append(f"{exc}: not imported")
                continue
            with source:
                await _put(store, Digest(path.name), [Extent(source.fileno(), 0, os.fstat(source.fileno()).st_size)],
                           str(path), result, reporter, sources)
    # Parts are found here and joined below, straight from their volumes into one verified
    # write: volumes come in any order, and nothing is staged on disk on the way.
    parts: dict[tuple[str, int], tuple[Path, tarfile.TarInfo]] = {}
    for tar_path in sources.verified_volumes(result):
        try:
            with open(tar_path, "rb") as volume, tarfile.open(fileobj=volume, mode="r:") as tar:
                for member in tar:
                    if (name := _check_member(tar_path, member)) is None:
                        continue
                    if match := _BLOB_NAME.fullmatch(name):
                        await _put(store, Digest(match[1]), [_extent(volume, member)],
                                   f"{tar_path}:{name}", result, reporter, sources)
                    elif match := _PART_NAME.fullmatch(name):
                        parts[(f"sha256:{match[1]}", int(match[2]))] = (tar_path, member)
        except tarfile.TarError as exc:
            result.problems.append(f"{tar_path}: not a readable tar ({exc}): skipped")
    if sources.bundle is not None:
        staging = services.config.cache_dir / _STAGING / str(sources.bundle["id"])
        await _join_parts(store, sources, parts, result, reporter, staging)
        if staging.exists() and not any(staging.iterdir()):
            staging.rmdir()


async def _join_parts(store: BlobStore, sources: _Sources, parts: dict[tuple[str, int], tuple[Path, tarfile.TarInfo]],
                      result: Imported, reporter: Reporter, staging: Path) -> None:
    """Each split blob from its parts, in one verified write. Parts whose siblings are in volumes
    not given this time are kept in `staging` (whole, from volumes whose checksum held), so that
    volumes can be imported one at a time, as they arrive."""
    assert sources.bundle is not None
    for digest, blob in sources.bundle["blobs"].items():
        declared = blob.get("parts")
        if not declared or digest not in sources.sizes:
            continue
        if await store.size(Digest.parse(digest)) is not None:
            result.blobs_present += 1
            continue
        hex_ = Digest.parse(digest).hex
        found: list[tuple[Path, tarfile.TarInfo | None] | None] = []
        for index in range(len(declared)):
            staged = staging / f"{hex_}.{index}"
            held = parts.get((digest, index))
            found.append(held if held is not None else (staged, None) if staged.exists() else None)
        if any(part is None for part in found):
            for index, part in enumerate(found):
                if part is not None and part[1] is not None:
                    await asyncio.to_thread(_stage, part[0], part[1], staging / f"{hex_}.{index}")
            result.problems.append(f"{digest}: {sum(p is not None for p in found)} of its {len(found)} parts are "
                                   "here; they are kept until the volumes with the others are imported")
            continue
        present = [part for part in found if part is not None]
        try:
            with ExitStack() as files:
                extents = [_part_extent(files, part) for part in present]
                await _put(store, Digest.parse(digest), extents, f"{len(present)} parts", result, reporter, sources)
        except (tarfile.TarError, OSError) as exc:
            result.problems.append(f"{digest}: a part could not be read ({exc}): not imported")
            continue
        for index in range(len(found)):
            (staging / f"{hex_}.{index}").unlink(missing_ok=True)


def _stage(volume: Path, member: tarfile.TarInfo, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(volume, mode="r:") as tar:
        entry = tar.extractfile(member)
        assert entry is not None
        _atomic_write(target, lambda out: shutil.copyfileobj(entry, out, _CHUNK))


def _extent(volume: BinaryIO, member: tarfile.TarInfo) -> Extent:
    """Where a tar entry's bytes lie in its volume (regular entries only: `_check_member`)."""
    return Extent(volume.fileno(), member.offset_data, member.size)


def _part_extent(files: ExitStack, part: tuple[Path, tarfile.TarInfo | None]) -> Extent:
    """A part of a split blob: in the volume that holds it, or where an earlier run kept it."""
    path, member = part
    source = files.enter_context(path.open("rb"))
    if member is None:
        return Extent(source.fileno(), 0, os.fstat(source.fileno()).st_size)
    return Extent(source.fileno(), member.offset_data, member.size)


async def _put(store: BlobStore, digest: Digest, extents: list[Extent], where: str, result: Imported,
               reporter: Reporter, sources: _Sources) -> None:
    """One blob into the store through its verified write; what is there already is not written
    again. A problem names the blob by its digest, and where it was read from."""
    size = sum(extent.size for extent in extents)
    expected = sources.sizes.get(str(digest))
    if expected is not None and expected != size:
        result.problems.append(f"{digest} ({where}): {size} bytes, but the bundle says {expected}: not imported")
        return
    if await store.size(digest) is not None:
        result.blobs_present += 1
        reporter.step(0, str(digest)[:19])
        return
    try:
        await store.put_extents(digest, extents)
    except IntegrityError as exc:
        # The store words a mismatch for a download; here the bytes came from the bundle.
        result.problems.append(f"{digest} ({where}): the content does not match its digest "
                               f"({exc.message}): not imported")
        return
    except MirrorError as exc:
        result.problems.append(f"{digest} ({where}): {exc.message}: not imported")
        return
    result.blobs_written += 1
    result.bytes_written += size
    sources.written[str(digest)] = size
    reporter.step(size, str(digest)[:19])


async def _record(services: Services, sources: _Sources, images: list[_Image], result: Imported) -> None:
    """Index what landed: blobs, then each image whose content is all here (its manifests, and
    every config and layer they name), then its tags, and pin it."""
    # What was here before is indexed already (opening the cache reconciled it); what landed now is not.
    for digest, size in sources.written.items():
        if await services.index.add_blob(Digest.parse(digest), size):
            services.evictor.added(size)
    for image in images:
        try:
            complete = await _record_image(services, image, result)
        except MirrorError as exc:
            result.problems.append(f"{image.reference}: {exc.message}")
            complete = False
        (result.images if complete else result.incomplete).append(image.reference)


async def _record_image(services: Services, image: _Image, result: Imported) -> bool:
    store, index = services.store, services.index
    manifests = (list(dict.fromkeys(image.manifests)) if image.manifests is not None
                 else await _walk(store, image.digest) or [])
    named = {image.digest, *image.referrer_tags.values()}
    if not named <= set(manifests):
        result.problems.append(f"{image.reference}: its tags name manifests the bundle does not ship")
        return False
    bodies: dict[str, tuple[bytes, str]] = {}
    for digest in manifests:
        body = await store.read(Digest.parse(digest))
        if body is None:
            return False
        media_type = manifest_media_type(body, None)
        # An index may be sparse (only the platforms shipped); an image needs all it names.
        if media_type not in INDEX_TYPES and any([await store.size(d) is None for d in manifest_references(body)]):
            return False
        bodies[digest] = (body, media_type)
    for digest, (body, media_type) in bodies.items():
        await index.add_manifest(image.upstream, image.name, Digest.parse(digest), media_type,
                                 manifest_references(body))
    tags = {**image.referrer_tags, **({image.tag: image.digest} if image.tag is not None else {})}
    for tag, tagged in tags.items():
        await index.set_tag(image.upstream, image.name, tag, TagRecord(Digest.parse(tagged), time.time()))
        if (subject := attachment_subject(tag)) is not None:
            await index.attach(subject, Digest.parse(tagged))
    for listed_for, listed in image.referrer_lists.items():
        # The referrers API answers from these offline, as it did where the bundle was made.
        body = referrers_index(listed)
        await services.proxy.keep_manifest(image.upstream, image.name, Digest.of(body), OCI_INDEX, body,
                                           [Digest.parse(str(d["digest"])) for d in listed])
        await index.set_referrers(image.upstream, image.name, Digest.parse(listed_for),
                                  TagRecord(Digest.of(body), time.time()))
    for reference in (*tags, *manifests):
        await index.clear_miss(image.upstream, image.name, reference)
    for digest in manifests:
        await index.pin(Digest.parse(digest))
    return True


async def _walk(store: BlobStore, root: str) -> list[str] | None:
    """A plain layout's manifests from its root: the root and, for an index, the children that
    are present (a sparse index ships only some); None if the root itself is missing."""
    body = await store.read(Digest.parse(root))
    if body is None:
        return None
    found = [root]
    try:
        document = json.loads(body)
    except ValueError:
        return found
    for descriptor in document.get("manifests", []) if isinstance(document, dict) else []:
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        if isinstance(digest, str) and await store.size(Digest.parse(digest)) is not None:
            found.append(digest)
    return found
