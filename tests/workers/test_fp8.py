"""Float8 weights for LLaVA's language model (`GPUHOST_LLAVA_WEIGHTS=fp8`), on the CPU, where
PyTorch multiplies in float8 too: the same layers the GPU runs, checked for what they
compute; their speed is for `bench/gpu_run.sh` on a GPU."""

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoProcessor, LlavaForConditionalGeneration

from harness.helpers import png
from tests.workers.test_engine import JOBS, Sink, arriving_together, job, one_by_one
from tests.workers.test_reference import CONVERSATIONS, greedy, reference_tokens
from workers.engines.fp8 import FLOAT8, Float8Linear, to_float8
from workers.engines.llava_transformers import TransformersLlava
from workers.engines.sd_requests import decode_image
from workers.settings import WorkerSettings

# A fixed text for teacher forcing: every position's next token is predicted from the text
# before it, by the full-precision model and by the float8 one.
TEXT = (
    "Read the receipt in the picture and give the total. The first line is two coffees at "
    "3.40 each, the second a croissant at 2.10, the third a bottle of water at 1.50; the tax "
    "is included. Then say which of the items cost the most, and by how much. " * 3
)


class TestLayer:
    def test_a_float8_layer_computes_what_the_layer_computes_within_float8s_rounding(self):
        torch.manual_seed(0)
        linear = torch.nn.Linear(256, 128)
        x = torch.randn(2, 5, 256)
        exact = linear(x)
        layer = Float8Linear(linear)
        assert layer.weight.dtype == FLOAT8 and layer.scale.shape == (1, 128)
        approximate = layer(x)
        assert approximate.shape == exact.shape and approximate.dtype == exact.dtype
        relative = (approximate - exact).norm() / exact.norm()
        assert relative < 0.05  # e4m3 keeps 3 bits of mantissa: ~3 % per product, averaged

    def test_each_row_is_what_it_is_alone(self):
        """Inputs are scaled per token, so a row's result does not depend on its batch (up to
        the order a matrix product of another height adds in): a small row beside a large
        one keeps its own precision."""
        torch.manual_seed(1)
        linear = torch.nn.Linear(64, 32, bias=False)
        layer = Float8Linear(linear)
        rows = torch.randn(6, 64) * torch.tensor([1, 100, 0.01, 5, 1e3, 0.5]).unsqueeze(1)
        together = layer(rows)
        # What may differ is only the float32 sum's order (a product of another height is
        # blocked otherwise, on another CPU otherwise again): two orders of a sum of K products
        # differ by at most 2 K eps times the sum of the products' magnitudes, per element.
        # Those magnitudes, through float8's rounding of both factors (3 mantissa bits: at most
        # 1/16 each), are at most 1.0625^2 of the full-precision ones.
        eps = torch.finfo(torch.float32).eps
        magnitudes = rows.abs() @ linear.weight.detach().abs().t() * 1.0625**2
        bound = 2 * linear.in_features * eps * magnitudes
        for i in range(len(rows)):
            alone = layer(rows[i : i + 1])[0]
            assert ((alone - together[i]).abs() <= bound[i]).all(), (alone, together[i])
            # and the rows' scales are their own: not the batch's largest row's
            torch.testing.assert_close(alone, together[i], rtol=1e-3, atol=0)

    def test_a_row_of_zeros_stays_zero(self):
        layer = Float8Linear(torch.nn.Linear(32, 16, bias=False))
        assert torch.equal(layer(torch.zeros(1, 32)), torch.zeros(1, 16))


@pytest.fixture(scope="module")
def models(models_dir):
    path = models_dir / "llava-llama3"
    exact = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    rounded = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    replaced = to_float8(rounded)
    return exact, rounded, replaced, AutoProcessor.from_pretrained(path)


class TestModel:
    def test_the_language_models_layers_and_only_they_are_float8(self, models):
        exact, rounded, replaced, _ = models
        layers = rounded.model.language_model.layers
        assert replaced == 7 * len(layers)  # q, k, v, o; gate, up, down
        float8 = {n for n, m in rounded.named_modules() if isinstance(m, Float8Linear)}
        assert all(".language_model.layers." in name for name in float8)
        assert rounded.lm_head.weight.dtype == torch.float32
        vision = rounded.model.vision_tower
        assert not any(isinstance(m, Float8Linear) for m in vision.modules())
        assert not any(
            isinstance(m, Float8Linear) for m in rounded.model.multi_modal_projector.modules()
        )

    def test_the_top_token_agrees_with_full_precision_at_95_percent_of_positions(self, models):
        """The quality guard: under teacher forcing on a fixed text."""
        exact, rounded, _, processor = models
        ids = processor.tokenizer(TEXT, return_tensors="pt").input_ids
        assert ids.shape[1] > 200
        with torch.inference_mode():
            expected = exact(input_ids=ids).logits[0].argmax(-1)
            got = rounded(input_ids=ids).logits[0].argmax(-1)
        assert (got == expected).float().mean().item() >= 0.95

    def test_with_an_image_before_the_text_too(self, models):
        """The image's features come from the vision tower in full precision; the language
        model reads them through float8 layers."""
        exact, rounded, _, processor = models
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT}]}
        ]
        prompt = processor.apply_chat_template(conversation, tokenize=False)
        image = decode_image(png(color="red"), "RGB")
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        with torch.inference_mode():
            expected = exact(**inputs).logits[0].argmax(-1)
            got = rounded(**inputs).logits[0].argmax(-1)
        assert (got == expected).float().mean().item() >= 0.95


@pytest.fixture(scope="module", params=["dynamic", "fixed"])
def engine(models_dir, request):
    engine = TransformersLlava(
        "llava-llama3",
        models_dir / "llava-llama3",
        device="cpu",
        decode=request.param,
        weights="fp8",
    )
    yield engine
    engine.close()


class TestEngine:
    def test_the_engine_runs_float8_layers_and_says_so(self, engine, models_dir):
        status = engine.status()
        assert status["weights"] == "fp8"
        assert any(isinstance(m, Float8Linear) for m in engine.model.modules())
        full = LlavaForConditionalGeneration.from_pretrained(
            models_dir / "llava-llama3", dtype=torch.float32
        )
        text = full.model.language_model.layers
        layers_bytes = sum(p.numel() * p.element_size() for p in text.parameters())
        norms = sum(
            p.numel() * p.element_size()
            for name, p in text.named_parameters()
            if "layernorm" in name
        )
        saved = sum(p.numel() * p.element_size() for p in full.parameters()) - status["size_bytes"]
        # float32 (4 bytes) to float8 (1): three quarters of the linear weights' bytes, less
        # the scales (4 bytes per output channel)
        assert saved >= 0.7 * (layers_bytes - norms)

    def test_batched_rows_give_what_each_gives_alone(self, engine):
        jobs = [job(**spec) for spec in JOBS]
        alone = one_by_one(engine, jobs)
        sinks = [Sink() for _ in jobs]
        arriving_together(engine, jobs, sinks)
        assert [sink.text for sink in sinks] == [text for _, text in alone]

    def test_greedy_decoding_is_the_float8_models_own(self, engine, models):
        """Through the engine (batched prefill and decode), greedy decoding is what
        transformers' generate gives with the same float8 model."""
        _, rounded, _, processor = models
        jobs = [greedy(turns) for turns in CONVERSATIONS.values()]
        results = arriving_together(engine, jobs)
        for name, turns, result in zip(CONVERSATIONS, CONVERSATIONS.values(), results, strict=True):
            expected = reference_tokens(rounded, processor, turns)
            assert list(result.context[-len(expected) :]) == expected, name


class TestSettings:
    def test_weights_are_read_from_gpuhost_llava_weights(self, monkeypatch):
        monkeypatch.setenv("GPUHOST_LLAVA_WEIGHTS", "fp8")
        assert WorkerSettings().llava_weight_format == "fp8"
        monkeypatch.setenv("GPUHOST_LLAVA_WEIGHTS", "int4")
        with pytest.raises(ValidationError, match="GPUHOST_LLAVA_WEIGHTS"):
            WorkerSettings()

    def test_fp8_on_another_engine_is_refused_naming_both(self, monkeypatch):
        monkeypatch.setenv("GPUHOST_LLAVA_WEIGHTS", "fp8")
        with pytest.raises(ValidationError, match="GPUHOST_LLAVA_WEIGHTS=fp8 is a transformers"):
            WorkerSettings(engine="vllm")

    def test_an_unknown_format_is_refused_by_the_engine_by_name(self, models_dir):
        with pytest.raises(ValueError, match="weights must be bf16 or fp8, not 'fp4'"):
            TransformersLlava("llava-llama3", models_dir / "llava-llama3", weights="fp4")
