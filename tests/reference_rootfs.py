"""An independent reference for what an OCI image's root filesystem is: the layer tars
merged with Python's tarfile following the OCI image spec (whiteouts, opaque directories,
hardlinks), then composefs's OCI transform (root metadata from /usr, /run emptied,
only security.capability kept).  Shares no code with cfsd."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

Node = dict[str, Any]


def _norm(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return parts


def _blob(layout: Path, digest: str) -> bytes:
    alg, hx = digest.split(":")
    return (layout / "blobs" / alg / hx).read_bytes()


def merged_tree(layout: Path, manifest_digest: str) -> Node:
    """The merged tree: nested dicts {"kind", "meta", "children"|"data"/...}."""
    manifest = json.loads(_blob(layout, manifest_digest))
    root: Node = {"kind": "dir", "meta": (0, 0, 0, 0), "children": {}, "xattrs": {}}
    for layer in manifest["layers"]:
        data = _blob(layout, layer["digest"])
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                _apply(root, m, tf)
    usr = root["children"]["usr"]
    root["meta"] = usr["meta"]
    root["xattrs"] = dict(usr["xattrs"])
    run = root["children"].get("run")
    if run is not None and run["kind"] == "dir":
        run["children"] = {}
        run["meta"] = run["meta"][:3] + (usr["meta"][3],)
    _filter_xattrs(root)
    return root


def _filter_xattrs(node: Node) -> None:
    node["xattrs"] = {k: v for k, v in node["xattrs"].items() if k == "security.capability"}
    for child in node.get("children", {}).values():
        if child["kind"] == "dir":
            _filter_xattrs(child)
        elif "xattrs" in child:
            child["xattrs"] = {k: v for k, v in child["xattrs"].items()
                               if k == "security.capability"}


def _lookup(root: Node, parts: list[str]) -> Node:
    node = root
    for p in parts:
        node = node["children"][p]
    return node


def _apply(root: Node, m: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
    parts = _norm(m.name)
    meta = (m.mode & 0o7777, m.uid, m.gid, int(m.mtime))
    xattrs = {k[len("SCHILY.xattr."):]: v for k, v in m.pax_headers.items()
              if k.startswith("SCHILY.xattr.")}
    if not parts:
        root["meta"] = meta
        root["xattrs"] = xattrs
        return
    parent = _lookup(root, parts[:-1])
    name = parts[-1]
    if name == ".wh..wh..opq":
        parent["children"] = {}
        return
    if name.startswith(".wh."):
        parent["children"].pop(name[4:], None)
        return
    if m.isdir():
        old = parent["children"].get(name)
        if old is not None and old["kind"] == "dir":
            old["meta"] = meta
            old["xattrs"] = xattrs
            return
        parent["children"][name] = {"kind": "dir", "meta": meta, "children": {},
                                    "xattrs": xattrs}
        return
    if m.islnk():
        target = _lookup(root, _norm(m.linkname))
        parent["children"][name] = target
        return
    inode: Node = {"meta": meta, "xattrs": xattrs}
    if m.isreg():
        f = tf.extractfile(m)
        assert f is not None
        inode.update(kind="reg", data=hashlib.sha256(f.read()).hexdigest())
    elif m.issym():
        inode.update(kind="lnk", data=m.linkname)
    elif m.ischr() or m.isblk():
        inode.update(kind="chr" if m.ischr() else "blk", data=os.makedev(m.devmajor,
                                                                          m.devminor))
    elif m.isfifo():
        inode.update(kind="fifo", data=None)
    else:
        raise AssertionError(f"unexpected member type {m.type!r}")
    parent["children"][name] = inode


def flatten(root: Node) -> dict[str, tuple[Any, ...]]:
    """path -> (kind, mode, uid, gid, mtime, data, inode id) for the reference tree."""
    out: dict[str, tuple[Any, ...]] = {}

    def walk(node: Node, path: str) -> None:
        mode, uid, gid, mtime = node["meta"]
        out[path or "/"] = (node["kind"], mode, uid, gid, mtime,
                            node.get("data"), id(node))
        for name, child in node.get("children", {}).items():
            walk(child, f"{path}/{name}")

    walk(root, "")
    return out


KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "lnk", stat.S_IFCHR: "chr",
         stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo"}


def scan(top: Path) -> dict[str, tuple[Any, ...]]:
    """The same view of a directory on disk (a mount or a checkout)."""
    out: dict[str, tuple[Any, ...]] = {}

    def visit(p: Path, rel: str) -> None:
        st = os.lstat(p)
        kind = KINDS[stat.S_IFMT(st.st_mode)]
        if kind == "reg":
            data: Any = hashlib.sha256(p.read_bytes()).hexdigest()
        elif kind == "lnk":
            data = os.readlink(p)
        elif kind in ("chr", "blk"):
            data = st.st_rdev
        else:
            data = None
        ino = (st.st_dev, st.st_ino) if kind != "dir" else rel
        out[rel or "/"] = (kind, st.st_mode & 0o7777, st.st_uid, st.st_gid, int(st.st_mtime),
                           data, ino)
        if kind == "dir":
            for child in sorted(os.listdir(p)):
                visit(p / child, f"{rel}/{child}")

    visit(top, "")
    return out


def compare(reference: dict[str, tuple[Any, ...]], actual: dict[str, tuple[Any, ...]],
            owners: bool = True) -> list[str]:
    """Differences (empty when equal), hardlink identity compared as groups."""
    problems = []
    if set(reference) != set(actual):
        problems.append(f"paths differ: missing {sorted(set(reference) - set(actual))[:5]}, "
                        f"extra {sorted(set(actual) - set(reference))[:5]}")
    for path in sorted(set(reference) & set(actual)):
        r, a = reference[path], actual[path]
        keep = [0, 1, 4, 5] + ([2, 3] if owners else [])
        if [r[i] for i in keep] != [a[i] for i in keep]:
            problems.append(f"{path}: expected {r[:6]}, got {a[:6]}")
    groups_r: dict[Any, set[str]] = {}
    groups_a: dict[Any, set[str]] = {}
    for path in set(reference) & set(actual):
        if reference[path][0] != "dir":
            groups_r.setdefault(reference[path][6], set()).add(path)
            groups_a.setdefault(actual[path][6], set()).add(path)
    if sorted(map(sorted, groups_r.values())) != sorted(map(sorted, groups_a.values())):
        problems.append("hardlink groups differ")
    return problems
