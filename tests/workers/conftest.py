"""The in-process LLaVA engine on the tiny model, once per test module and decode batch."""

import pytest

from workers.engines.llava_transformers import TransformersLlava

# both decode batches: the growing cache (the CPU's default) and the slot cache (the GPU's,
# here without CUDA graphs)
DECODES = ["dynamic", "slots"]


@pytest.fixture(scope="module", params=DECODES)
def engine(models_dir, request):
    engine = TransformersLlava(
        "llava-llama3", models_dir / "llava-llama3", device="cpu", decode=request.param
    )
    yield engine
    engine.close()
