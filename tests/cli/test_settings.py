"""Settings as an operator writes them: a list as `a,b` or JSON, a mapping as `a=1,b=2` or
JSON; a bad one stops the process with one line naming it, not a traceback."""

import os
import subprocess
import sys

import pytest

from api.settings import GatewaySettings
from workers.settings import WorkerSettings


@pytest.mark.parametrize(
    "given",
    ["127.0.0.1/32,10.0.0.0/8", " 127.0.0.1/32 , 10.0.0.0/8 ", '["127.0.0.1/32", "10.0.0.0/8"]'],
)
def test_a_list_setting_is_json_or_commas(monkeypatch, given):
    monkeypatch.setenv("GPUHOST_WEBHOOK_ALLOWED_NETWORKS", given)
    assert GatewaySettings().webhook_allowed_networks == ["127.0.0.1/32", "10.0.0.0/8"]


def test_every_list_and_mapping_setting_takes_the_short_form(monkeypatch):
    monkeypatch.setenv("GPUHOST_TRUSTED_PROXIES", "10.0.0.1")
    monkeypatch.setenv("GPUHOST_IMAGE_URL_ALLOWED_NETWORKS", "192.168.0.0/16,10.1.0.0/16")
    monkeypatch.setenv("GPUHOST_SD_IMAGES_PER_REQUEST", "free=1,pro=2,max=6")
    monkeypatch.setenv("GPUHOST_STRIPE_PRICE_TIERS", "price_1=pro,price_2=max")
    monkeypatch.setenv("GPUHOST_SD_WARM_SIZES", "512x512,768x512")
    gateway, worker = GatewaySettings(), WorkerSettings()
    assert gateway.trusted_proxies == ["10.0.0.1"]
    assert gateway.image_url_allowed_networks == ["192.168.0.0/16", "10.1.0.0/16"]
    assert gateway.sd_images_per_request == {"free": 1, "pro": 2, "max": 6}
    assert gateway.stripe_price_tiers == {"price_1": "pro", "price_2": "max"}
    assert worker.sd_warm_sizes == ["512x512", "768x512"]


@pytest.mark.parametrize(
    "name, value, said",
    [
        ("GPUHOST_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.1/32,nope", "'nope' is not an address"),
        ("GPUHOST_SD_IMAGES_PER_REQUEST", "free=one", "GPUHOST_SD_IMAGES_PER_REQUEST['free']"),
        ("GPUHOST_LEASE_TTL_SECONDS", "soon", "valid number"),
        ("GPUHOST_PLANS", "{not json", "not valid JSON"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(name, value, said):
    done = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--port", "1"],
        env=os.environ | {name: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"gpuhost: bad setting {name}") and said in lines[0], lines[0]


def test_the_fixed_cache_former_name_is_still_read(monkeypatch):
    monkeypatch.setenv("GPUHOST_LLAVA_DECODE", "slots")
    assert WorkerSettings().llava_decode == "fixed"
