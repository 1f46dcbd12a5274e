"""The model repository on disk: whole versions or none, also when a publisher is killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading

import httpx

from service.registry.store import SPEC_FILE, STAGING, WEIGHTS_FILE, ModelStore
from tests.helpers import SPECS, LiveServer, random_weights, upload_files


def test_write_version_numbers_versions_and_writes_both_files(tmp_path):
    store = ModelStore(tmp_path)
    assert [store.write_version("p", {"a": i}, b"w%d" % i) for i in range(3)] == [1, 2, 3]
    assert store.versions("p") == [1, 2, 3]
    assert store.read_spec_json("p", 2) == {"a": 1} and store.read_weights("p", 3) == b"w2"
    assert list((tmp_path / STAGING).iterdir()) == []  # nothing left behind


def test_concurrent_publishers_never_share_a_number(tmp_path):
    store = ModelStore(tmp_path)
    got: list[int] = []
    threads = [
        threading.Thread(target=lambda i=i: got.append(store.write_version("p", {"i": i}, b"x")))
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 17))
    assert sorted(store.read_spec_json("p", v)["i"] for v in got) == list(range(16))


def test_sweep_removes_a_dead_publishers_staging_and_empty_versions_only(tmp_path):
    store = ModelStore(tmp_path)
    store.write_version("p", {"a": 1}, b"w")
    host = socket.gethostname()
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    dead = tmp_path / STAGING / f"{host}-{dead_pid}-abc"
    live = tmp_path / STAGING / f"{host}-{os.getpid()}-def"  # a publisher of this live process
    other_host = tmp_path / STAGING / f"elsewhere-{dead_pid}-ghi"  # can't tell: left alone
    for d in (dead, live, other_host):
        d.mkdir(parents=True)
        (d / WEIGHTS_FILE).write_bytes(b"w")
    (tmp_path / "p" / "2").mkdir()  # an empty version directory (the old publisher's crash)
    removed = store.sweep()
    assert sorted(removed) == sorted([f"{STAGING}/{dead.name}", "p/2"])
    assert live.exists() and other_host.exists() and not dead.exists()
    assert store.versions("p") == [1]
    other_host_old = store.sweep(max_age_s=-1)  # anyone's staging older than max_age_s goes
    assert f"{STAGING}/{other_host.name}" in other_host_old


def test_killing_the_server_during_uploads_leaves_only_whole_versions(model_dir, tmp_path):
    """SIGKILL a real server in the middle of a burst of uploads; the next start serves every
    version it lists and leaves no staging behind."""
    spec = SPECS["q"]
    weights = random_weights(spec)
    server = LiveServer.serving(model_dir, tmp_path)
    published = threading.Event()
    stop = threading.Event()

    def burst() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/policies/burst/versions", files=upload_files(spec, weights))
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 201:
                    published.set()

    threads = [threading.Thread(target=burst) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        assert published.wait(60), "no upload went through"
        os.kill(server.proc.pid, signal.SIGKILL)  # mid-burst: uploads are in flight
        server.proc.wait(30)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        server.stop()
    versions = ModelStore(model_dir).versions("burst")
    assert versions, "nothing was published before the kill"
    for v in versions:  # every directory listed is a whole version
        d = model_dir / "burst" / str(v)
        assert json.loads((d / SPEC_FILE).read_text())["kind"] == "qvalue"
        assert (d / WEIGHTS_FILE).read_bytes() == weights
    restarted = LiveServer.serving(model_dir, tmp_path)
    try:
        detail = httpx.get(restarted.url + "/v1/policies/burst").json()
        assert detail["versions"] == versions
        assert all(d["error"] is None for d in detail["version_details"])
        assert not any((model_dir / STAGING).iterdir())  # the dead server's staging was swept
    finally:
        restarted.stop()


_RECORDING: list[list[tuple]] = []


def _audit(event: str, args: tuple) -> None:
    if _RECORDING and event in ("os.mkdir", "os.rename", "open"):
        _RECORDING[-1].append((event, *[str(a) for a in args[:2]]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only inside ``recorded``


def test_a_version_directory_appears_whole_in_one_rename(tmp_path):
    """The version directory is never created empty and filled (a crash in between would leave
    a broken version): it comes into being by one rename of a complete staging directory."""
    store = ModelStore(tmp_path)
    store.write_version("p", {"a": 0}, b"w")  # the policy directory exists from here on
    _RECORDING.append([])
    try:
        version = store.write_version("p", {"a": 1}, b"w")
    finally:
        calls = _RECORDING.pop()
    vdir = str(tmp_path / "p" / str(version))
    assert not [c for c in calls if c[0] == "os.mkdir" and c[1] == vdir]
    assert not [c for c in calls if c[0] == "open" and c[1].startswith(vdir + "/")]
    renames = [c for c in calls if c[0] == "os.rename" and c[2] == vdir]
    assert len(renames) == 1 and f"/{STAGING}/" in renames[0][1]
