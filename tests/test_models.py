"""Built-in example models, and loading a user's model from a file or a gist."""
import http.server
import json
import re
import socket
import sys
import threading
import time

import pytest
import torch

from utils.models.examples import example_model
from utils.models.gist import GistDownloadError, load_model_from_gist
from utils.models.sizes import find_context_length, find_vocab_size
from utils.models.user_file import load_model_from_file


@pytest.mark.parametrize("name, vocab, context, out_shape", [
    ("gpt-micro", 256, 64, (2, 5, 256)),
    ("encoder-classifier", 256, 64, (2, 2)),
])
def test_example_model_sizes_are_readable_by_model_io(name, vocab, context, out_shape):
    model = example_model(name)
    assert (find_vocab_size(model), find_context_length(model)) == (vocab, context)
    assert tuple(model(torch.randint(0, vocab, (2, 5))).shape) == out_shape


def test_gpt_tiny_is_the_reference_size():
    model = example_model("gpt-tiny")
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (4096, 128, 4, 4, 256)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    assert sum(p.numel() for p in model.parameters()) == 4_240_896


def test_gpt_is_causal():
    model = example_model("gpt-micro").eval()
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 8] = (x[0, 8] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[0, :8], b[0, :8])
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_overrides_change_the_config():
    model = example_model("encoder-classifier", num_classes=5, n_layer=1)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 5)
    assert len(model.encoder.layers) == 1


def test_too_long_input_is_refused_with_the_context():
    with pytest.raises(ValueError, match=re.escape("length 65: this model's context is block_size=64")):
        example_model("gpt-micro")(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="gpt-huge"),
     "example_model('gpt-huge'): unknown model 'gpt-huge'. Available: 'gpt-tiny', 'gpt-micro', 'encoder-classifier'."),
    (dict(name="gpt-micro", n_lyer=2),
     "example_model('gpt-micro', n_lyer=2): unknown override 'n_lyer'. 'gpt-micro' accepts: vocab_size, "
     "block_size, n_layer, n_head, n_embd, dropout, bias."),
    (dict(name="gpt-micro", n_head=3), "example_model('gpt-micro', n_head=3): n_embd=64 must be divisible by n_head=3."),
    (dict(name="gpt-micro", dropout=1.5), "dropout=1.5 must be a float in [0, 1)"),
    (dict(name="gpt-micro", n_layer=True), "n_layer=True must be a positive int"),
    (dict(name="encoder-classifier", num_classes=0), "num_classes=0 must be a positive int"),
])
def test_bad_example_model_requests_name_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        example_model(**kwargs)


# --- load_model_from_file -----------------------------------------------------------------------

TWO_CLASSES = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(x)


class TinyLM(nn.Module):
    def __init__(self, vocab_size=32, width=8, n_layer=1):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(n_layer)])
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx):
        return self.head(self.blocks(self.emb(idx)))
'''


def write(tmp_path, text, name="user_model.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_model_skips_building_blocks_and_uses_defaults(tmp_path):
    model = load_model_from_file(write(tmp_path, TWO_CLASSES))
    assert type(model).__name__ == "TinyLM"
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 32)


def test_file_model_config_goes_to_the_constructor(tmp_path):
    model = load_model_from_file(write(tmp_path, TWO_CLASSES), config={"vocab_size": 7, "n_layer": 2})
    assert find_vocab_size(model) == 7 and len(model.blocks) == 2


def test_file_model_by_class_name(tmp_path):
    model = load_model_from_file(write(tmp_path, TWO_CLASSES), class_name="Block", config={"width": 4})
    assert model.fc.in_features == 4


def test_each_load_is_a_fresh_module(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as most Pythons run: a cached .pyc would be stale
    path = write(tmp_path, TWO_CLASSES)
    first = load_model_from_file(path)
    path.write_text(TWO_CLASSES.replace("vocab_size=32", "vocab_size=33"))  # same size, likely the same second
    second = load_model_from_file(path)
    assert type(first) is not type(second)
    assert find_vocab_size(second) == 33


def test_file_with_dataclass_config_and_imports(tmp_path):
    code = (
        "from dataclasses import dataclass\nfrom torch import nn\n\n"
        "@dataclass\nclass Cfg:\n    width: int = 4\n\n"
        "class Net(nn.Module):\n    def __init__(self, cfg=Cfg()):\n        super().__init__()\n"
        "        self.fc = nn.Linear(cfg.width, 2)\n"
    )
    assert load_model_from_file(write(tmp_path, code)).fc.in_features == 4


def test_file_missing(tmp_path):
    path = tmp_path / "nope.py"
    with pytest.raises(FileNotFoundError, match=re.escape(f"load_model_from_file({str(path)!r}): no such file.")):
        load_model_from_file(path)


def test_file_without_a_module(tmp_path):
    path = write(tmp_path, "import torch\nfrom torch.nn import Linear\nx = 1\n")
    with pytest.raises(ValueError, match=re.escape(
            "the file defines no nn.Module subclass, no module-level nn.Module instance and no build_model(), "
            "get_model(), create_model() function. Define one of them, or import the model into a small "
            "wrapper file that does.")):
        load_model_from_file(path)


def test_file_with_several_candidates_lists_them(tmp_path):
    code = "from torch import nn\nclass A(nn.Module):\n    pass\nclass B(nn.Module):\n    pass\n"
    path = write(tmp_path, code)
    with pytest.raises(ValueError, match=re.escape(
            f"load_model_from_file({str(path)!r}): several nn.Module classes could be the model: A, B. "
            f"Pass class_name= one of them.")):
        load_model_from_file(path)


def test_file_unknown_class_name_lists_the_classes(tmp_path):
    path = write(tmp_path, TWO_CLASSES)
    with pytest.raises(ValueError, match=re.escape(
            "class_name='GPT'): the file defines no nn.Module named 'GPT'. It defines: Block, TinyLM.")):
        load_model_from_file(path, class_name="GPT")


def test_constructor_arguments_not_given_are_named(tmp_path):
    code = "from torch import nn\nclass Net(nn.Module):\n    def __init__(self, vocab, width, depth=2):\n        super().__init__()\n"
    path = write(tmp_path, code)
    with pytest.raises(ValueError, match=re.escape(
            "Net() needs vocab, width, which config does not give. Pass config={'vocab': ..., 'width': ...}.")):
        load_model_from_file(path)
    with pytest.raises(ValueError, match=re.escape("Net() needs width")):
        load_model_from_file(path, config={"vocab": 3})


def test_constructor_arguments_it_does_not_take_are_named(tmp_path):
    path = write(tmp_path, TWO_CLASSES)
    with pytest.raises(ValueError, match=re.escape(
            "TinyLM() does not take 'depth'. It takes: vocab_size, width, n_layer.")):
        load_model_from_file(path, config={"depth": 3})


def test_not_a_python_file(tmp_path):
    path = write(tmp_path, "x", name="model.txt")
    with pytest.raises(ValueError, match=re.escape("expected a Python file ending in .py.")):
        load_model_from_file(path)


def test_errors_in_the_users_code_propagate(tmp_path):
    with pytest.raises(ZeroDivisionError):
        load_model_from_file(write(tmp_path, "1 / 0\n"))


# --- load_model_from_gist, against a local server ------------------------------------------------

GIST_ID = "0123456789abcdef0123"


class GistServer:
    """Serves ``routes[path] = (status, body)`` on 127.0.0.1; records the paths asked for."""

    def __init__(self):
        self.routes, self.requests = {}, []
        self.redirect_to, self.drip = None, False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                status, body = server.routes.get(self.path, (404, b'{"message": "Not Found"}'))
                body = body if isinstance(body, bytes) else body.encode()
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", server.redirect_to)
                self.end_headers()
                if not server.drip:
                    self.wfile.write(body)
                    return
                try:
                    for i in range(len(body)):  # a slow server: a byte at a time
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                    return

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def gist(self, files, gist_id=GIST_ID):
        self.routes[f"/gists/{gist_id}"] = (200, json.dumps({"id": gist_id, "files": files}))

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = GistServer()
    yield s
    s.close()


def py_file(name, code, **extra):
    return {name: {"filename": name, "content": code, "truncated": False, "raw_url": "", **extra}}


@pytest.mark.parametrize("gist", [
    GIST_ID,
    f"https://gist.github.com/someone/{GIST_ID}",
    f"https://gist.github.com/{GIST_ID}",
    f"https://gist.githubusercontent.com/someone/{GIST_ID}/raw/abc/model.py",
])
def test_gist_by_id_or_url(server, gist):
    server.gist(py_file("model.py", TWO_CLASSES) | {"README.md": {"content": "hi"}})
    model = load_model_from_gist(gist, api_url=server.url, config={"vocab_size": 5})
    assert find_vocab_size(model) == 5
    assert server.requests == [f"/gists/{GIST_ID}"]


def test_truncated_gist_file_is_fetched_from_raw_url(server):
    server.routes["/raw/model.py"] = (200, TWO_CLASSES)
    server.gist(py_file("model.py", "", truncated=True, raw_url=f"{server.url}/raw/model.py"))
    assert type(load_model_from_gist(GIST_ID, api_url=server.url)).__name__ == "TinyLM"


def test_gist_file_chosen_by_name(server):
    other = "from torch import nn\nclass Other(nn.Module):\n    pass\n"
    server.gist(py_file("a.py", other) | py_file("b.py", TWO_CLASSES))
    with pytest.raises(ValueError, match=re.escape("the gist has several .py files: a.py, b.py. Pass filename=.")):
        load_model_from_gist(GIST_ID, api_url=server.url)
    assert type(load_model_from_gist(GIST_ID, filename="a.py", api_url=server.url)).__name__ == "Other"


def test_gist_without_python(server):
    server.gist({"notes.md": {"content": "x"}})
    with pytest.raises(ValueError, match=re.escape("the gist has no .py file. It has: notes.md.")):
        load_model_from_gist(GIST_ID, api_url=server.url)


def test_gist_not_found_gives_status_and_hint(server):
    with pytest.raises(GistDownloadError, match=re.escape(
            "failed with HTTP 404 Not Found. Check the gist id: the gist may be deleted, or the id mistyped.")):
        load_model_from_gist("fedcba9876543210fedc", api_url=server.url)


def test_gist_rate_limited_gives_status_and_hint(server):
    server.routes[f"/gists/{GIST_ID}"] = (403, "{}")
    with pytest.raises(GistDownloadError, match=re.escape("HTTP 403 Forbidden. GitHub's API allows 60")):
        load_model_from_gist(GIST_ID, api_url=server.url)


def test_gist_api_answering_something_else_than_json(server):
    server.routes[f"/gists/{GIST_ID}"] = (200, "<html>hello</html>")
    with pytest.raises(GistDownloadError, match=re.escape("did not return JSON")):
        load_model_from_gist(GIST_ID, api_url=server.url)


def test_gist_unreachable_server():
    with socket.socket() as s:  # a port that was free a moment ago, with nobody listening
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(GistDownloadError, match=re.escape(f"could not reach {url}/gists/{GIST_ID}")):
        load_model_from_gist(GIST_ID, api_url=url, timeout=2)


@pytest.mark.parametrize("gist, message", [
    ("https://example.com/someone/0123456789abcdef0123",
     "only https://gist.github.com and https://gist.githubusercontent.com URLs are accepted"),
    ("http://gist.github.com/0123456789abcdef0123", "only https://gist.github.com"),
    ("../../etc/passwd", "'../../etc/passwd' is not a gist id: expected 20 to 40 lowercase hex digits"),
    ("0123456789ABCDEF0123", "is not a gist id"),
    ("https://gist.github.com/someone/not-an-id", "'not-an-id' is not a gist id"),
])
def test_gist_ids_and_hosts_are_validated(gist, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model_from_gist(gist, api_url="http://127.0.0.1:9")  # never contacted


@pytest.mark.parametrize("api_url", ["https://evil.example.com", "http://api.github.com", "file:///etc"])
def test_gist_api_url_must_be_github_or_loopback(api_url):
    with pytest.raises(ValueError, match=re.escape(f"api_url={api_url!r} is not allowed.")):
        load_model_from_gist(GIST_ID, api_url=api_url)


def test_gist_raw_url_on_another_host_is_refused(server):
    server.gist(py_file("model.py", "", truncated=True, raw_url="https://evil.example.com/model.py"))
    with pytest.raises(ValueError, match=re.escape(
            "refusing to download https://evil.example.com/model.py: only HTTPS from the gist hosts is allowed.")):
        load_model_from_gist(GIST_ID, api_url=server.url)


# ---- load_model: the one dispatcher for notebook settings and CLI flags -------------------------

def test_load_model_builds_examples_by_name():
    from utils.models.sources import load_model

    assert load_model("example").config.n_embd == 256  # gpt-tiny, the reference
    assert load_model("example:gpt-micro").config.vocab_size == 256
    assert load_model("example:gpt-micro", config={"n_layer": 1}).config.n_layer == 1


def test_load_model_reads_a_file(tmp_path):
    from utils.models.sources import load_model

    path = tmp_path / "mine.py"
    path.write_text("import torch\nclass Mine(torch.nn.Module):\n    def __init__(self, d=3):\n"
                    "        super().__init__()\n        self.lin = torch.nn.Linear(d, d)\n")
    assert load_model(str(path), config={"d": 5}).lin.in_features == 5


def test_load_model_rejects_anything_else_with_the_forms():
    import re

    from utils.models.sources import load_model

    with pytest.raises(ValueError, match=re.escape("load_model(source='resnet'): 'resnet' is not a model source: use 'example', 'example:NAME'")):
        load_model("resnet")


# ---- gist loading that cannot be steered (issue 18) ---------------------------------------------

REV = "89abcdef0123456789abcdef0123456789abcdef"


def test_a_redirect_from_https_to_http_on_a_gist_host_is_refused(server):
    server.routes["/raw/model.py"] = (302, "")
    server.redirect_to = "http://gist.githubusercontent.com/evil/model.py"
    server.gist(py_file("model.py", "", truncated=True, raw_url=f"{server.url}/raw/model.py"))
    with pytest.raises(GistDownloadError, match=re.escape(
            f"Refusing a redirect from {server.url}/raw/model.py to http://gist.githubusercontent.com/evil/model.py: "
            f"only https to a gist host.")):
        load_model_from_gist(GIST_ID, api_url=server.url)
    assert server.requests == [f"/gists/{GIST_ID}", "/raw/model.py"]  # nothing fetched from the target


def test_a_redirect_to_another_host_is_refused(server):
    server.routes["/raw/model.py"] = (302, "")
    server.redirect_to = "https://evil.example.com/model.py"
    server.gist(py_file("model.py", "", truncated=True, raw_url=f"{server.url}/raw/model.py"))
    with pytest.raises(GistDownloadError, match=re.escape("to https://evil.example.com/model.py: only https to a gist host.")):
        load_model_from_gist(GIST_ID, api_url=server.url)


@pytest.mark.parametrize("gist", [
    f"{GIST_ID}@{REV}",
    f"https://gist.github.com/someone/{GIST_ID}/{REV}",
    f"https://gist.githubusercontent.com/someone/{GIST_ID}/raw/{REV}/model.py",
])
def test_a_revision_is_fetched_as_that_revision(server, gist):
    server.routes[f"/gists/{GIST_ID}/{REV}"] = (200, json.dumps({"files": py_file("model.py", TWO_CLASSES)}))
    server.gist(py_file("model.py", "raise SystemExit('the latest revision ran')\n"))
    assert type(load_model_from_gist(gist, api_url=server.url)).__name__ == "TinyLM"
    assert server.requests == [f"/gists/{GIST_ID}/{REV}"]


def test_a_sha256_pin_is_checked_before_the_code_runs(server):
    import hashlib

    server.gist(py_file("model.py", TWO_CLASSES))
    good = hashlib.sha256(TWO_CLASSES.encode()).hexdigest()
    assert type(load_model_from_gist(f"{GIST_ID}#sha256={good}", api_url=server.url)).__name__ == "TinyLM"
    server.gist(py_file("model.py", TWO_CLASSES + "raise SystemExit('tampered code ran')\n"))
    with pytest.raises(GistDownloadError, match=re.escape("model.py has sha256 ") + ".*" + re.escape(
            f"not the pinned {good}; it was not executed.")):
        load_model_from_gist(f"{GIST_ID}#sha256={good}", api_url=server.url)


@pytest.mark.parametrize("gist, message", [
    (f"{GIST_ID}#md5=abc", "'#md5=abc' is not a pin: expected #sha256= and 64 lowercase hex digits."),
    (f"{GIST_ID}@main", "'main' is not a gist revision: expected 40 lowercase hex digits."),
])
def test_bad_pins_and_revisions_are_named(gist, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model_from_gist(gist, api_url="http://127.0.0.1:9")  # never contacted


@pytest.mark.parametrize("reply", ['["a list"]', '{"files": ["model.py"]}', '{"files": {"model.py": "code"}}',
                                   '{"no files": 1}'])
def test_every_malformed_api_reply_is_one_clear_error(server, reply):
    server.routes[f"/gists/{GIST_ID}"] = (200, reply)
    with pytest.raises(GistDownloadError, match=re.escape("did not answer as the GitHub gist API does")):
        load_model_from_gist(GIST_ID, api_url=server.url)


def test_a_file_with_neither_content_nor_raw_url_is_named(server):
    server.gist({"model.py": {"content": None, "raw_url": 7}})
    with pytest.raises(GistDownloadError, match=re.escape("gave file 'model.py' with neither content nor a raw_url.")):
        load_model_from_gist(GIST_ID, api_url=server.url)


def test_the_timeout_is_an_overall_deadline(server):
    server.drip = True  # one byte every 0.2 s: each socket read is quick, the whole is not
    body = json.dumps({"files": py_file("model.py", TWO_CLASSES)})
    server.routes[f"/gists/{GIST_ID}"] = (200, body)
    t0 = time.monotonic()
    with pytest.raises(GistDownloadError, match=re.escape("took longer than timeout=1.0 s")):
        load_model_from_gist(GIST_ID, api_url=server.url, timeout=1.0)
    # stopped long before the body was through (a bound set by the drip, not by this machine's speed)
    assert time.monotonic() - t0 < 0.2 * len(body) / 10


def test_the_temporary_folder_is_removed(server, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server.gist(py_file("model.py", TWO_CLASSES))
    load_model_from_gist(GIST_ID, api_url=server.url)
    assert list(tmp_path.iterdir()) == []
