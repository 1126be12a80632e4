"""Tests for the top-level ``concept_generation`` package.

The API tests talk to a real HTTP server on 127.0.0.1 (``http.server`` in a thread, ephemeral
port) that speaks the OpenAI chat-completions protocol, through the real ``openai`` client.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import concept_generation
from concept_generation import (
    ClassListError,
    ConceptFileError,
    ConceptGenerationError,
    cache_key,
    clean_concepts,
    generate_concepts,
    load_concepts,
    parse_answer,
    read_class_list,
    write_concepts,
)
from concept_generation.cli import main as cli_main
from concept_generation.client import _retry_after_seconds

FAKE_KEY = "sk-test-DO-NOT-LEAK-0123456789abcdefXYZ"
CLASSES = ["road", "wall", "terrain", "rider"]

GOOD_ANSWER = {
    "concepts": [
        {"class_name": "road", "concepts": ["street", "  asphalt   road ", "Street", "", "road"]},
        {"class_name": "wall", "concepts": ["individual standing wall", "freestanding wall", "Terrain"]},
        {"class_name": "terrain", "concepts": ["grass", "soil", "sand"]},
        {"class_name": "Rider", "concepts": ["cyclist", "motorcyclist"]},
        {"class_name": "sky", "concepts": ["clouds"]},
    ]
}

CITYSCAPES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
]
PC59 = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
    "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "diningtable", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
]
ADE150 = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base",
    "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]


# ----------------------------------------------------------------------------------------------
# A local OpenAI-compatible server
# ----------------------------------------------------------------------------------------------


def completion_body(content: str, model: str = "gpt-4o-mini", finish_reason: str = "stop") -> dict[str, Any]:
    """A chat.completion response body."""
    return {
        "id": "chatcmpl-local-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_local",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
    }


def ok(content: Any) -> dict[str, Any]:
    text = content if isinstance(content, str) else json.dumps(content)
    return {"status": 200, "body": completion_body(text)}


def error(status: int, message: str = "boom", headers: dict[str, str] | None = None) -> dict[str, Any]:
    body = {"error": {"message": message, "type": "test_error", "param": None, "code": None}}
    return {"status": status, "body": body, "headers": headers or {}}


class FakeOpenAIServer:
    """Serves scripted responses to ``POST /v1/chat/completions`` and records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[dict[str, Any]] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                with outer._lock:
                    outer.requests.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": json.loads(raw or b"null"),
                        }
                    )
                    action = outer.script.pop(0) if outer.script else error(500, "script exhausted")
                if self.path != "/v1/chat/completions":
                    action = error(404, f"unknown path {self.path}")
                if action.get("delay"):
                    outer.release.wait(action["delay"])
                payload = json.dumps(action["body"]).encode("utf-8")
                try:
                    self.send_response(action["status"])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in action.get("headers", {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture()
def sleeps() -> list[float]:
    return []


def run(server: FakeOpenAIServer, tmp_path: Path, sleeps: list[float], classes: list[str] = CLASSES, **kwargs: Any):
    """generate_concepts against the local server, tiny backoff, cache in tmp_path."""
    options: dict[str, Any] = {
        "description": "dashcam images of German cities",
        "base_url": server.base_url,
        "cache_dir": tmp_path / "cache",
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "max_retries": 2,
        "timeout": 5.0,
        "sleep": sleeps.append,
    }
    options.update(kwargs)
    return generate_concepts(classes, **options)


def all_text_under(*paths: Path) -> str:
    chunks = []
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        chunks += [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return "\n".join(chunks)


# ----------------------------------------------------------------------------------------------
# API scenarios
# ----------------------------------------------------------------------------------------------


def test_good_answer_is_validated_and_written(server, tmp_path, capsys, caplog):
    server.script = [ok(GOOD_ANSWER)]
    out = tmp_path / "out" / "concepts.json"
    cache = tmp_path / "cache"
    argv = [
        "--classes", ",".join(CLASSES), "--description", "dashcam images of German cities",
        "--out", str(out), "--base-url", server.base_url, "--cache-dir", str(cache),
        "--model", "gpt-4o-mini", "--temperature", "0.2", "--num-concepts", "5",
        "--max-retries", "1", "--timeout", "5", "--backoff-base", "0.01",
    ]
    assert cli_main(argv) == 0

    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["concepts"] == {
        "road": ["street", "asphalt road"],
        "wall": ["individual standing wall", "freestanding wall"],
        "terrain": ["grass", "soil", "sand"],
        "rider": ["cyclist", "motorcyclist"],
    }
    meta = doc["metadata"]
    assert meta["prompt_template"] == "concepts_v1"
    assert meta["model"] == "gpt-4o-mini" and meta["temperature"] == 0.2 and meta["num_concepts"] == 5
    assert meta["classes"] == CLASSES and meta["from_cache"] is False
    assert meta["response_id"] == "chatcmpl-local-1"
    assert load_concepts(out, CLASSES) == doc["concepts"]

    # The request: one call, real client, key from the environment, strict structured output.
    assert len(server.requests) == 1
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {FAKE_KEY}"
    body = request["body"]
    assert body["model"] == "gpt-4o-mini" and body["temperature"] == 0.2
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    item = schema["properties"]["concepts"]["items"]
    assert item["properties"]["class_name"]["enum"] == CLASSES
    assert item["properties"]["concepts"] == {
        "type": "array",
        "description": item["properties"]["concepts"]["description"],
        "items": {"type": "string"},
    }
    assert schema["additionalProperties"] is False and item["additionalProperties"] is False
    user = body["messages"][-1]["content"]
    assert "dashcam images of German cities" in user and '"terrain"' in user and "COCO-Stuff" in user

    # Cleaning warnings name the dropped concept and the extra class.
    err = capsys.readouterr().err
    assert "'terrain'" in err and "steal probability" in err
    assert "'sky'" in err and "not target classes" in err

    # The key never reaches any file or the console.
    assert FAKE_KEY not in all_text_under(out, cache)
    assert FAKE_KEY not in err


def test_rate_limit_then_success_honours_retry_after(server, tmp_path, sleeps):
    server.script = [error(429, "slow down", {"Retry-After": "0"}), ok(GOOD_ANSWER)]
    result = run(server, tmp_path, sleeps)
    assert len(server.requests) == 2
    assert result.requests_made == 2 and not result.from_cache
    assert sleeps == [0.0]  # Retry-After: 0 wins over the backoff
    assert result.concepts["terrain"] == ["grass", "soil", "sand"]


def test_server_error_then_success_uses_backoff(server, tmp_path, sleeps):
    server.script = [error(500, "internal"), ok(GOOD_ANSWER)]
    result = run(server, tmp_path, sleeps)
    assert len(server.requests) == 2 and result.requests_made == 2
    assert len(sleeps) == 1 and 0.005 <= sleeps[0] <= 0.01  # base 0.01 with up to 50 % jitter


def test_gives_up_after_max_retries_naming_last_failure(server, tmp_path, sleeps):
    server.script = [error(503, "overloaded")] * 3
    with pytest.raises(ConceptGenerationError, match=r"giving up after 3 attempt\(s\).*HTTP 503.*overloaded"):
        run(server, tmp_path, sleeps, max_retries=2)
    assert len(server.requests) == 3
    assert len(sleeps) == 2 and sleeps[1] <= 0.02 + 1e-9


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_fail_at_once(server, tmp_path, sleeps, status):
    server.script = [error(status, f"nope (key {FAKE_KEY})"), ok(GOOD_ANSWER)]
    with pytest.raises(ConceptGenerationError, match=rf"HTTP {status}: nope") as info:
        run(server, tmp_path, sleeps)
    assert len(server.requests) == 1 and sleeps == []
    assert FAKE_KEY not in str(info.value) and "(key ***)" in str(info.value)  # an echoed key is redacted


def test_timeout_gives_clear_error(server, tmp_path, sleeps):
    server.script = [{**ok(GOOD_ANSWER), "delay": 5.0}, {**ok(GOOD_ANSWER), "delay": 5.0}]
    start = time.monotonic()
    expected = r"giving up after 2 attempt\(s\); last failure: request timed out"
    with pytest.raises(ConceptGenerationError, match=expected):
        run(server, tmp_path, sleeps, timeout=0.2, max_retries=1)
    assert time.monotonic() - start < 3.0
    assert len(server.requests) == 2 and len(sleeps) == 1


def test_connection_error_is_retried(monkeypatch, tmp_path, sleeps):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = FakeOpenAIServer()  # bound but never started: connections are refused or hang
    port = srv.httpd.server_address[1]
    srv.httpd.server_close()
    expected = r"giving up after 2 attempt\(s\); last failure: (connection error|request timed out)"
    with pytest.raises(ConceptGenerationError, match=expected):
        generate_concepts(
            CLASSES, base_url=f"http://127.0.0.1:{port}/v1", cache_dir=tmp_path, max_retries=1,
            backoff_base=0.01, timeout=1.0, sleep=sleeps.append,
        )
    assert len(sleeps) == 1


@pytest.mark.parametrize(
    ("answer", "pattern"),
    [
        ("Sure! Here are the concepts: road -> street", r"not valid JSON.*answer starts with: 'Sure! Here are"),
        ('{"concepts": [{"class_name": "road", "concepts": ["street"]}', r"not valid JSON"),
        ({"concepts": [{"class_name": "road", "concepts": ["street"]},
                       {"class_name": "wall", "concepts": ["freestanding wall"]}]},
         r"missing 2 of 4 class\(es\): 'terrain', 'rider'"),
        ({"concepts": [{"class_name": c, "concepts": ["wall"] if c == "road" else ["x " + c]} for c in CLASSES]},
         r"no usable concept left .* 'road'"),
        ([1, 2, 3], r"JSON list, expected an object"),
    ],
)
def test_malformed_answer_is_an_error_and_writes_nothing(server, tmp_path, capsys, answer, pattern):
    server.script = [ok(answer)]
    out = tmp_path / "concepts.json"
    argv = [
        "--classes", ",".join(CLASSES), "--out", str(out), "--base-url", server.base_url,
        "--cache-dir", str(tmp_path / "cache"), "--backoff-base", "0.01",
    ]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err
    assert re.search(pattern, err), err
    assert not out.exists()
    assert not list((tmp_path / "cache").glob("*.json"))  # invalid answers are not cached
    assert len(server.requests) == 1
    assert FAKE_KEY not in err


def test_truncated_answer_is_reported(server, tmp_path, sleeps):
    server.script = [{"status": 200, "body": completion_body('{"concepts": [', finish_reason="length")}]
    with pytest.raises(ConceptGenerationError, match="cut off at the token limit"):
        run(server, tmp_path, sleeps)


def test_missing_api_key_is_a_clear_error(server, tmp_path, sleeps, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConceptGenerationError, match="OPENAI_API_KEY is not set"):
        run(server, tmp_path, sleeps)
    assert server.requests == []


# ----------------------------------------------------------------------------------------------
# Cache and atomic writes
# ----------------------------------------------------------------------------------------------


def test_second_run_is_a_cache_hit_without_requests(server, tmp_path, sleeps, monkeypatch):
    server.script = [ok(GOOD_ANSWER)]
    first = run(server, tmp_path, sleeps)
    assert len(server.requests) == 1
    cache_files = list((tmp_path / "cache").glob("*.json"))
    assert len(cache_files) == 1 and cache_files[0].stem == first.metadata["cache_key"]

    monkeypatch.delenv("OPENAI_API_KEY")  # a cache hit needs no key
    second = run(server, tmp_path, sleeps)
    assert len(server.requests) == 1
    assert second.from_cache and second.requests_made == 0
    assert second.concepts == first.concepts
    assert second.metadata["cache_key"] == first.metadata["cache_key"]
    assert second.metadata["response_id"] == "chatcmpl-local-1"

    # Any change of model, temperature, num_concepts, description or classes is a different key.
    server.script = [ok(GOOD_ANSWER)]
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    run(server, tmp_path, sleeps, temperature=0.7)
    assert len(server.requests) == 2
    assert FAKE_KEY not in all_text_under(tmp_path / "cache")


def test_cache_key_covers_every_input():
    base = dict(
        template="concepts_v1", rendered_prompt=["s", "u"], model="m", temperature=0.2,
        class_names=["b", "a"], num_concepts=5, description="d", schema_version="v1",
    )
    key = cache_key(**base)
    assert key == cache_key(**{**base, "class_names": ["a", "b"]})  # classes are sorted
    for field, value in [
        ("template", "concepts_v2"), ("rendered_prompt", ["s", "u2"]), ("model", "m2"), ("base_url", "http://x/v1"),
        ("temperature", None), ("class_names", ["a", "c"]), ("num_concepts", 4), ("description", "e"),
    ]:
        assert cache_key(**{**base, field: value}) != key, field


def test_corrupt_cache_entry_is_ignored(server, tmp_path, sleeps):
    server.script = [ok(GOOD_ANSWER), ok(GOOD_ANSWER)]
    first = run(server, tmp_path, sleeps)
    entry = tmp_path / "cache" / f"{first.metadata['cache_key']}.json"
    entry.write_text('{"format": 1, "key": "trunc', encoding="utf-8")
    second = run(server, tmp_path, sleeps)
    assert not second.from_cache and len(server.requests) == 2
    json.loads(entry.read_text(encoding="utf-8"))  # rewritten whole


def test_crash_while_writing_output_keeps_previous_file(server, tmp_path, sleeps, monkeypatch, capsys):
    out = tmp_path / "concepts.json"
    out.write_text('{"previous": ["content"]}\n', encoding="utf-8")
    server.script = [ok(GOOD_ANSWER)]
    real_replace = os.replace

    def crashing_replace(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise KeyboardInterrupt("simulated crash before the rename")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crashing_replace)
    argv = [
        "--classes", ",".join(CLASSES), "--out", str(out), "--base-url", server.base_url,
        "--cache-dir", str(tmp_path / "cache"),
    ]
    assert cli_main(argv) == 130
    assert out.read_text(encoding="utf-8") == '{"previous": ["content"]}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "concepts.json"]  # no temp file left
    assert len(server.requests) == 1

    # The answer was cached before the crash: the rerun sends nothing and completes the file.
    monkeypatch.setattr(os, "replace", real_replace)
    assert cli_main(argv) == 0
    assert len(server.requests) == 1
    assert json.loads(out.read_text(encoding="utf-8"))["metadata"]["from_cache"] is True
    assert FAKE_KEY not in all_text_under(tmp_path) + capsys.readouterr().err


def test_hard_kill_during_write_never_corrupts_destination(tmp_path):
    dest = tmp_path / "concepts.json"
    dest.write_text('{"old": ["kept"]}\n', encoding="utf-8")
    script = textwrap.dedent(
        f"""
        import os
        from concept_generation.atomic import atomic_write_json
        def die(fd):
            os._exit(9)  # the process dies after the data is written, before fsync/rename
        os.fsync = die
        atomic_write_json({str(dest)!r}, {{"new": ["x" * 100000]}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=60)
    assert proc.returncode == 9
    assert dest.read_text(encoding="utf-8") == '{"old": ["kept"]}\n'
    leftovers = [p for p in tmp_path.iterdir() if p.name != "concepts.json"]
    assert all(p.name.startswith(".concepts.json.") and p.suffix == ".tmp" for p in leftovers)


def test_write_concepts_round_trip(tmp_path):
    result = concept_generation.ConceptGenerationResult(
        {"a": ["x"], "b": ["y", "z"]}, {"prompt_template": "concepts_v1"}
    )
    path = write_concepts(result, tmp_path / "deep" / "dir" / "c.json")
    assert load_concepts(path) == {"a": ["x"], "b": ["y", "z"]}
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


# ----------------------------------------------------------------------------------------------
# Parsing, cleaning, prompt
# ----------------------------------------------------------------------------------------------


def test_clean_concepts_rules(caplog):
    pairs = parse_answer(json.dumps(GOOD_ANSWER))
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING, logger="concept_generation"):
        result = clean_concepts(pairs, CLASSES, num_concepts=1, warnings=warnings)
    assert result == {
        "road": ["street"], "wall": ["individual standing wall"], "terrain": ["grass"], "rider": ["cyclist"]
    }
    assert any("'sky'" in w and "dropped" in w for w in warnings)
    assert any("'terrain'" in w and "steal probability" in w for w in warnings)
    assert len(caplog.records) == len(warnings)


def test_parse_answer_accepts_plain_mapping_and_merges_duplicates():
    pairs = parse_answer('{"road": ["street"], "ROAD": ["lane", "Street"], "wall": ["stone wall"]}')
    warnings: list[str] = []
    result = clean_concepts(pairs, ["road", "wall"], warnings=warnings)
    assert result == {"road": ["street", "lane"], "wall": ["stone wall"]}
    assert any("more than once" in w for w in warnings)


def test_concept_shared_by_two_classes_is_removed_from_both():
    warnings: list[str] = []
    result = clean_concepts(
        [("road", ["pavement", "street"]), ("sidewalk", ["Pavements", "footpath"])], ["road", "sidewalk"],
        warnings=warnings,
    )
    assert result == {"road": ["street"], "sidewalk": ["footpath"]}
    assert any("'pavement' / 'Pavements'" in w and "'road', 'sidewalk'" in w and "removed" in w for w in warnings)
    with pytest.raises(ConceptGenerationError, match="no usable concept left .* 'road', 'sidewalk'"):
        clean_concepts([("road", ["pavement"]), ("sidewalk", ["pavement"])], ["road", "sidewalk"])


def test_non_string_concept_is_an_error():
    with pytest.raises(ConceptGenerationError, match="non-string concept"):
        clean_concepts([("road", ["street", 3])], ["road"])


def test_prompt_template_is_versioned():
    assert "concepts_v1" in concept_generation.available_templates()
    assert (Path(concept_generation.__file__).parent / "templates" / "concepts_v1.txt").is_file()
    prompt = concept_generation.render_prompt(["traffic light", 'a "quoted" class'], "desc $x {y}", 3)
    assert prompt.template == "concepts_v1"
    assert '- "traffic light"' in prompt.user and '- "a \\"quoted\\" class"' in prompt.user
    assert "desc $x {y}" in prompt.user and "up to 3 concepts" in prompt.user
    assert "another target class" in prompt.user
    with pytest.raises(ConceptGenerationError, match="unknown prompt template"):
        concept_generation.render_prompt(["a"], template="concepts_v99")


def test_large_class_lists_fall_back_to_free_strings():
    many = [f"class {i}" for i in range(600)]
    item = concept_generation.build_response_format(many)["json_schema"]["schema"]["properties"]["concepts"]["items"]
    assert "enum" not in item["properties"]["class_name"]


def test_retry_after_parsing():
    assert _retry_after_seconds({"retry-after": "2"}) == 2.0
    assert _retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert _retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert _retry_after_seconds({"retry-after": "soon"}) is None
    assert _retry_after_seconds({}) is None


# ----------------------------------------------------------------------------------------------
# Class lists and CLI
# ----------------------------------------------------------------------------------------------


def test_read_class_list_forms(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text('["road", " traffic  light ", "car"]')
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"classes": ["road", "car"]}')
    assert read_class_list(plain) == ["road", "traffic light", "car"]
    assert read_class_list(str(wrapped)) == ["road", "car"]
    assert read_class_list("road, car ,sky") == ["road", "car", "sky"]
    assert read_class_list(["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("[]", "empty"),
        ('["road", "Road"]', "duplicate class name 'Road'"),
        ('["road", "  "]', "entry 1 is blank"),
        ('["road", 3]', "entry 1 is int"),
        ('{"names": ["a"]}', '"classes" key'),
        ("[not json", "not valid JSON"),
        ('"road"', "expected a JSON list"),
    ],
)
def test_read_class_list_errors(tmp_path, content, pattern):
    path = tmp_path / "classes.json"
    path.write_text(content)
    with pytest.raises(ClassListError, match=pattern):
        read_class_list(path)


def test_inline_and_missing_class_lists():
    with pytest.raises(ClassListError, match="not found"):
        read_class_list("does/not/exist.json")
    with pytest.raises(ClassListError, match="empty entry"):
        read_class_list("road,,car")


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["--classes", "a,b"])
    assert info.value.code == 2
    assert "--out is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--classes", "a,b", "--out", "x.json", "--num-concepts", "0"])


def test_cli_print_prompt_needs_no_key(monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert cli_main(["--classes", "road,wall", "--description", "dashcam", "--print-prompt"]) == 0
    out = capsys.readouterr().out
    assert "# template: concepts_v1" in out and '"json_schema"' in out and '- "wall"' in out


def test_module_runs_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "concept_generation", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--num-concepts" in proc.stdout and "OPENAI_API_KEY" in proc.stdout


# The concept command must start fast: neither torch nor transformers may load on its way (issue 27).
_HEAVY_MODULES_PROBE = """
import json, sys
from concept_generation.cli import main
code = main(sys.argv[1:]) if len(sys.argv) > 1 else None
heavy = sorted(m for m in ("torch", "transformers", "openai") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _probe_heavy_modules(tmp_path: Path, *cli_args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.run([sys.executable, "-c", _HEAVY_MODULES_PROBE, *cli_args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_concept_command_imports_no_torch(tmp_path):
    assert _probe_heavy_modules(tmp_path) == {"code": None, "heavy": []}


def test_cached_concept_run_imports_no_torch(server, tmp_path, sleeps):
    server.script = [ok(GOOD_ANSWER)]
    run(server, tmp_path, sleeps)  # fills the cache
    out = tmp_path / "concepts.json"
    result = _probe_heavy_modules(
        tmp_path, "--classes", ",".join(CLASSES), "--description", "dashcam images of German cities",
        "--base-url", server.base_url, "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    )
    assert result == {"code": 0, "heavy": []}  # a cache hit: no key, no request, no openai client either
    assert len(server.requests) == 1
    assert json.loads(out.read_text(encoding="utf-8"))["concepts"]["road"] == ["street", "asphalt road"]


# ----------------------------------------------------------------------------------------------
# Shipped concept files and load_concepts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "classes"),
    [("cityscapes", CITYSCAPES), ("ade20k_150", ADE150), ("pascal_context_59", PC59)],
)
def test_shipped_concepts_cover_every_class(name, classes):
    path = concept_generation.shipped_concepts_path(name)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert list(raw) == [c.strip() for c in classes]  # standard class order

    concepts = load_concepts(name, classes)
    assert list(concepts) == classes  # caller's spelling kept, e.g. "bed "
    assert len(concepts) == len(classes)
    owner: dict[str, str] = {}
    keys = {c.strip().lower() for c in classes}
    for cls, items in concepts.items():
        assert items, f"{name}: {cls!r} has no concepts"
        assert all(isinstance(c, str) and c == c.strip() and c for c in items)
        assert len({c.lower() for c in items}) == len(items)
        for concept in items:
            assert concept.lower() not in keys, f"{name}: {cls!r} -> {concept!r} names a class"
            assert owner.setdefault(concept.lower(), cls) == cls, f"{name}: {concept!r} under two classes"


def test_shipped_cityscapes_follow_class_definitions():
    concepts = load_concepts("cityscapes")
    assert {"individual standing wall", "freestanding wall"} <= set(concepts["wall"])
    assert {"grass", "soil", "sand"} <= set(concepts["terrain"])
    assert "cyclist" in concepts["rider"]


def test_shipped_aliases():
    assert load_concepts("ade20k") == load_concepts("ade20k_150")
    assert load_concepts("PC59") == load_concepts("pascal_context_59")
    with pytest.raises(ConceptFileError, match="unknown concept set 'mapillary'.*cityscapes"):
        load_concepts("mapillary")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("{not json", r"not valid JSON \(.* line 1"),
        ('["road"]', "expected a JSON object"),
        ("{}", "no classes"),
        ('{"road": "street"}', "class 'road': expected a list"),
        ('{"road": ["street", 3]}', "concept 1 is int"),
        ('{"road": ["street", " "]}', "concept 1 is blank"),
        ('{"road": ["street", "Street"]}', "listed twice"),
        ('{"road": ["street"], "Road ": ["lane"]}', "appears more than once"),
        ('{"road": ["sidewalk"], "sidewalk": ["pavement"]}', "name of another class \\('sidewalk'\\)"),
    ],
)
def test_load_concepts_errors_name_file_and_problem(tmp_path, content, pattern):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConceptFileError, match=pattern) as info:
        load_concepts(path)
    assert str(path) in str(info.value)


def test_load_concepts_against_class_names(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"road": ["street", "road"], "sky": ["clouds"]}', encoding="utf-8")
    assert load_concepts(path) == {"road": ["street"], "sky": ["clouds"]}
    assert load_concepts(str(path), ["Sky", "road", "car"]) == {"Sky": ["clouds"], "road": ["street"], "car": []}
    with pytest.raises(ConceptFileError, match=r"1 class\(es\) are not in class_names: 'sky'"):
        load_concepts(path, ["road", "car"])
    with pytest.raises(ConceptFileError, match="name of another class \\('car'\\)"):
        path.write_text('{"road": ["car"]}', encoding="utf-8")
        load_concepts(path, ["road", "car"])
    with pytest.raises(ConceptFileError, match="not found"):
        load_concepts(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------
# Issue 13: inputs that used to slip through
# ----------------------------------------------------------------------------------------------


def cli_argv(server: FakeOpenAIServer, tmp_path: Path, classes: str, out: Path | str, *extra: str) -> list[str]:
    return [
        "--classes", classes, "--out", str(out), "--base-url", server.base_url,
        "--cache-dir", str(tmp_path / "cache"), "--backoff-base", "0.01", "--max-retries", "0", *extra,
    ]


@pytest.mark.parametrize("spec", ["classes.txt", "classes.yaml", "labels.jsn", "my_domain/classes", "~/no/such/list"])
def test_mistyped_class_list_path_fails_before_any_request(server, tmp_path, capsys, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    server.script = [ok({"concepts": [{"class_name": spec, "concepts": ["x"]}]})]
    out = tmp_path / "concepts.json"
    assert cli_main(cli_argv(server, tmp_path, spec, out)) == 1
    err = capsys.readouterr().err
    assert f"class list file not found: {spec}" in err
    assert server.requests == [] and not out.exists()


def test_class_list_directory_or_unknown_type_fails_before_any_request(server, tmp_path, capsys):
    folder = tmp_path / "lists"
    folder.mkdir()
    assert cli_main(cli_argv(server, tmp_path, str(folder), tmp_path / "c.json")) == 1
    assert f"class list {folder} is a directory" in capsys.readouterr().err
    csv = tmp_path / "classes.csv"
    csv.write_text("road,wall\n")
    assert cli_main(cli_argv(server, tmp_path, str(csv), tmp_path / "c.json")) == 1
    assert "unsupported file type '.csv'" in capsys.readouterr().err
    assert server.requests == []


def test_class_list_txt_and_yaml_files(tmp_path):
    txt = tmp_path / "classes.txt"
    txt.write_text("# my classes\nroad\n\n  traffic   light \ncafe\u0301\n", encoding="utf-8")
    assert read_class_list(str(txt)) == ["road", "traffic light", "caf\u00e9"]  # NFC
    for name, text in [("a.yaml", "- road\n- wall\n"), ("b.yml", "classes:\n  - road\n  - wall\n")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert read_class_list(tmp_path / name) == ["road", "wall"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("names: [road]\n", encoding="utf-8")
    with pytest.raises(ClassListError, match=r'bad.yaml: a YAML mapping must have a "classes" key'):
        read_class_list(bad)
    bad.write_text("classes: road\n", encoding="utf-8")
    with pytest.raises(ClassListError, match=r"bad.yaml: expected a YAML list of class names .* got str"):
        read_class_list(bad)
    bad.write_text("- road\n- [wall\n", encoding="utf-8")
    with pytest.raises(ClassListError, match="not valid YAML"):
        read_class_list(bad)
    dup = tmp_path / "dup.txt"
    dup.write_text("caf\u00e9\ncafe\u0301\n", encoding="utf-8")  # the same name in two Unicode forms
    with pytest.raises(ClassListError, match="duplicate class name"):
        read_class_list(dup)
    # An inline list is still an inline list, also with a single name without a file suffix.
    assert read_class_list("road") == ["road"]
    assert read_class_list("road, st. mary's church") == ["road", "st. mary's church"]


@pytest.mark.parametrize(
    ("target", "answered"),
    [("caf\u00e9", "cafe\u0301"), ("cafe\u0301", "caf\u00e9")],  # precomposed vs combining accent, both ways
)
def test_class_names_match_across_unicode_forms(server, tmp_path, sleeps, target, answered):
    answer = {"concepts": [
        {"class_name": answered, "concepts": ["coffee shop", "bistro"]},
        {"class_name": "road", "concepts": ["street"]},
    ]}
    server.script = [ok(answer)]
    result = run(server, tmp_path, sleeps, classes=[target, "road"])
    assert result.warnings == []
    assert result.concepts == {"caf\u00e9": ["coffee shop", "bistro"], "road": ["street"]}
    path = write_concepts(result, tmp_path / "c.json")
    # The trainer's class list may use either form: the file is keyed back to the caller's spelling.
    assert load_concepts(path, [target, "road"]) == {target: ["coffee shop", "bistro"], "road": ["street"]}


@pytest.mark.parametrize(
    "wrapped",
    [
        "```json\n{body}\n```",
        "```\n{body}\n```\n",
        "Here are the concepts you asked for:\n\n```JSON\n{body}\n```\nLet me know if you need more.",
    ],
)
def test_answer_in_a_markdown_code_block_is_accepted(server, tmp_path, capsys, wrapped):
    server.script = [ok(wrapped.format(body=json.dumps(GOOD_ANSWER, indent=2)))]
    out = tmp_path / "concepts.json"
    assert cli_main(cli_argv(server, tmp_path, ",".join(CLASSES), out)) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["concepts"]["terrain"] == ["grass", "soil", "sand"]


def test_answer_with_two_code_blocks_or_broken_json_in_a_block_is_an_error():
    body = json.dumps(GOOD_ANSWER)
    with pytest.raises(ConceptGenerationError, match="not valid JSON.*answer starts with: '```json"):
        parse_answer(f"```json\n{body}\n```\n```json\n{body}\n```")
    with pytest.raises(ConceptGenerationError, match="code block is not valid"):
        parse_answer('```json\n{"concepts": [\n```')


def test_concepts_naming_containing_or_sharing_another_class_are_removed(server, tmp_path, capsys):
    long_concept = "very " * 400 + "long road"
    answer = {"concepts": [
        {"class_name": "road", "concepts": [
            "street", "sidewalks", "the Sidewalk", "side-walk", "sidewalk edge", "pavement", long_concept,
        ]},
        {"class_name": "sidewalk", "concepts": ["footpath", "Pavements", "curb"]},
        {"class_name": "traffic light", "concepts": ["red traffic light", "signal"]},
        {"class_name": "light", "concepts": ["lamp light", "street lights", "ceiling lamp"]},
    ]}
    server.script = [ok(answer)]
    out = tmp_path / "concepts.json"
    classes = "road,sidewalk,traffic light,light"
    assert cli_main(cli_argv(server, tmp_path, classes, out)) == 0
    concepts = json.loads(out.read_text(encoding="utf-8"))["concepts"]
    assert concepts == {
        "road": ["street"],
        "sidewalk": ["footpath", "curb"],
        "traffic light": ["red traffic light", "signal"],  # "light" inside the own class name is fine
        "light": ["lamp light", "street lights", "ceiling lamp"],
    }
    err = capsys.readouterr().err
    assert "'sidewalks' (names 'sidewalk')" in err and "'the Sidewalk' (names 'sidewalk')" in err
    assert "'side-walk' (names 'sidewalk')" in err
    assert "'sidewalk edge' (contains 'sidewalk')" in err
    assert "'pavement' / 'Pavements' is listed under 2 classes ('road', 'sidewalk')" in err
    assert "longer than 100 characters: 'very very" in err and f"({len(long_concept)} characters)" in err
    assert long_concept not in out.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("data", "class_names", "pattern"),
    [
        ({"road": ["sidewalks"], "sidewalk": ["curb"]}, None, r"'sidewalks' is a form .* another class \('sidewalk'\)"),
        ({"road": ["the side-walk"]}, ["road", "sidewalk"],
         r"'the side-walk' is a form .* another class \('sidewalk'\)"),
        ({"road": ["pavement"], "sidewalk": ["pavements"]}, None,
         r"'pavements' of class 'sidewalk' is also listed under class 'road' \(as 'pavement'\)"),
        ({"road": ["x" * 101]}, None, r"class 'road': concept 0 has 101 characters, more than 100"),
        ({"caf\u00e9": ["bistro"], "cafe\u0301": ["coffee shop"]}, None, "appears more than once"),
    ],
)
def test_load_concepts_rejects_forms_of_other_classes_shared_and_long_concepts(tmp_path, data, class_names, pattern):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConceptFileError, match=pattern) as info:
        load_concepts(path, class_names)
    assert str(path) in str(info.value)


def test_load_concepts_accepts_concepts_containing_another_class_as_a_word(tmp_path):
    path = tmp_path / "c.json"
    # Containing another class's name as a word is the user's choice in a hand-written file.
    path.write_text(json.dumps({"clock": ["wall clock"], "wall": ["brick wall"]}), encoding="utf-8")
    assert load_concepts(path) == {"clock": ["wall clock"], "wall": ["brick wall"]}


def test_phrase_helpers():
    from vocalign_hf.models.catseg.concept_phrases import contains_phrase, same_phrase, singular

    assert [singular(w) for w in ["sidewalks", "benches", "shelves", "knives", "bodies", "people", "glass", "bus"]] == [
        "sidewalk", "bench", "shelf", "knife", "body", "person", "glass", "bus"
    ]
    assert same_phrase("Traffic-Lights", "traffic light") and same_phrase("an apple", "apple")
    assert same_phrase("side walk", "sidewalk") and not same_phrase("sidewalk edge", "sidewalk")
    assert contains_phrase("pendant light", "light") and not contains_phrase("lighthouse", "light")
    assert not contains_phrase("red traffic light", "light", own="traffic light")
    assert contains_phrase("traffic light pole", "pole", own="traffic light")


def test_bad_out_fails_before_any_request(server, tmp_path, capsys):
    classes_file = tmp_path / "classes.json"
    classes_file.write_text('["road", "wall", "terrain", "rider"]', encoding="utf-8")
    original = classes_file.read_text(encoding="utf-8")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    server.script = [ok(GOOD_ANSWER)] * 4
    cases = [
        (tmp_path, "is a directory"),
        (classes_file, "is the class list file given to --classes"),
        (tmp_path / "." / "classes.json", "is the class list file given to --classes"),
        (blocker / "sub" / "c.json", "is not a directory"),
    ]
    for out, message in cases:
        with pytest.raises(SystemExit) as info:
            cli_main(cli_argv(server, tmp_path, str(classes_file), out))
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert server.requests == []
    assert classes_file.read_text(encoding="utf-8") == original


def test_verbose_logs_server_cache_and_answer(server, tmp_path, capsys):
    server.script = [ok(GOOD_ANSWER), ok(GOOD_ANSWER)]
    quiet_out, verbose_out = tmp_path / "q.json", tmp_path / "v.json"
    assert cli_main(cli_argv(server, tmp_path, ",".join(CLASSES), quiet_out, "--no-cache")) == 0
    normal = capsys.readouterr().err
    assert cli_main(cli_argv(server, tmp_path, ",".join(CLASSES), verbose_out, "-v")) == 0
    verbose = capsys.readouterr().err
    key = json.loads(verbose_out.read_text(encoding="utf-8"))["metadata"]["cache_key"]
    for expected in [
        f"model gpt-4o-mini at {server.base_url}", f"cache key {key}", "cache miss",
        f"sending the request to {server.base_url}/chat/completions", "answer chatcmpl-local-1",
        "class 'terrain': 3 concept(s): 'grass', 'soil', 'sand'",
    ]:
        assert expected in verbose, expected
        assert expected not in normal, expected
    assert "DEBUG" in verbose and "DEBUG" not in normal
    assert FAKE_KEY not in verbose


def test_cache_is_per_server_and_records_it(server, tmp_path, sleeps, monkeypatch):
    server.script = [ok(GOOD_ANSWER)]
    first = run(server, tmp_path, sleeps)
    assert first.metadata["base_url"] == server.base_url
    with FakeOpenAIServer() as other:
        other.script = [ok({"concepts": [{"class_name": c, "concepts": [f"other {c}"]} for c in CLASSES]})]
        second = run(other, tmp_path, sleeps)
        assert len(other.requests) == 1 and not second.from_cache  # not served from the first server's answer
        assert second.metadata["base_url"] == other.base_url
        assert second.concepts["road"] == ["other road"]
        third = run(other, tmp_path, sleeps)
        assert third.from_cache and third.concepts == second.concepts and len(other.requests) == 1
    assert first.metadata["cache_key"] != second.metadata["cache_key"]
    # Without --base-url the client's $OPENAI_BASE_URL is what is hashed and recorded.
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url + "/")
    again = run(server, tmp_path, sleeps, base_url=None)
    assert again.from_cache and again.metadata["base_url"] == server.base_url
    assert len(server.requests) == 1
    assert concept_generation.client.resolve_base_url("https://user:pw@Example.com:8443/v1/?k=s") == (
        "https://example.com:8443/v1"
    )


def test_concept_vocabulary_rejects_forms_of_other_classes():
    from vocalign_hf.adaptation import ConceptVocabulary

    with pytest.raises(ValueError, match=r"'sidewalks' of class 'road' is a form .* of class 'sidewalk'"):
        ConceptVocabulary(["road", "sidewalk"], {"road": ["street", "sidewalks"]})
    with pytest.raises(ValueError, match=r"'the pavements' of class 'sidewalk' is a form .* of class 'road'"):
        ConceptVocabulary(["road", "sidewalk"], {"road": ["pavement"], "sidewalk": ["the pavements"]})
    with pytest.raises(ValueError, match="equals the name of class"):  # one name in two Unicode forms
        ConceptVocabulary(["road", "caf\u00e9"], {"road": ["cafe\u0301"]})
    # Forms of the own class, and words merely containing another class, stay allowed.
    vocab = ConceptVocabulary(["road", "sidewalk"], {"road": ["roads", "street"], "sidewalk": ["road edge"]})
    assert vocab.entries == ["road", "roads", "street", "sidewalk", "road edge"]
