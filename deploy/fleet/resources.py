"""What the control plane serves: the files `origin-policy bundle` writes, read
generically into xDS resources keyed by their type URL.

A bundle written with `--delivery feed` also has `origin-policy.domains.tsv`,
one `DOMAIN<TAB>DOCUMENT` line per domain: the policies the control plane
serves per domain over its feed (the filter configuration then carries the
settings only).

Every `*.ecds.json` and `*.cds.json` in a bundle directory is an object
`{"version_info"?: str, "resources": [{"@type": URL, ...}, ...]}`. Resources are
kept as their JSON (so that per-node variants are cheap to make) and turned
into protobuf `Any`s with the Envoy API types from `xds-protos`, which also
checks each one against Envoy's schema: an unknown field or type refuses the
whole bundle, as Envoy would refuse the resource.

The Wasm module a resource names by local path is copied into a
content-addressed module store and the resource rewritten to point there, so a
version always means the same bytes of code, whatever is later built over the
source file.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import pkgutil
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import any_pb2, descriptor_pool, json_format

# Bundle files served over xDS, by suffix; anything else the bundle writes
# (plugin-config.json) is for humans and for file-based Envoys.
RESOURCE_FILE_SUFFIXES = (".ecds.json", ".cds.json")
DOMAINS_FILE = "origin-policy.domains.tsv"
TYPE_PREFIX = "type.googleapis.com/"


class BundleError(Exception):
    """A bundle that cannot be served; the message says why."""


def ensure_message_type(full_name: str) -> None:
    """Imports the xds-protos modules of `full_name`'s proto package, so that
    the protobuf runtime can parse it (and any `Any` carrying it). Packages map
    one to one onto Python packages in xds-protos."""
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName(full_name)
        return
    except KeyError:
        pass
    parts = full_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            package = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
            if module.name.endswith("_pb2"):
                importlib.import_module(f"{package.__name__}.{module.name}")
        break
    try:
        pool.FindMessageTypeByName(full_name)
    except KeyError:
        raise BundleError(f"unknown resource type {full_name}") from None


def type_urls_in(value) -> set[str]:
    """Every `@type` anywhere in a JSON value."""
    found = set()
    if isinstance(value, dict):
        if isinstance(value.get("@type"), str):
            found.add(value["@type"])
        for v in value.values():
            found |= type_urls_in(v)
    elif isinstance(value, list):
        for v in value:
            found |= type_urls_in(v)
    return found


def to_any(resource: dict) -> any_pb2.Any:
    for url in type_urls_in(resource):
        ensure_message_type(url.removeprefix(TYPE_PREFIX))
    packed = any_pb2.Any()
    try:
        json_format.ParseDict(resource, packed)
    except json_format.ParseError as e:
        raise BundleError(f"{resource.get('@type')} {resource.get('name', '')}: {e}") from None
    return packed


def local_modules(value):
    """The `{"filename": ...}` objects of every Wasm `vm_config` that loads its
    code from a local file, anywhere in a resource."""
    if isinstance(value, dict):
        local = value.get("vm_config", {}).get("code", {}).get("local")
        if isinstance(local, dict) and "filename" in local:
            yield local
        for v in value.values():
            yield from local_modules(v)
    elif isinstance(value, list):
        for v in value:
            yield from local_modules(v)


def module_name(sha256: str) -> str:
    return f"{sha256}.wasm"


def publish_module(source: Path, store: Path) -> Path:
    """Copies a .wasm into the store under its sha256 (once) and returns its path."""
    data = source.read_bytes()
    target = store / module_name(hashlib.sha256(data).hexdigest())
    if not target.exists():
        store.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(target)
    return target


@dataclass
class Snapshot:
    """One servable version: resources by type URL, as JSON, and the policies
    by domain. `version` names the whole; `xds_version` the resources alone
    (what ADS sends, so that a policy change sends no xDS), and
    `feed_version` the policies alone (what the feed calls it: a number)."""

    resources: dict[str, list[dict]]
    documents: dict[str, str] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)  # sha256 of each Wasm module
    version: str = ""
    xds_version: str = ""
    feed_version: int = 0
    _encoded: dict[str | None, dict[str, list[tuple[str, any_pb2.Any]]]] = field(
        default_factory=dict, repr=False
    )
    # Streams woken together by a promotion all want the same encoding: once.
    _encoding: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.xds_version = content_version(self.resources)
        documents = content_version(self.documents)
        self.version = content_version({"xds": self.xds_version, "documents": documents})
        # 60 bits of the content hash: the feed's versions are unsigned 64-bit.
        self.feed_version = int(documents[:15], 16) or 1

    @property
    def type_urls(self) -> list[str]:
        return sorted(self.resources)

    def encoded(self, module_dir: str | None = None) -> dict[str, list[tuple[str, any_pb2.Any]]]:
        """(name, Any) per type URL, with Wasm modules read from `module_dir`
        when the node keeps them somewhere else than the store."""
        with self._encoding:
            if module_dir not in self._encoded:
                self._encoded[module_dir] = {
                    url: [(r.get("name", ""), to_any(for_node(r, module_dir))) for r in items]
                    for url, items in self.resources.items()
                }
            return self._encoded[module_dir]

    def summary(self) -> dict:
        return {
            "version": self.version,
            "xds_version": self.xds_version,
            "feed_version": self.feed_version,
            "domains": len(self.documents),
            "resources": {url.rsplit(".", 1)[-1]: len(r) for url, r in self.resources.items()},
            "modules": [m[:12] for m in self.modules],
        }


def for_node(resource: dict, module_dir: str | None) -> dict:
    if module_dir is None:
        return resource
    variant = copy.deepcopy(resource)
    for local in local_modules(variant):
        local["filename"] = str(Path(module_dir) / Path(local["filename"]).name)
    return variant


def read_documents(path: Path) -> dict[str, str]:
    documents = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        domain, tab, document = line.partition("\t")
        if not tab or not domain or not document:
            raise BundleError(f"{path.name}:{number}: not DOMAIN<TAB>DOCUMENT")
        documents[domain] = document
    return documents


def read_bundle(directory: Path, module_store: Path) -> Snapshot:
    """The resources of every `*.ecds.json` / `*.cds.json` in `directory`,
    grouped by type URL, and the policies of its domains file, modules
    published to `module_store`, checked against the Envoy API, and versioned
    by content."""
    resources: dict[str, list[dict]] = {}
    modules = []
    documents = {}
    for path in sorted(directory.iterdir()):
        if path.name == DOMAINS_FILE:
            documents = read_documents(path)
            continue
        if not path.name.endswith(RESOURCE_FILE_SUFFIXES):
            continue
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"{path.name}: {e}") from None
        for resource in document.get("resources", []):
            for local in local_modules(resource):
                stored = publish_module(Path(local["filename"]), module_store)
                local["filename"] = str(stored)
                modules.append(stored.stem)
            resources.setdefault(resource["@type"], []).append(resource)
    if not resources:
        raise BundleError(f"{directory}: no *.ecds.json or *.cds.json resources")
    snapshot = Snapshot(resources, documents, sorted(set(modules)))
    snapshot.encoded()  # every resource parses, or the bundle is refused here
    return snapshot


def content_version(content: dict) -> str:
    """The same content always gets the same version, so a restarted control
    plane hands Envoys the version they already run, and they change nothing."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def save_snapshot(snapshot: Snapshot, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"resources": snapshot.resources, "documents": snapshot.documents,
                               "modules": snapshot.modules}))
    tmp.rename(path)


def load_snapshot(path: Path) -> Snapshot | None:
    """The last promoted snapshot a previous run saved, if its modules are
    still in the store and it has its policies."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if "documents" not in saved:
        return None  # saved before per-domain delivery: the start's push replaces it
    snapshot = Snapshot(saved["resources"], saved["documents"], saved.get("modules", []))
    if not all(Path(m["filename"]).exists()
               for items in snapshot.resources.values()
               for r in items for m in local_modules(r)):
        return None
    return snapshot


def copy_module_to(module: Path, directory: Path) -> Path:
    """Places a module in a node's own module directory under its store name
    (what a fleet's file distribution does for a node that keeps modules apart)."""
    data = module.read_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / module_name(hashlib.sha256(data).hexdigest())
    shutil.copyfile(module, target)
    return target
