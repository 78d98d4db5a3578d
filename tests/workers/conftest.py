"""The in-process LLaVA engine on the tiny model, once per test module and decode batch."""

import pytest

from workers.engines.llava_transformers import TransformersLlava

# both decode batches: the growing cache (the CPU's default) and the fixed cache (the GPU's,
# here without CUDA graphs)
DECODES = ["dynamic", "fixed"]


@pytest.fixture(scope="module", params=DECODES)
def engine(models_dir, request):
    engine = TransformersLlava(
        "llava-llama3", models_dir / "llava-llama3", device="cpu", decode=request.param
    )
    yield engine
    engine.close()


def graphs_compiled() -> int:
    """How many graphs this process has compiled so far (the compiler's own count)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture
def no_compiler(monkeypatch):
    """Inductor made to fail, as on a GPU host without a C compiler for Triton; and no graph
    compiled by an earlier test, as in a fresh worker."""
    import torch._inductor.compile_fx

    def fails(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", fails)
    torch._dynamo.reset()
