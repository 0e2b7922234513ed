"""Tar shards streamed over HTTP (a real server on 127.0.0.1, in a thread) and from pipe: commands."""
import http.server
import shutil
import threading
from functools import partial

import pytest
from typer.testing import CliRunner

from dfkd import remote, shards
from dfkd.cli import app
from test_shards import write_shards


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/drop/NAME`` sends half of NAME and closes; ``ranges`` answers Range requests."""

    ranges = True

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = self.translate_path(self.path.removeprefix("/drop"))
        try:
            data = open(path, "rb").read()
        except OSError:
            return self.send_error(404, "File not found")
        start = 0
        if self.ranges and self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.path.startswith("/drop/"):
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture
def served(tmp_path, pattern_folder):
    """Shards of the pattern images and an HTTP server for them."""
    shard_dir = tmp_path / "www"
    write_shards(pattern_folder, shard_dir, n_shards=3)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(shard_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield shard_dir, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def select(*args):
    return CliRunner().invoke(app, ["select", *args, "--num-images", "6", "--device", "cpu", "--workers", "0"])


def same_files(local_run, remote_run, local_prefix, remote_prefix):
    for name in ("scores.tsv", "selected.tsv", "skipped.tsv"):
        a = (local_run / name).read_text()
        b = (remote_run / name).read_text()
        assert b.replace(remote_prefix, local_prefix) == a, name
        assert all(line.startswith(remote_prefix + "/") for line in b.splitlines()[1:])
    return (local_run / "selected.tsv").read_text()


@pytest.mark.parametrize("ranges", [True, False])
def test_select_from_http_shards_writes_what_select_from_the_same_shards_on_disk_writes(
        tmp_path, served, random_teacher, monkeypatch, ranges):
    shard_dir, url = served
    monkeypatch.setattr(Handler, "ranges", ranges)
    local = select("--teacher", str(random_teacher), "--pool", str(shard_dir / "{000..002}.tar"),
                   "--out", str(tmp_path / "local"))
    assert local.exit_code == 0, local.output
    got = select("--teacher", str(random_teacher), "--pool", url + "/{000..002}.tar", "--out", str(tmp_path / "http"))
    assert got.exit_code == 0, got.output
    text = same_files(tmp_path / "local", tmp_path / "http", str(shard_dir), url)
    assert len(text.splitlines()) == 7 and ".tar#" in text
    # rows read out of order in a fresh process state (as distill reads a selection): the same bytes
    remote._OPEN.clear()
    rows = [line.split("\t")[0] for line in (tmp_path / "http" / "scores.tsv").read_text().splitlines()[1:]]
    for row in rows[::-1]:
        assert shards.read_bytes(row) == shards.read_bytes(row.replace(url, str(shard_dir))), row
    # the run resumes (same shards), and a changed shard is another pool
    again = select("--teacher", str(random_teacher), "--pool", url + "/{000..002}.tar", "--out", str(tmp_path / "http"))
    assert again.exit_code == 0, again.output
    shutil.copy(shard_dir / "000.tar", shard_dir / "keep.tar")
    shutil.copy(shard_dir / "001.tar", shard_dir / "000.tar")
    changed = select("--teacher", str(random_teacher), "--pool", url + "/{000..002}.tar",
                     "--out", str(tmp_path / "http"))
    assert changed.exit_code == 2 and "pool" in changed.output, changed.output


def test_select_from_pipe_commands_writes_what_select_from_disk_writes(tmp_path, served, random_teacher):
    shard_dir, _ = served
    local = select("--teacher", str(random_teacher), "--pool", str(shard_dir / "{000..002}.tar"),
                   "--out", str(tmp_path / "local"))
    piped = select("--teacher", str(random_teacher), "--pool", f"pipe:cat {shard_dir}/{{000..002}}.tar",
                   "--out", str(tmp_path / "pipe"))
    assert local.exit_code == piped.exit_code == 0, piped.output
    same_files(tmp_path / "local", tmp_path / "pipe", str(shard_dir), f"pipe:cat {shard_dir}")


def test_a_missing_shard_is_one_line_naming_the_url_and_a_dropped_one_is_recorded(tmp_path, served, random_teacher):
    shard_dir, url = served
    missing = select("--teacher", str(random_teacher), "--pool", url + "/{000..003}.tar", "--out", str(tmp_path / "a"))
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1, missing.output
    assert f"--pool {url}/003.tar: HTTP 404" in missing.output
    assert not (tmp_path / "a").exists()
    # the connection to 001.tar drops half-way: its members before the cut are scored, the cut recorded
    dropped = select("--teacher", str(random_teacher), "--out", str(tmp_path / "b"),
                     "--pool", f"{url}/{{000,drop/001,002}}.tar")
    assert dropped.exit_code == 0, dropped.output
    skipped = (tmp_path / "b" / "skipped.tsv").read_text()
    assert f"{url}/drop/001.tar\ttar shard not readable past its first" in skipped
    scored = (tmp_path / "b" / "scores.tsv").read_text()
    assert 12 < len(scored.splitlines()) - 1 < 18 and "drop/001.tar#" in scored
    refused = CliRunner().invoke(app, ["select", "--teacher", str(random_teacher), "--out", str(tmp_path / "c"),
                                       "--pool", "http://127.0.0.1:9/000.tar", "--device", "cpu"])
    assert refused.exit_code == 2 and "http://127.0.0.1:9/000.tar: cannot connect" in refused.output
    failing = select("--teacher", str(random_teacher), "--out", str(tmp_path / "d"),
                     "--pool", f"pipe:cat {shard_dir}/nothing.tar")
    assert failing.exit_code == 2 and "the command exited with status 1" in failing.output, failing.output


def test_a_stalled_server_times_out_instead_of_hanging(monkeypatch):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    monkeypatch.setenv("DFKD_REMOTE_TIMEOUT", "0.5")
    try:
        with pytest.raises(OSError, match="timed out"):
            remote.read_member(f"http://127.0.0.1:{listener.getsockname()[1]}/x.tar", "a.png")
    finally:
        listener.close()
