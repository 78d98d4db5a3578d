"""`gpuhost run / ps / list / usage / generate`, driven as a person would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.helpers import png

pytestmark = pytest.mark.usefixtures("worker")


def gpuhost(gateway, key: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"GPUHOST_HOST": gateway.url, "GPUHOST_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


@pytest.fixture
def picture(tmp_path) -> Path:
    import base64

    path = tmp_path / "red.png"
    path.write_bytes(base64.b64decode(png(color="red")))
    return path


def prompt_counts(stderr: str) -> list[int]:
    return [
        int(line.split()[3])
        for line in stderr.splitlines()
        if line.startswith("prompt eval count:")
    ]


class TestRun:
    def test_one_shot_with_an_image_and_verbose_timings(self, gateway, tenant_factory, picture):
        _, key, _ = tenant_factory.create("pro")
        done = gpuhost(
            gateway,
            key,
            "run",
            "llava-llama3",
            "What is in this picture?",
            "--image",
            str(picture),
            "--verbose",
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), "the answer should be printed"
        assert "eval rate:" in done.stderr and "gpu seconds:" in done.stderr
        assert "HTTP Request" not in done.stderr  # timings and cost, no library log lines
        [count] = prompt_counts(done.stderr)
        assert count > 576  # the picture went along

    def test_a_two_turn_chat_with_an_image_keeps_the_conversation(
        self, gateway, tenant_factory, picture
    ):
        _, key, _ = tenant_factory.create("pro")
        script = (
            "/set parameter num_predict 6\n"
            f"/image {picture}\n"
            "What is in the picture?\n"
            "And what colour is it?\n"
            "/bye\n"
        )
        done = gpuhost(gateway, key, "run", "llava-llama3", "--verbose", stdin=script)
        assert done.returncode == 0, done.stderr
        assert "Set parameter 'num_predict' to '6'" in done.stdout
        assert "Added image (1 pending)" in done.stdout
        first, second = prompt_counts(done.stderr)
        assert first > 576
        assert second > first + 6  # the second turn carried the first question and answer
        assert done.stderr.count("eval count:           6 token(s)") == 2

    def test_an_unknown_command_lists_the_known_ones_and_nothing_is_logged(
        self, gateway, tenant_factory
    ):
        _, key, _ = tenant_factory.create("free")
        done = gpuhost(gateway, key, "run", "llava-llama3", stdin="/bogus now\n/bye\n")
        assert done.returncode == 0, done.stderr
        assert "Unknown command '/bogus'. The commands are:" in done.stdout
        assert "/image FILE" in done.stdout and "/bye" in done.stdout
        answered = gpuhost(gateway, key, "run", "llava-llama3", "hi", stdin="")
        assert answered.returncode == 0, answered.stderr
        assert "HTTP Request" not in answered.stderr + answered.stdout  # no library log lines

    def test_a_bad_key_says_what_to_do(self, gateway):
        done = gpuhost(gateway, "gph_wrong", "run", "llava-llama3", "hi")
        assert done.returncode == 1
        assert "invalid API key" in done.stderr and "GPUHOST_API_KEY" in done.stderr

    def test_an_unreachable_server_says_so(self, tenant_factory):
        class Nowhere:
            url = "http://127.0.0.1:9"

        done = gpuhost(Nowhere, "gph_x", "ps")
        assert done.returncode == 1
        assert "could not connect to gpuhost at http://127.0.0.1:9" in done.stderr


class TestListings:
    def test_list_ps_and_usage(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        import httpx

        from harness.helpers import auth, chat_body

        httpx.post(
            f"{gateway.url}/api/chat", json=chat_body(num_predict=2), headers=auth(key), timeout=60
        )
        listed = gpuhost(gateway, key, "list")
        assert listed.returncode == 0 and "llava-llama3:latest" in listed.stdout
        running = gpuhost(gateway, key, "ps")
        assert running.returncode == 0 and "llava-llama3:latest" in running.stdout
        used = gpuhost(gateway, key, "usage")
        assert used.returncode == 0
        assert "1 request(s)" in used.stdout and "completed" in used.stdout
        assert "MODEL" in used.stdout and "llava-llama3" in used.stdout
        assert "estimated invoice $0.00" in used.stdout  # Free: nothing monthly, no overage

    def test_generate_writes_the_image(self, gateway, tenant_factory, tmp_path, sd_worker):
        from PIL import Image

        _, key, _ = tenant_factory.create("free")
        target = tmp_path / "fox.png"
        done = gpuhost(
            gateway,
            key,
            "generate",
            "a red fox",
            "-o",
            str(target),
            "--size",
            "64x64",
            "--steps",
            "2",
            "--seed",
            "7",
        )
        assert done.returncode == 0, done.stderr
        assert f"wrote {target}" in done.stdout
        assert "GPU-seconds" in done.stderr
        assert Image.open(target).size == (64, 64)

    def test_generate_with_a_bad_size_says_so(self, gateway, tenant_factory, tmp_path):
        _, key, _ = tenant_factory.create("free")
        done = gpuhost(
            gateway, key, "generate", "x", "-o", str(tmp_path / "x.png"), "--size", "100x100"
        )
        assert done.returncode == 1
        assert "not a multiple of 8" in done.stderr
