"""Pinned C composefs outputs for tests/test_composefs_info.py: images, cases and how both
are run.  Run this file to regenerate ``images/`` and ``expected/`` with a C composefs
build (see README.md); the tests import it for the cases and the working directory.

    python3 tests/data/composefs_info/generate.py /path/to/composefs/build/tools
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected"

# (image, dumpfile, extra C mkcomposefs flags); images are built with --from-file
IMAGES = [
    ("basic", "dumps/basic.dump", []),
    ("basic-v1", "dumps/basic.dump", ["--min-version=1", "--max-version=1"]),
    ("whiteouts", "dumps/whiteouts.dump", []),
    ("hardlinks", "dumps/hardlinks.dump", []),
    ("wide", "dumps/wide.dump", ["--min-version=1"]),
    ("special", "../conformance/assets/special.dump", []),
]
NAMES = [n for n, _, _ in IMAGES]

# objects present in basedir/ (empty files); PRIVATE directories are mode 0700 (root's)
BASEDIR = [
    "76/92c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed",
    "04/efaf080f5a3e74e1c29d1ca6a48569382cbbcd324e8d59d2b83ef21c039f00",
    "-",
    "60/c5590f72eef292f9545afc28bf63ca91d2016a0a288f90f9a32f89d3fffcaf",
    "1a/c2798235e55c59f1bd80d18ecffe0e604ff937dd78e20f0cea2e64ba10027a",
    "21/0d12ebebf9e0a19b705ded86ef560231d5892127c78e8fb0f90d8b358c0172",
    "fe/9e625f98701d67ee4490cb918d3fb89154c9cd616bb59af9cd18bb5ed19eb9",
    "fe/not-an-object",
]
PRIVATE = ["76"]

INFO = "composefs-info"
MOUNT = "mount.composefs"
BASE = "--basedir=basedir"


def _cases() -> list[dict]:
    c: list[dict] = []

    def add(name: str, tool: str, *args: str, user: str | None = None) -> None:
        c.append({"name": name, "tool": tool, "args": list(args), "user": user})

    for n in NAMES:
        img = f"{n}.img"
        add(f"ls-{n}", INFO, "ls", img)
        add(f"objects-{n}", INFO, "objects", img)
        add(f"dump-{n}", INFO, "dump", img)
        add(f"missing-{n}", INFO, BASE, "missing-objects", img)
        add(f"measure-{n}", INFO, "measure-file", img)
    add("missing-no-basedir", INFO, "missing-objects", "basic.img")
    add("ls-multi", INFO, "ls", "basic.img", "whiteouts.img", "hardlinks.img")
    add("dump-multi", INFO, "dump", "basic-v1.img", "wide.img")
    add("objects-multi", INFO, "objects", *(f"{n}.img" for n in NAMES))
    add("missing-multi", INFO, "missing-objects", "--basedir", "basedir", "wide.img",
        "basic.img", "whiteouts.img")
    add("filter-ls", INFO, "--filter=dir", "--filter=sym", "--filter=nope", "ls", "basic.img")
    add("filter-dump", INFO, "--filter=dir", "--filter=sym", "dump", "basic.img",
        "hardlinks.img")
    add("filter-objects", INFO, "--filter=z", "objects", "hardlinks.img")
    add("filter-missing", INFO, "--filter=wide", BASE, "missing-objects", "wide.img")
    add("filter-after-command", INFO, "ls", "basic.img", "--filter", "sub")
    add("filter-prefixes", INFO, "--fil=sub", "--base=basedir", "missing-objects", "basic.img")
    add("measure-multi", INFO, "measure-file", "basic.img", "notcfs.img", "wide.img")
    add("double-dash", INFO, "--", "ls", "hardlinks.img")
    add("missing-nobody", INFO, BASE, "missing-objects", "basic.img", user="nobody")
    # errors
    add("err-no-args", INFO)
    add("err-unknown-command", INFO, "foo", "basic.img")
    add("err-no-image", INFO, "ls")
    add("err-no-image-basedir", INFO, BASE, "dump")
    add("err-unrecognized", INFO, "--bogus", "ls", "basic.img")
    add("err-missing-argument", INFO, "ls", "basic.img", "--basedir")
    add("err-invalid-short", INFO, "-x", "ls", "basic.img")
    add("err-ambiguous", INFO, "--=x", "ls", "basic.img")
    add("err-filter-slash", INFO, "--filter=a/b", "ls", "basic.img")
    add("err-filter-before-bogus", INFO, "--filter=a/b", "--bogus", "ls")
    add("err-measure-nothing", INFO, "measure-file")
    add("err-measure-directory", INFO, "measure-file", "basic.img", "adir", "wide.img")
    add("err-measure-missing", INFO, "measure-file", "basic.img", "missing.img")
    add("err-open", INFO, "ls", "missing.img")
    add("err-load-partial", INFO, "ls", "basic.img", "notcfs.img", "wide.img")
    add("err-load-truncated", INFO, "dump", "hardlinks.img", "trunc.img")
    add("err-load-version", INFO, "ls", "badversion.img")
    add("err-load-directory", INFO, "ls", "adir")
    add("err-load-empty", INFO, "dump", "empty.img")
    add("err-load-device", INFO, "ls", "/dev/null")
    add("err-objects-load-before-open", INFO, "objects", "trunc.img", "missing.img")
    add("err-objects-open", INFO, "objects", "basic.img", "missing.img")
    add("err-objects-load", INFO, "objects", "basic.img", "notcfs.img")
    add("err-basedir", INFO, "--basedir=missing-dir", "ls", "basic.img")
    add("err-dash", INFO, "ls", "-")
    # mount.composefs: everything that fails before (or instead of) a mount
    add("mount-no-args", MOUNT)
    add("mount-no-target", MOUNT, "basic.img")
    add("mount-no-basedir", MOUNT, "basic.img", "mnt")
    add("mount-bad-option", MOUNT, "-o", "foo", "basic.img", "mnt")
    add("mount-bad-type", MOUNT, "-t", "ext4", "basic.img", "mnt")
    add("mount-invalid-short", MOUNT, "-x")
    add("mount-help", MOUNT, "-h")
    add("mount-help-first", MOUNT, "-h", "-x")
    add("mount-missing-argument", MOUNT, "-o")
    add("mount-upper-only", MOUNT, "-o", "basedir=basedir,upperdir=adir", "basic.img", "mnt")
    add("mount-missing-image", MOUNT, "-o", "basedir=basedir", "missing.img", "mnt")
    add("mount-empty-basedir", MOUNT, "-o", "basedir=", "basic.img", "mnt")
    add("mount-bad-basedir", MOUNT, "-o", "basedir=basedir::adir", "basic.img", "mnt")
    add("mount-basedir-no-value", MOUNT, "-o", "ro,basedir", "basic.img", "mnt")
    add("mount-not-composefs", MOUNT, "-obasedir=basedir", "notcfs.img", "mnt")
    add("mount-bad-digest", MOUNT, "-o", "basedir=basedir,digest=zz", "basic.img", "mnt")
    add("mount-no-verity", MOUNT, "-o", "basedir=basedir,digest=00", "basic.img", "mnt")
    add("mount-missing-userns", MOUNT, "-o", "basedir=basedir,idmap=missing-ns", "basic.img",
        "mnt")
    add("mount-missing-basedir", MOUNT, "-o", "verity,basedir=missing\\,dir", "basic.img",
        "mnt")
    add("mount-missing-target", MOUNT, "-o", "basedir=basedir", "basic.img", "missing-dir")
    add("mount-not-root", MOUNT, "-o", "basedir=basedir", "basic.img", "mnt", user="nobody")
    return c


CASES = _cases()


def image_bytes(name: str) -> bytes:
    """A pinned image (stored gzip-compressed)."""
    return gzip.decompress((HERE / "images" / f"{name}.img.gz").read_bytes())


def setup_workdir(work: Path) -> None:
    """The directory every case runs in: the images, derived bad files, basedir/, adir/ and
    mnt/, readable by everyone (basedir/76 is root's only)."""
    work.mkdir(parents=True, exist_ok=True)
    for n in NAMES:
        (work / f"{n}.img").write_bytes(image_bytes(n))
    basic = image_bytes("basic")
    (work / "notcfs.img").write_bytes(b"not a composefs image\n" * 300)
    (work / "trunc.img").write_bytes(basic[:8192])
    (work / "badversion.img").write_bytes(basic[:4] + (2).to_bytes(4, "little") + basic[8:])
    (work / "empty.img").write_bytes(b"")
    for d in ("adir", "mnt", "basedir"):
        (work / d).mkdir(exist_ok=True)
    for rel in BASEDIR:
        p = work / "basedir" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    for p in [work, *work.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    for rel in PRIVATE:
        (work / "basedir" / rel).chmod(0o700)


def normalize_c_stderr(text: str) -> str:
    """C's stderr as one-line messages: errx() formats that end in a newline leave a blank
    line, the basedir error has a newline before its reason, measure-file's has none."""
    text = text.replace("`\n: ", "`: ")
    if text.endswith("\n\n"):
        text = text[:-1]
    if text and not text.endswith("\n"):
        text += "\n"
    return text


def expected() -> dict:
    """{case name: {"status": int, "stderr": C's stderr}} (stdout is in expected/NAME)."""
    return json.loads((HERE / "expected.json").read_text())


def expected_stdout(name: str) -> bytes:
    """C's stdout of a case (absent file: empty)."""
    p = EXPECTED / name
    return p.read_bytes() if p.exists() else b""


def _run_c(tools: Path, case: dict, work: Path) -> subprocess.CompletedProcess[bytes]:
    cmd = [case["tool"], *case["args"]]
    exe = str(tools / case["tool"])
    if case["user"] == "nobody":
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", exe,
               *case["args"]]
        exe = shutil.which("setpriv") or "setpriv"
    return subprocess.run(cmd, executable=exe, cwd=work, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=60)


def main(tools: Path) -> None:
    """Build the images with C mkcomposefs and record C's outputs of every case."""
    (HERE / "images").mkdir(exist_ok=True)
    for name, dump, flags in IMAGES:
        with tempfile.TemporaryDirectory() as t:
            out = Path(t) / "img"
            subprocess.run([tools / "mkcomposefs", "--from-file", *flags, HERE / dump, out],
                           check=True)
            (HERE / "images" / f"{name}.img.gz").write_bytes(
                gzip.compress(out.read_bytes(), 9, mtime=0))
    shutil.rmtree(EXPECTED, ignore_errors=True)
    EXPECTED.mkdir()
    results = {}
    with tempfile.TemporaryDirectory(prefix="cinfo-") as t:
        os.chmod(t, 0o755)
        work = Path(t) / "work"
        setup_workdir(work)
        for case in CASES:
            p = _run_c(tools, case, work)
            if p.stdout:
                (EXPECTED / case["name"]).write_bytes(p.stdout)
            results[case["name"]] = {"status": p.returncode, "stderr": p.stderr.decode()}
    (HERE / "expected.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
