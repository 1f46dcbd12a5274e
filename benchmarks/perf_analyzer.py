"""Triton's ``perf_analyzer`` for ``make bench``, installed into ``.bench/perf_analyzer/`` on first
use, nothing system-wide.

PyPI's ``perf-analyzer`` 2.60 wheel (``manylinux_2_38``) needs glibc 2.38 and libstdc++ of GCC 13+;
Debian 12 has 2.36 and GCC 12 (a plain ``pip install perf-analyzer`` quietly gives a 0.1.0
placeholder there). So the real wheel is fetched by its platform tag, and libc6, libstdc++6 and
libgcc-s1 from Debian 13's archive are unpacked beside it; the binary runs under that loader:
``ld-linux-x86-64.so.2 --library-path <those libs>:<the system's> perf_analyzer …``. Where a
step fails (no network, another architecture) ``command()`` returns None and says what is
missing: the benchmark then skips perf_analyzer's lines.

    python -m benchmarks.perf_analyzer    # install (if needed) and print the command prefix
"""

from __future__ import annotations

import hashlib
import lzma
import platform
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / ".bench" / "perf_analyzer"
VERSION = "2.60.0"
DEBIAN = "http://deb.debian.org/debian"
PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")  # from Debian 13 (trixie)


def _libs() -> Path:
    return HOME / "libs" / "usr" / "lib" / "x86_64-linux-gnu"


def _binary() -> Path:
    return HOME / "wheel" / "perf_analyzer" / "bin" / "perf_analyzer"


def _prefix() -> list[str]:
    libs = _libs()
    return [
        str(libs / "ld-linux-x86-64.so.2"),
        "--library-path",
        f"{libs}:/lib/x86_64-linux-gnu",
        str(_binary()),
    ]


def _works() -> bool:
    if not _binary().exists() or not _libs().exists():
        return False
    out = subprocess.run([*_prefix(), "--version"], capture_output=True, text=True)
    return out.returncode != 127 and "not found" not in out.stderr  # the loader found its libraries


def _debian_files() -> dict[str, tuple[str, str]]:
    """package -> (pool path, sha256) from trixie's Packages index."""
    with urllib.request.urlopen(f"{DEBIAN}/dists/trixie/main/binary-amd64/Packages.xz", timeout=60) as r:
        text = lzma.decompress(r.read()).decode()
    found: dict[str, tuple[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Package") in PACKAGES and fields.get("Architecture") == "amd64":
            found[fields["Package"]] = (fields["Filename"], fields["SHA256"])
    return found


def install() -> None:
    if platform.machine() != "x86_64":
        raise RuntimeError(f"perf_analyzer's wheels here are for x86_64, not {platform.machine()}")
    shutil.rmtree(HOME, ignore_errors=True)
    (HOME / "debs").mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux_2_38_x86_64",
            "--python-version",
            "3.11",
            f"perf-analyzer=={VERSION}",
            "-d",
            str(HOME),
        ],
        check=True,
    )
    wheel = next(HOME.glob("perf_analyzer-*.whl"))
    shutil.unpack_archive(wheel, HOME / "wheel", "zip")
    _binary().chmod(0o755)
    for package, (path, sha256) in _debian_files().items():
        deb = HOME / "debs" / Path(path).name
        with urllib.request.urlopen(f"{DEBIAN}/{path}", timeout=120) as r:
            data = r.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{package}: checksum mismatch")
        deb.write_bytes(data)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(HOME / "libs")], check=True)


def command() -> list[str] | None:
    """The perf_analyzer command prefix, installing it when needed; None (said why) if not."""
    if _works():
        return _prefix()
    try:
        install()
    except Exception as exc:  # a benchmark extra: say what is missing and go on
        print(f"perf_analyzer unavailable ({exc}); its lines are skipped", file=sys.stderr)
        return None
    return _prefix() if _works() else None


if __name__ == "__main__":
    print(" ".join(command() or ["unavailable"]))
