"""cfsctl as people expect it (issue 14), table-driven, through a real daemon and through the
embedded default: one option model, one error style, --json everywhere, pipes, Ctrl-C,
progress, help, man pages, completion, daemon logs, README and .ci/run."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cfsctl import progress
from cfsctl.main import build_parser
from cfsctl.output import JSON_SHAPES, check_shape
from tests.conftest import ROOT, Daemon, run_cfsctl, wait_for_socket
from tests.ocitools import Registry, build_image, descriptor, read_json_blob, require_tools

MANY = 3000                 # files of the "many" image: dumpfile and object list > 64 KiB
MODES = ["daemon", "embedded"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout with tags base (1 layer), many (+1 layer of MANY small files) and big
    (+48 MiB of random data, for an interrupted pull)."""
    require_tools("umoci")
    lay = tmp_path_factory.mktemp("ux") / "layout"
    build_image(lay, "base", {"usr/bin/tool": b"t" * 5000, "etc/os-release": b"ID=ux\n"})

    def many(root: Path) -> None:
        d = root / "usr/share/many"
        d.mkdir(parents=True)
        for i in range(MANY):
            (d / f"f{i:05d}").write_bytes(f"{i:08d}".encode() * 25)

    build_image(lay, "many", {}, base="base", customize=many)
    build_image(lay, "big", {"usr/lib/big": os.urandom(48 << 20)}, base="base")
    return lay


def diff_ids(lay: Path, tag: str) -> list[str]:
    manifest = read_json_blob(lay, descriptor(lay, tag)["digest"])
    return list(read_json_blob(lay, manifest["config"]["digest"])["rootfs"]["diff_ids"])


def layer_digests(lay: Path, tag: str) -> list[str]:
    return [x["digest"] for x in read_json_blob(lay, descriptor(lay, tag)["digest"])["layers"]]


@dataclass
class Env:
    """One way of reaching cfsd (a real daemon, or the embedded default) and a repository
    holding base and many."""

    mode: str
    address: str | None
    repo: str
    tmp: Path
    layout: Path
    daemon: Daemon | None

    def cfs(self, *args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
        return run_cfsctl(*args, address=self.address, check=False, **kw)  # type: ignore[arg-type]

    def ok(self, *args: str, **kw: object) -> str:
        p = self.cfs(*args, **kw)
        assert p.returncode == 0, (args, p.stderr.decode())
        return p.stdout.decode()


@pytest.fixture(scope="module", params=MODES)
def env(request: pytest.FixtureRequest, layout: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp(request.param)
    daemon = request.getfixturevalue("shared_daemon") if request.param == "daemon" else None
    e = Env(request.param, daemon.address if daemon else None, str(tmp / "repo"), tmp, layout,
            daemon)
    e.ok("--repo", e.repo, "init", "--insecure")
    for tag in ("base", "many"):
        e.ok("--repo", e.repo, "oci", "pull", "-q", f"oci:{layout}:{tag}", tag)
    (tmp / "file").write_bytes(b"not a directory")
    yield e


def fill(args: list[str], e: Env) -> list[str]:
    return [a.format(repo=e.repo, tmp=e.tmp, layout=e.layout) for a in args]


# --------------------------------------------------------------------------- errors

R = ["--repo", "{repo}"]
NOPE_OCI = r"^Error: no such image: nope \(list them with: cfsctl --repo \S+ oci images\)$"
ERRORS = [
    # one cause, one message, whichever command
    ("inspect", [*R, "oci", "inspect", "nope"], 1, NOPE_OCI),
    ("compute-id", [*R, "oci", "compute-id", "nope"], 1, NOPE_OCI),
    ("untag", [*R, "oci", "untag", "nope"], 1, NOPE_OCI),
    ("checkout", [*R, "oci", "checkout", "nope", "{tmp}/co-nope"], 1, NOPE_OCI),
    ("dump", [*R, "oci", "dump", "nope"], 1, NOPE_OCI),
    ("oci-fsck", [*R, "oci", "fsck", "nope"], 1, NOPE_OCI),
    ("create-delta", [*R, "oci", "create-delta", "nope", "base", "{tmp}/d.tar"], 1, NOPE_OCI),
    ("image-objects", [*R, "image-objects", "nope"], 1,
     r"^Error: no such image: nope \(list them with: cfsctl --repo \S+ images\)$"),
    ("no-layer", [*R, "oci", "layer", "--json", "sha256:" + "1" * 64], 1,
     r"^Error: no such layer: sha256:1{64} \(give a diff_id, .*\)$"),
    ("no-repo", ["--repo", "{tmp}/missing", "fsck"], 1,
     r"^Error: repository \S+/missing does not exist \(create it with: cfsctl --repo "
     r"\S+/missing init\)$"),
    ("init-file", ["init", "{tmp}/file"], 1, r"^Error: .*\S+/file: Not a directory$"),
    ("repo-file", ["--repo", "{tmp}/file", "gc"], 1, r"^Error: .*\S+/file: Not a directory$"),
    ("hash", ["--hash", "sha256", *R, "gc"], 1,
     r"^Error: repository is configured for sha512 \(from meta.json\) but --hash sha256"),
    ("multi-image", [*R, "oci", "pull", "oci:{layout}"], 1,
     r"^Error: oci:\S+: more than one image in oci, choose an image \(oci:\S+:TAG or @DIGEST\)$"),
    ("gc-root", [*R, "gc", "--root", "nope"], 1,
     r"^Error: gc: --root nope: no image or stream of that name \(.*\)$"),
    ("bootable", [*R, "create-image", "--bootable", "{tmp}"], 1,
     r"^Error: --bootable: boot transforms are not supported by cfsd$"),
    ("connect", ["--address", "unix:/nonexistent/sock", "gc"], 1,
     r"^Error: cannot connect to cfsd at unix:/nonexistent/sock: No such file or directory "
     r"\(is cfsd running\?.*\)$"),
    # usage errors: exit 2, argparse's format
    ("algorithm", ["init", "--algorithm", "sha999", "{tmp}/alg"], 2,
     r"^cfsctl init: error: argument --algorithm: invalid algorithm 'sha999': expected "
     r"sha256, sha512"),
    ("platform", [*R, "oci", "pull", "--platform", "foo", "oci:{layout}:base"], 2,
     r"^cfsctl oci pull: error: argument --platform: invalid platform 'foo'"),
    ("repo-init-other", [*R, "init", "{tmp}/other"], 2,
     r"^cfsctl init: error: --repo \S+ and PATH \S+ name different repositories"),
    ("twice", [*R, "gc", "--repo", "{tmp}/x"], 2,
     r"argument --repo: given twice with different values"),
    ("selectors", [*R, "gc", "--user"], 2, r"argument --user: not allowed with argument --repo"),
    ("gc-root-path", [*R, "gc", "--root", "refs/x"], 2, r"a root is an image id or a stream"),
    ("layer-dumpfile-json", [*R, "oci", "layer", "--dumpfile", "--json", "sha256:" + "1" * 64],
     2, r"--dumpfile and --json exclude each other"),
    ("unknown", ["frobnicate"], 2, r"invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_error_style(env: Env, case: tuple[str, list[str], int, str]) -> None:
    _, args, status, pattern = case
    p = env.cfs(*fill(args, env))
    err = p.stderr.decode()
    lines = err.splitlines()
    assert p.returncode == status, err
    assert "Traceback" not in err and "NoSuch" not in err and "DiffIdMismatch" not in err
    if status == 1:        # exactly one line: Error: <what>: <why> (hint)
        assert len(lines) == 1 and lines[0].startswith("Error: "), err
    else:                  # usage errors: usage line(s), then prog: error: ...
        assert lines[0].startswith("usage: "), err
    assert re.search(pattern, lines[-1]), err
    if case[0] == "repo-init-other":
        assert not Path(env.tmp, "other").exists()     # nothing initialised silently


def test_diff_id_mismatch_is_readable(env: Env) -> None:
    tar = subprocess.run(["tar", "cf", "-", "-C", str(ROOT), "README.md"], check=True,
                         capture_output=True).stdout
    p = env.cfs("--repo", env.repo, "oci", "import-layer", "sha256:" + "0" * 64, input=tar)
    assert p.returncode == 1
    assert re.fullmatch(r"Error: import-layer: layer content does not match its diff_id: "
                        r"expected sha256:0{64}, got sha256:[0-9a-f]{64}\n", p.stderr.decode())


# --------------------------------------------------------------------------- option model


def test_global_options_are_honoured_everywhere(env: Env) -> None:
    t = env.tmp
    env.ok("--hash", "sha256", "init", "--insecure", str(t / "h1"))
    env.ok("init", str(t / "h2"), "--insecure", "--hash", "sha256")
    env.ok("init", str(t / "h3"), "--insecure", "--algorithm", "sha256")
    for name in ("h1", "h2", "h3"):
        assert json.loads((t / name / "meta.json").read_text())["algorithm"] == \
            "fsverity-sha256-12", name
    env.ok("--erofs-version", "2", "init", "--insecure", str(t / "e1"))
    env.ok("init", "--insecure", str(t / "e2"), "--erofs-version", "2")
    for name in ("e1", "e2"):
        assert json.loads((t / name / "meta.json").read_text())["erofs_formats"] == \
            {"default": 2}
    p = env.cfs("init", "--insecure", "--hash", "sha512", "--algorithm", "sha256",
                str(t / "h4"))
    assert p.returncode == 2 and "disagree" in p.stderr.decode()
    # before, after the command, after oci: the same listing
    want = env.ok("--repo", env.repo, "oci", "images")
    assert env.ok("oci", "images", "--repo", env.repo) == want
    assert env.ok("oci", "--repo", env.repo, "images") == want
    assert env.ok("--repo", env.repo, "init", env.repo, "--insecure").startswith(
        "Repository already initialized")


# --------------------------------------------------------------------------- JSON


def _json_commands(e: Env) -> list[tuple[str, list[str], bytes | None]]:
    """(JSON_SHAPES key, arguments, stdin) for every command with a JSON result."""
    t, r, lay = e.tmp, ["--repo", e.repo], e.layout
    base = descriptor(lay, "base")["digest"]
    rootfs = t / "rootfs"
    (rootfs / "usr/bin").mkdir(parents=True, exist_ok=True)
    (rootfs / "usr/bin/hello").write_bytes(b"hello" * 100)
    tar = subprocess.run(["tar", "cf", "-", "-C", str(ROOT), "pyproject.toml"], check=True,
                         capture_output=True).stdout
    import hashlib
    image_id = e.ok(*r, "oci", "compute-id", "base").strip()
    fresh = str(t / "json-fresh")
    e.ok("--repo", fresh, "init", "--insecure")
    e.ok("--repo", fresh, "oci", "pull", "-q", f"oci:{lay}:base", "base")
    delta = str(t / "json-delta.tar")
    return [
        ("init", ["init", "--insecure", str(t / "json-init")], None),
        ("cat", [*r, "cat", f"oci-layer-{diff_ids(lay, 'base')[0]}"], None),
        ("fsck", [*r, "fsck"], None),
        ("gc", [*r, "gc", "--dry-run"], None),
        ("create-image", [*r, "create-image", str(rootfs), "json-img"], None),
        ("images", [*r, "images"], None),
        ("image-objects", [*r, "image-objects", "refs/json-img"], None),
        ("compute-id", [*r, "compute-id", str(rootfs)], None),
        ("create-dumpfile", [*r, "create-dumpfile", str(rootfs)], None),
        ("dump-files", [*r, "dump-files", "refs/json-img", "/usr/bin/hello"], None),
        ("oci import-layer", [*r, "oci", "import-layer",
                              "sha256:" + hashlib.sha256(tar).hexdigest()], tar),
        ("oci pull", [*r, "oci", "pull", f"oci:{lay}:base", "json-pulled"], None),
        ("oci images", [*r, "oci", "images"], None),
        ("oci inspect", [*r, "oci", "inspect", "base"], None),
        ("oci copy", ["--repo", str(t / "json-copy"), "oci", "copy", "base", "--from",
                      e.repo], None),
        ("oci tag", [*r, "oci", "tag", base, "json-tag"], None),
        ("oci untag", [*r, "oci", "untag", "json-tag"], None),
        ("oci layer", [*r, "oci", "layer", diff_ids(lay, "base")[0]], None),
        ("oci compute-id", [*r, "oci", "compute-id", "base"], None),
        ("oci dump", [*r, "oci", "dump", "base"], None),
        ("oci checkout", [*r, "oci", "checkout", "base", str(t / "json-co")], None),
        ("oci fsck", [*r, "oci", "fsck"], None),
        ("oci create-delta", [*r, "oci", "create-delta", "base", "many", delta], None),
        ("oci apply-delta", ["--repo", fresh, "oci", "apply-delta", f"oci-archive:{delta}",
                             "many"], None),
        ("completion", ["completion", "bash"], None),
        ("image-objects", [*r, "image-objects", image_id], None),
    ]


def test_json_on_every_command(env: Env) -> None:
    Path(env.tmp, "json-copy").mkdir(exist_ok=True)
    env.ok("--repo", str(env.tmp / "json-copy"), "init", "--insecure")
    seen = set()
    for i, (key, args, stdin) in enumerate(_json_commands(env)):
        # --json before the command, or after it: the same meaning
        argv = ["--json", *args] if i % 2 else [*args, "--json"]
        p = env.cfs(*argv, input=stdin)
        assert p.returncode == 0, (argv, p.stderr.decode())
        doc = json.loads(p.stdout)          # exactly one JSON document
        check_shape(doc, JSON_SHAPES[key])
        seen.add(key)
        if key in ("oci pull", "oci apply-delta"):
            assert all(isinstance(v, int) for k, v in doc["stats"].items() if k != "summary")
    mounts = {"mount", "oci mount"}           # need root and a kernel that mounts composefs
    assert seen == set(JSON_SHAPES) - mounts


def _commands(parser: argparse.ArgumentParser,
              prefix: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix}{name} ")
    if prefix:
        yield prefix.strip(), parser


def test_every_command_has_a_json_shape() -> None:
    c_tools = {"mkcomposefs", "composefs-info", "mount.composefs"}
    names = {n for n, _ in _commands(build_parser())} - c_tools - {"oci", "list-images"}
    assert names == set(JSON_SHAPES)


# --------------------------------------------------------------------------- pipes, Ctrl-C


@pytest.mark.parametrize("what", ["dump", "json-dump", "image-objects", "dump-files"])
def test_closed_pipe_ends_quietly(env: Env, what: str) -> None:
    ident = env.ok("--repo", env.repo, "oci", "compute-id", "many").strip()
    args = {"dump": ["oci", "dump", "many"], "json-dump": ["--json", "oci", "dump", "many"],
            "image-objects": ["image-objects", ident],
            "dump-files": ["dump-files", ident, *[f"/usr/share/many/f{i:05d}"
                                                   for i in range(MANY)]]}[what]
    e = dict(os.environ, XDG_RUNTIME_DIR="/nonexistent")
    e.pop("CFSD_ADDRESS", None)
    if env.address:
        e["CFSD_ADDRESS"] = env.address
    p = subprocess.Popen([sys.executable, "-m", "cfsctl", "--repo", env.repo, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, cwd=ROOT)
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline()           # `| head -1`
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(60) == -signal.SIGPIPE, err        # the shell shows 141, as for C tools
    assert err == ""


def test_ctrl_c_during_a_pull(env: Env) -> None:
    repo = str(env.tmp / "interrupted")
    env.ok("--repo", repo, "init", "--insecure")
    e = dict(os.environ, XDG_RUNTIME_DIR="/nonexistent")
    e.pop("CFSD_ADDRESS", None)
    if env.address:
        e["CFSD_ADDRESS"] = env.address
    # its own session, as a shell job: the terminal's SIGINT goes to the whole group
    p = subprocess.Popen([sys.executable, "-m", "cfsctl", "--repo", repo, "oci", "pull",
                          f"oci:{env.layout}:big", "big"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=e, cwd=ROOT, start_new_session=True)
    assert p.stderr is not None
    err = b""
    while b"downloading" not in err:
        chunk = os.read(p.stderr.fileno(), 4096)
        assert chunk, err
        err += chunk
    os.killpg(p.pid, signal.SIGINT)
    out, rest = p.communicate(timeout=60)
    err += rest
    assert p.returncode == 130, err
    assert err.decode().splitlines()[-1] == "Error: interrupted"
    assert b"Traceback" not in err
    assert json.loads(env.ok("--repo", repo, "--json", "oci", "images")) == {"images": []}
    if env.daemon is not None:
        assert env.daemon.alive() and b"Traceback" not in env.daemon.log.read_bytes()


def test_private_daemon_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    from cfsctl.client import Client
    ours, theirs = socket.socketpair()
    d = subprocess.Popen([sys.executable, "-m", "cfsd", "--connection-fd",
                          str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                         stderr=subprocess.PIPE, cwd="/")
    theirs.close()
    assert Client(ours).call("org.varlink.service.GetInfo")["product"] == "cfsd"   # serving
    d.send_signal(signal.SIGINT)
    _, err = d.communicate(timeout=30)
    ours.close()
    assert d.returncode == 0 and b"Traceback" not in err, err


# --------------------------------------------------------------------------- listings


def test_listings(env: Env) -> None:
    r = ["--repo", env.repo]
    text = env.ok(*r, "images", "--filter", "no-such-name")
    assert text == "No images found\n"
    p = env.cfs("--repo", str(env.tmp / "h-only-oci"), "init", "--insecure")
    assert p.returncode == 0
    only = ["--repo", str(env.tmp / "h-only-oci")]
    env.ok(*only, "oci", "pull", "-q", f"oci:{env.layout}:base", "base")
    assert env.ok(*only, "images") == (f"No images found\n(1 OCI image: cfsctl --repo "
                                       f"{env.tmp / 'h-only-oci'} oci images)\n")
    names = [i["name"] for i in json.loads(env.ok(*r, "--json", "oci", "images",
                                                  "--filter", "an"))["images"]]
    assert names == ["many"]              # a substring, not a prefix
    dry = env.ok(*r, "gc", "--dry-run")
    assert dry.startswith("Dry run (no files deleted):\nObjects: ") and "would be removed" in dry
    assert " removed (" not in dry.replace("would be removed (", "")
    layer = f"oci-layer-{diff_ids(env.layout, 'base')[0]}"
    assert env.ok(*r, "gc", "--dry-run", "--root", layer).startswith("Dry run")


def test_layer_by_manifest_digest(env: Env) -> None:
    r = ["--repo", env.repo]
    diff_id = diff_ids(env.layout, "many")[-1]
    digest = layer_digests(env.layout, "many")[-1]
    assert digest != diff_id
    assert env.cfs(*r, "oci", "layer", digest).stdout == \
        env.cfs(*r, "oci", "layer", diff_id).stdout
    assert json.loads(env.ok(*r, "oci", "layer", "--json", digest))["diffId"] == diff_id


# --------------------------------------------------------------------------- progress


def test_progress_lines_when_piped(env: Env) -> None:
    repo = str(env.tmp / "progress")
    env.ok("--repo", repo, "init", "--insecure")
    p = env.cfs("--repo", repo, "oci", "pull", f"oci:{env.layout}:base", "base")
    q = env.cfs("--repo", repo, "oci", "pull", f"oci:{env.layout}:many", "many")
    assert p.returncode == 0 and q.returncode == 0
    base_id, many_id = diff_ids(env.layout, "many")
    err = p.stderr.decode() + q.stderr.decode()
    assert re.search(rf"^layer {base_id}: downloading [0-9.]+ (B|KiB|MiB) \(compressed\)$",
                     err, re.M), err
    for text in (f"layer {base_id}: stored", f"layer {base_id}: already present",
                 f"layer {many_id}: stored"):
        assert text in err.splitlines(), err
    labels = set(re.findall(r"^layer (\S+):", err, re.M))
    assert labels == {base_id, many_id}         # layers are named by diff_id, always
    assert env.cfs("--repo", repo, "-q", "oci", "pull", f"oci:{env.layout}:base",
                   "again").stderr == b""
    d = env.cfs("--repo", env.repo, "oci", "create-delta", "base", "many",
                str(env.tmp / "progress.tar"))
    assert d.returncode == 0
    assert "Building data source from the old image" in d.stderr.decode()
    assert "create-delta: 1/1 layers" in d.stderr.decode().splitlines()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_silent_phases_show_progress(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.2)
    monkeypatch.setattr(progress, "TTY_AFTER", 0.1)
    out = _Tty() if tty else io.StringIO()
    view = progress.ProgressView("gc", stream=out)
    time.sleep(1.5)
    view.close()
    text = out.getvalue()
    if tty:
        assert re.search(r"\r\x1b\[2K[|/\-\\] gc \(\d+ s\)", text) and text.endswith("\x1b[2K")
    else:
        assert "gc: still working (" in text and "\x1b" not in text
    quiet = io.StringIO()
    view = progress.ProgressView("gc", stream=quiet, quiet=True)
    time.sleep(0.5)
    view.event({"message": "hello"})
    view.close()
    assert quiet.getvalue() == ""


def test_progress_labels() -> None:
    out = io.StringIO()
    view = progress.ProgressView("pull", stream=out)
    d = "sha256:" + "a" * 64
    for frame in ({"started": {"id": d, "total": 2048, "unit": "Bytes"}},
                  {"progress": {"id": d, "fetched": 1024, "total": 2048}},
                  {"done": {"id": d, "transferred": 2048}}, {"skipped": {"id": d}},
                  {"message": f"{d}: tar-diff of 5 bytes"}):
        view.event(frame)
    view.close()
    assert out.getvalue().splitlines() == [
        f"layer {d}: downloading 2.0 KiB (compressed)", f"layer {d}: stored",
        f"layer {d}: already present", f"layer {d}: tar-diff of 5 bytes"]


# --------------------------------------------------------------------------- help, man


HIDDEN = {"--bootable", "--expected-digest", "--local-fetch"}   # not offered (cannot work)


def _options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for name, p in [("cfsctl", parser), *_commands(parser)]:
        for action in p._actions:
            if not isinstance(action, argparse._SubParsersAction):
                yield name, action


def test_every_option_has_help() -> None:
    from cfsd.service.main import build_parser as cfsd_parser
    for name, action in [*_options(build_parser()), *_options(cfsd_parser())]:
        if action.help == argparse.SUPPRESS:
            flags = set(action.option_strings)
            global_copy = name != "cfsctl" and action.default == argparse.SUPPRESS
            assert flags & HIDDEN or global_copy or flags == {"--connection-fd"}, \
                (name, action)
        elif "-h" not in action.option_strings:
            assert action.help and action.help.strip(), (name, action.option_strings,
                                                         action.dest)


def test_help_lists_tools_and_hides_what_cannot_work() -> None:
    text = run_cfsctl("--help").stdout.decode()
    for tool in ("mkcomposefs", "composefs-info", "mount.composefs", "completion"):
        assert re.search(rf"^    {re.escape(tool)} ", text, re.M), tool
    scripts = [run_cfsctl("completion", s).stdout.decode() for s in ("bash", "zsh", "fish")]
    pages = [(ROOT / "man" / n).read_text() for n in ("cfsctl.1", "cfsd.1")]
    for name, _ in _commands(build_parser()):
        if name in ("mkcomposefs", "composefs-info", "mount.composefs"):
            continue
        page = run_cfsctl(*name.split(), "--help").stdout.decode()
        for flag in HIDDEN:
            assert flag not in page, (name, flag)
    for text in [*scripts, *pages]:
        for flag in HIDDEN:
            assert flag.replace("-", "\\-") not in text and flag not in text


def test_completion_scripts() -> None:
    bash = run_cfsctl("completion", "bash").stdout
    p = subprocess.run(["bash", "-n"], input=bash, capture_output=True)
    assert p.returncode == 0, p.stderr
    assert b"create-delta" in bash and b"--tls-verify" in bash
    for shell in ("zsh", "fish"):
        assert b"create-delta" in run_cfsctl("completion", shell).stdout
    assert run_cfsctl("completion", "tcsh", check=False).returncode == 2


def test_man_pages_are_current_and_render() -> None:
    pytest.importorskip("argparse_manpage")
    p = subprocess.run([sys.executable, str(ROOT / "man" / "generate.py"), "--check"],
                       capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    if shutil.which("man") is None:
        pytest.skip("man is not installed (.ci/run installs man-db)")
    for name, heading in (("cfsctl.1", "JSON OUTPUT"), ("cfsd.1", "LOGGING")):
        e = dict(os.environ, MANWIDTH="80")
        e.pop("MAN_KEEP_FORMATTING", None)
        r = subprocess.run(["man", "-l", str(ROOT / "man" / name)], capture_output=True, env=e)
        text = re.sub(rb".\x08", b"", r.stdout)        # overstrike bold, if any
        assert r.returncode == 0 and heading.encode() in text, r.stderr
        assert b"warning" not in r.stderr.lower(), r.stderr


# --------------------------------------------------------------------------- daemon logs


def _daemon_log(tmp: Path, *args: str, env: dict[str, str] | None = None,
                journal: bool = False, work: object = None) -> str:
    log = tmp / f"cfsd-{len(list(tmp.glob('cfsd-*')))}.log"
    sock = tmp / f"{log.stem}.sock"
    with open(log, "wb") as f:
        e = dict(os.environ)
        e.pop("JOURNAL_STREAM", None)
        e.update(env or {})
        if journal:
            st = os.fstat(f.fileno())
            e["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        d = subprocess.Popen([sys.executable, "-m", "cfsd", "--address", f"unix:{sock}",
                              *args], stderr=f, env=e, cwd="/")
        try:
            wait_for_socket(str(sock), d)
            if callable(work):
                work(f"unix:{sock}")
        finally:
            d.send_signal(signal.SIGTERM)
            d.wait(30)
    return log.read_text()


def test_daemon_logs(tmp_path: Path) -> None:
    plain = _daemon_log(tmp_path, "--log-level", "info")
    assert re.search(r"^cfsd: listening on unix:\S+$", plain, re.M) and "<" not in plain
    journal = _daemon_log(tmp_path, "--log-level", "info", journal=True)
    assert re.search(r"^<6>cfsd: listening on unix:", journal, re.M)
    # JOURNAL_STREAM naming another file (inherited by a child of a service): plain
    other = _daemon_log(tmp_path, env={"JOURNAL_STREAM": "1:2"})
    assert "<6>" not in other


def test_registry_requests_log_at_debug(tmp_path: Path, layout: Path) -> None:
    require_tools("docker-registry", "skopeo")
    reg = Registry()
    try:
        reg.push(f"oci:{layout}:base", "ux:base")
        src = f"docker://{reg.host}/ux:base"
        repo = str(tmp_path / "repo")

        def pull(address: str) -> None:
            run_cfsctl("--repo", repo, "init", "--insecure", address=address)
            run_cfsctl("--repo", repo, "oci", "pull", "-q", "--tls-verify=false", src,
                       address=address)

        info = _daemon_log(tmp_path, "--log-level", "info", work=pull)
        assert "HTTP Request" not in info, info
        shutil.rmtree(repo)
        debug = _daemon_log(tmp_path, "--log-level", "debug", work=pull)
        assert re.search(r"^httpx: debug: HTTP Request: GET http://", debug, re.M), debug
        # plain HTTP without --tls-verify=false: why, and what to do
        p = run_cfsctl("--repo", repo, "oci", "pull", src, check=False)
        err = p.stderr.decode()
        assert p.returncode == 1 and err.count("\n") == 1 and err.startswith("Error: ")
        assert "--tls-verify=false" in err, err
    finally:
        reg.stop()


# --------------------------------------------------------------------------- set-up


def test_readme_says_how_to_get_cfsctl_and_what_keep_does() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme and ".venv/bin" in readme
    assert re.search(r"`\.ci/run demo --keep` keeps the demo's work directory", readme)


def test_ci_run_says_usage_before_installing() -> None:
    p = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "foo"], capture_output=True,
                       timeout=60)
    assert p.returncode == 2 and p.stdout == b""        # nothing installed, nothing said
    assert p.stderr.decode().startswith("usage: .ci/run [test|demo]")
    assert "man-db" in (ROOT / ".ci" / "run").read_text()
