"""Uploads, listings, downloads and new-file notices on real kernels."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.parse

import pytest

from cellmux.protocol import Channel
from conftest import start_server, wait_for

MiB = 1024 * 1024
MAX_UPLOAD = 64 * MiB
QUOTA = 150 * MiB


@pytest.fixture(scope="module")
def files_server():
    running = start_server(
        "--pool-size",
        "2",
        "--max-upload-size",
        str(MAX_UPLOAD),
        "--kernel-quota",
        str(QUOTA),
    )
    yield running
    running.stop()


@pytest.fixture
def fclient(files_server):
    with files_server.client() as c:
        yield c


@pytest.fixture
def fkernel(fclient):
    model = fclient.create_kernel()
    with fclient.connect(model.id) as k:
        yield k
    fclient.delete_kernel(model.id)


def request(server, method, path, body=None, *, token=True, headers=None, stream_to=None):
    """One HTTP request with http.client: bodies (files too) are streamed."""
    parts = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = "token " + server.token
    if hasattr(body, "read"):
        all_headers["Content-Length"] = str(os.fstat(body.fileno()).st_size)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        if stream_to is not None and response.status == 200:
            while chunk := response.read(256 * 1024):
                stream_to(chunk)
            return response.status, None, response.headers
        data = response.read()
        is_json = response.headers.get("content-type") == "application/json"
        payload = json.loads(data) if is_json else data
        return response.status, payload, response.headers
    finally:
        conn.close()


def path_of(kernel, name=""):
    return f"/files/{kernel.kernel_id}/{name}"


def test_upload_use_write_download(files_server, fkernel):
    status, body, _ = request(files_server, "PUT", path_of(fkernel, "data/in.txt"), b"3\n4\n")
    assert (status, body) == (201, {"name": "data/in.txt", "size": 4})
    result = fkernel.execute(
        "nums = [int(x) for x in open('data/in.txt')]\n"
        "open('out.txt', 'w').write(str(sum(nums)))\n"
        "sum(nums)"
    )
    assert result.result_text == "7"
    status, listing, _ = request(files_server, "GET", path_of(fkernel))
    assert status == 200
    assert [f["name"] for f in listing["files"]] == ["data/in.txt", "out.txt"]
    assert not listing["truncated"]
    status, data, headers = request(files_server, "GET", path_of(fkernel, "out.txt"))
    assert (status, data) == (200, b"7")
    assert headers["content-disposition"].startswith('attachment; filename="out.txt"')
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["content-type"] == "application/octet-stream"


def test_html_written_by_a_kernel_is_never_active_content(files_server, fkernel):
    fkernel.execute("open('page.html', 'w').write('<script>alert(1)</script>')")
    status, data, headers = request(files_server, "GET", path_of(fkernel, "page.html"))
    assert status == 200
    assert data == b"<script>alert(1)</script>"
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith("attachment;")
    assert "sandbox" in headers["content-security-policy"]


def _rss(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def test_fifty_megabytes_round_trip_without_growing_server_memory(files_server, fkernel, tmp_path):
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(source, "wb") as f:
        for _ in range(50):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    pid = files_server.process.pid
    before = _rss(pid)
    with open(source, "rb") as f:
        status, body, _ = request(files_server, "PUT", path_of(fkernel, "big.bin"), f)
    assert (status, body["size"]) == (201, 50 * MiB)
    after_upload = _rss(pid)
    result = fkernel.execute(
        "import hashlib, shutil\n"
        "shutil.copyfile('big.bin', 'copy.bin')\n"
        "hashlib.sha256(open('copy.bin', 'rb').read()).hexdigest()",
        timeout=120,
    )
    assert result.result_text == repr(digest.hexdigest())
    received = hashlib.sha256()
    size = []

    def take(chunk):
        received.update(chunk)
        size.append(len(chunk))

    status, _, headers = request(files_server, "GET", path_of(fkernel, "copy.bin"), stream_to=take)
    assert status == 200
    assert int(headers["content-length"]) == 50 * MiB
    assert sum(size) == 50 * MiB
    assert received.hexdigest() == digest.hexdigest()
    after_download = _rss(pid)
    grown = {k: after_download[k] - before[k] for k in before}
    print(
        f"server memory: before {before}, after upload {after_upload}, after download "
        f"{after_download}, grown {grown}"
    )
    # the peak (VmHWM) counts any moment the whole file was in memory
    assert grown["VmHWM"] < 20 * MiB, grown
    assert grown["VmRSS"] < 20 * MiB, grown


@pytest.mark.parametrize(
    "name",
    ["../x", "%2e%2e/x", "a/../../x", "a/./b", "a//b", "/etc/passwd", "%2Fetc%2Fpasswd", "a/"],
)
def test_names_that_climb_or_are_absolute_are_refused(files_server, fkernel, name):
    for method, body in [("GET", None), ("PUT", b"evil")]:
        status, answer, _ = request(files_server, method, path_of(fkernel, name), body)
        assert status == 400, (method, name, answer)
        assert "refused" in answer["message"]
    # nothing was written anywhere
    status, listing, _ = request(files_server, "GET", path_of(fkernel))
    assert listing["files"] == []


def test_symlinks_out_of_the_directory_are_refused(files_server, fkernel, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.chmod(tmp_path, 0o755)
    os.chmod(outside, 0o777)
    fkernel.execute(
        f"import os\nos.symlink({str(outside)!r}, 'dir_link')\n"
        f"os.symlink({str(outside / 'secret.txt')!r}, 'file_link')\n"
        "os.symlink('/etc/passwd', 'passwd')"
    )
    for method, name, body in [
        ("GET", "dir_link/secret.txt", None),
        ("GET", "file_link", None),
        ("GET", "passwd", None),
        ("PUT", "dir_link/planted.txt", b"evil"),
        ("PUT", "dir_link/new/planted.txt", b"evil"),
    ]:
        status, answer, _ = request(files_server, method, path_of(fkernel, name), body)
        assert status == 403, (method, name, answer)
        assert "outside the kernel's directory" in answer["message"]
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    # uploading over the link's own name replaces the link, not its target
    status, _, _ = request(files_server, "PUT", path_of(fkernel, "file_link"), b"mine")
    assert status == 201
    assert (outside / "secret.txt").read_text() == "secret"
    assert request(files_server, "GET", path_of(fkernel, "file_link"))[1] == b"mine"


def test_upload_over_the_size_limit_is_refused_as_it_arrives(files_server, fkernel, tmp_path):
    big = tmp_path / "too_big.bin"
    with open(big, "wb") as f:
        f.truncate(MAX_UPLOAD + 1)
    with open(big, "rb") as f:
        status, answer, _ = request(files_server, "PUT", path_of(fkernel, "too_big.bin"), f)
    assert status == 413
    assert f"limit of {MAX_UPLOAD} bytes" in answer["message"]
    assert request(files_server, "GET", path_of(fkernel))[1]["files"] == []
    # the server carries on
    assert request(files_server, "PUT", path_of(fkernel, "ok.txt"), b"ok")[0] == 201


def test_chunked_upload_over_the_limit_is_refused(files_server, fkernel):
    parts = urllib.parse.urlsplit(files_server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    headers = {"Authorization": "token " + files_server.token}
    blocks = (b"z" * MiB for _ in range(MAX_UPLOAD // MiB + 2))
    try:
        conn.request("PUT", path_of(fkernel, "chunked.bin"), blocks, headers, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        assert "limit" in json.loads(response.read())["message"]
    finally:
        conn.close()
    assert request(files_server, "GET", path_of(fkernel))[1]["files"] == []


def test_head_gives_the_headers_only(files_server, fkernel):
    request(files_server, "PUT", path_of(fkernel, "h.txt"), b"12345")
    status, data, headers = request(files_server, "HEAD", path_of(fkernel, "h.txt"))
    assert (status, data, headers["content-length"]) == (200, b"", "5")


def test_upload_over_the_quota_is_refused(files_server, fkernel):
    fkernel.execute(f"f = open('sparse.bin', 'wb'); f.truncate({QUOTA - MiB}); f.close()")
    status, answer, _ = request(files_server, "PUT", path_of(fkernel, "two.bin"), b"x" * 2 * MiB)
    assert status == 413
    assert "quota" in answer["message"]
    assert request(files_server, "PUT", path_of(fkernel, "small.bin"), b"x" * 1000)[0] == 201


def test_errors_for_unknown_kernels_missing_files_and_no_token(files_server, fkernel):
    assert request(files_server, "GET", "/files/no-such-kernel/")[0] == 404
    status, answer, _ = request(files_server, "GET", path_of(fkernel, "missing.txt"))
    assert status == 404
    assert "missing.txt" in answer["message"]
    assert request(files_server, "GET", path_of(fkernel), token=False)[0] == 403
    assert request(files_server, "PUT", path_of(fkernel, "x"), b"x", token=False)[0] == 403
    fkernel.execute("import os; os.mkdir('adir')")
    assert request(files_server, "GET", path_of(fkernel, "adir"))[0] == 400
    assert request(files_server, "PUT", path_of(fkernel, "adir"), b"x")[0] == 409
    assert request(files_server, "DELETE", path_of(fkernel, "x"))[0] == 405


def _file_notices(kernel):
    notices = []

    def listener(frame):
        if frame.channel == Channel.FILES:
            header, content = json.loads(frame.parts[0]), json.loads(frame.parts[3])
            notices.append((header["msg_type"], content))

    kernel.async_kernel.add_listener(listener)
    return notices


def test_notices_list_new_and_changed_files_after_each_execution(files_server, fkernel):
    notices = _file_notices(fkernel)
    request(files_server, "PUT", path_of(fkernel, "uploaded.txt"), b"up")
    fkernel.execute("open('a.txt', 'w').write('1'); open('.hidden', 'w').write('h')")
    wait_for(lambda: notices)
    msg_type, content = notices[0]
    assert msg_type == "cellmux_files"
    assert [f["name"] for f in content["new"]] == ["a.txt"]  # not the upload, not hidden
    assert content["new"][0]["size"] == 1
    assert content["new"][0]["url"] == path_of(fkernel, "a.txt")
    assert content["changed"] == []
    fkernel.execute(
        "open('a.txt', 'w').write('22'); import os; os.makedirs('d/e')\n"
        "open('d/e/b.txt', 'w').write('b')"
    )
    wait_for(lambda: len(notices) >= 2)
    _, content = notices[1]
    assert [f["name"] for f in content["new"]] == ["d/e/b.txt"]
    assert [(f["name"], f["size"]) for f in content["changed"]] == [("a.txt", 2)]
    # an execution that writes nothing sends no notice
    fkernel.execute("1 + 1")
    fkernel.execute("open('c.txt', 'w').write('c')")
    wait_for(lambda: len(notices) >= 3)
    assert [f["name"] for f in notices[2][1]["new"]] == ["c.txt"]


def test_symlinks_inside_the_directory_are_followed(files_server, fkernel):
    fkernel.execute(
        "import os\nos.makedirs('real/deep')\nopen('real/deep/f.txt', 'w').write('inner')\n"
        "os.symlink('real', 'alias')\nos.symlink('.', 'self')"
    )
    assert request(files_server, "GET", path_of(fkernel, "alias/deep/f.txt"))[1] == b"inner"
    assert request(files_server, "PUT", path_of(fkernel, "alias/deep/g.txt"), b"g")[0] == 201
    assert request(files_server, "GET", path_of(fkernel, "real/deep/g.txt"))[1] == b"g"
    assert request(files_server, "GET", path_of(fkernel, "self"))[0] == 400


def test_a_directory_swapped_for_a_link_after_the_check_is_not_followed(tmp_path):
    # What a racing kernel could do between resolve_inside and the open:
    # the descriptor walk itself refuses to pass through the link.
    from cellmux.server.api import HTTPError
    from cellmux.server.files import open_inside

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")
    (root / "d").symlink_to(outside)
    with pytest.raises(HTTPError) as info:
        open_inside(str(root), ["d", "secret"])
    assert info.value.status == 403
    (root / "f").symlink_to(outside / "secret")
    with pytest.raises(HTTPError) as info:
        open_inside(str(root), ["f"])
    assert info.value.status == 403
