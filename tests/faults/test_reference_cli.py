"""The reference's command lines (inference/generate.py, inference/chat.py) work as written: ``--model_path``,
``--attn`` with its choices and default (flash_attention_2, which falls back on a machine without CUDA),
``--image_height/--image_width``, ``--max_new_tokens`` (default 1024), and ``jobs.chat --image URL``, fetched from a
server this test starts on 127.0.0.1 with a size limit and a deadline; a URL that gives no image is one line, before
any model loads."""
from __future__ import annotations

import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from jobs import chat, generate
from uniar_ray import image_source

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


def _png(h=48, w=64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(3).random((h, w, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    """``http://127.0.0.1:<port>``: /apple.png, /page.html (not an image), /missing (404), /huge (announces 1 GB),
    /hang (answers only once the test is over), /to-ftp (a redirect to ftp://)."""
    release = threading.Event()
    picture = _png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server spelling
            if self.path == "/hang":
                release.wait()
                return
            if self.path == "/to-ftp":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/apple.png")
                self.end_headers()
                return
            body, kind = {"/apple.png": (picture, "image/png"), "/page.html": (b"<html>hello</html>", "text/html"),
                          "/huge": (b"x" * 16, "image/png")}.get(self.path, (None, ""))
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(10**9 if self.path == "/huge" else len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def local_only(monkeypatch, tiny_cache):
    """No proxy from the environment (the requests must stay on this machine); the tiny checkpoint cached once."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("UNIAR_CACHE_DIR", str(tiny_cache))


@pytest.fixture(scope="module")
def tiny_root(tiny_cache):
    from uniar_ray.decoder.tiny import cached_tiny_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIAR_CACHE_DIR", str(tiny_cache))
        return cached_tiny_checkpoint(0)


def test_generate_takes_the_reference_command_line(tmp_path, tiny_root, capsys):
    out = tmp_path / "inference" / "generated.png"
    [path] = generate.main(["--model_path", str(tiny_root), "--prompt", "A cute anime girl.", "--output_path",
                            str(out), "--image_height", "64", "--image_width", "96", "--upsampling_ratio", "1.0",
                            "--decoder_num_inference_steps", "1", "--attn", "flash_attention_2", "--no_progress"])
    with Image.open(path) as im:
        assert path == out and im.size == (96, 64)  # the deprecated names set the AR size, as their help says
    assert "flash_attention_2 requires CUDA (device cpu); using eager attention instead" in capsys.readouterr().err
    args = generate.parse_args(["--prompt", "x"])
    assert (args.ar_height, args.ar_width, args.attn, args.model) == (960, 960, "flash_attention_2", "tiny")
    with pytest.raises(SystemExit) as exit_:
        generate.parse_args(["--prompt", "x", "--ar_height", "64", "--image_height", "128"])
    assert exit_.value.code == 2 and "--ar_height 64 and --image_height 128 disagree" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.parse_args(["--prompt", "x", "--attn", "xformers"])
    assert "invalid choice: 'xformers' (choose from" in capsys.readouterr().err


def test_chat_takes_the_reference_command_line_with_an_image_url(server, tiny_root, tmp_path, capsys):
    answer = chat.main(["--model_path", str(tiny_root), "--image", f"{server}/apple.png",
                        "--prompt", "Describe this image in detail.", "--max_new_tokens", "4"])
    out = capsys.readouterr()
    assert answer and out.out.strip().endswith(answer.strip())
    assert "[chat] flash_attention_2 requires CUDA (device cpu); using eager attention instead" in out.err
    local = chat.main(["--model", str(tiny_root), "--image", str(_file(tmp_path, "apple.png")),
                       "--prompt", "Describe this image in detail.", "--max-new-tokens", "4", "--attn", "eager"])
    assert local == answer  # the same picture from a file: the same answer
    args = chat.parse_args(["--image", "x.png", "--prompt", "hi"])
    assert (args.max_new_tokens, args.attn) == (1024, "flash_attention_2")  # chat.py's defaults


def _file(folder, name):
    path = folder / name
    path.write_bytes(_png())
    return path


@pytest.mark.parametrize("route,message", [
    ("/missing", "the server answered HTTP 404 Not Found"),
    ("/page.html", "cannot decode the input image (18 bytes)"),
    ("/huge", "the server announces 1000000000 bytes, over the 67108864-byte limit"),
    ("/hang", "no answer within 0.5 s"),
    ("/to-ftp", "cannot fetch it (redirected to ftp://127.0.0.1/apple.png, which is not an http(s) URL)"),
])
def test_chat_image_url_that_gives_no_image_is_one_line_before_the_model_loads(
        run_job, server, monkeypatch, tmp_path, route, message):
    monkeypatch.setattr(image_source, "TIMEOUT_S", 0.5)  # /hang never answers: the deadline is what ends the wait
    missing_model = tmp_path / "no-model-here"  # were the model loaded first, its error would show instead
    code, err = run_job(chat.main, "chat", ["--model_path", str(missing_model), "--image", f"{server}{route}",
                                            "--prompt", "hi"])
    assert code == 2 and f"[chat] error: --image {server}{route}: {message}" in err, err
    assert "Traceback" not in err and str(missing_model) not in err


def test_image_sources_that_are_not_files_or_http_urls(run_job, tmp_path):
    code, err = run_job(chat.main, "chat", ["--image", "ftp://127.0.0.1/a.png", "--prompt", "hi"])
    assert code == 2 and "--image ftp://127.0.0.1/a.png: ftp:// is not supported; give a local file or an http(s) " \
                         "URL" in err
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err = run_job(chat.main, "chat", ["--image", f"http://127.0.0.1:{port}/a.png", "--prompt", "hi"])
    assert code == 2 and f"--image http://127.0.0.1:{port}/a.png: cannot fetch it (" in err
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png()[:60])
    code, err = run_job(generate.main, "generate", ["--prompt", "x", "--image", str(truncated)])
    assert code == 2 and f"--image {truncated}: cannot decode the input image (60 bytes)" in err
    assert image_source.read_image_source(str(_file(tmp_path, "ok.png")), max_bytes=10**6)[:4] == b"\x89PNG"
    with pytest.raises(image_source.ImageSourceError, match="over the 100-byte limit"):
        image_source.read_image_source(str(tmp_path / "ok.png"), max_bytes=100)
