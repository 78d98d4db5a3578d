"""The storage layer: tenant-prefixed keys that cannot climb out, bounded writes."""

import uuid

import pytest

from storage import Storage, TooLarge, tenant_key

TENANT = uuid.uuid4()


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path) -> Storage:
    if request.param == "file":
        return Storage(str(tmp_path / "objects"))
    return Storage(f"memory://gpuhost-test-{uuid.uuid4().hex}")


def test_put_get_list_delete(store):
    key = tenant_key(TENANT, "datasets", "ft-1.zip")
    assert key == f"tenants/{TENANT}/datasets/ft-1.zip"
    store.put(key, b"zip bytes")
    assert store.get(key) == b"zip bytes" and store.exists(key) and store.size(key) == 9
    assert store.list(f"tenants/{TENANT}") == [key]
    store.delete(f"tenants/{TENANT}")
    assert not store.exists(key) and store.list(f"tenants/{TENANT}") == []


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "", ".hidden", "a\x00b"])
def test_a_name_cannot_climb_out_of_its_prefix(name):
    with pytest.raises(ValueError, match="not a storage name"):
        tenant_key(TENANT, "adapters", name)


def test_not_a_tenant_id():
    with pytest.raises(ValueError):
        tenant_key("../other", "adapters", "x")


def test_a_write_over_its_limit_keeps_nothing(store):
    key = tenant_key(TENANT, "uploads", "big.bin")
    with pytest.raises(TooLarge, match="over the limit of 10 bytes"):
        store.put_stream(key, [b"12345", b"67890", b"x"], max_bytes=10)
    assert not store.exists(key)
    assert store.put_stream(key, [b"12345", b"67890"], max_bytes=10) == 10
    assert store.get(key) == b"1234567890"
