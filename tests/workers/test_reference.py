"""The engines give what the reference implementations give (CPU, fp32, tiny models), so that
real weights behave as their authors intended: greedy decoding through the LLaVA engine, with
both decode batches, rows of different lengths prefilled and decoded together, with and without
images and over several turns, is token for token transformers' `generate(do_sample=False)`; the
Stable Diffusion engine's images are diffusers' own pipelines' for the same seed, scheduler
and size, within 1/255."""

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from harness.helpers import png
from harness.jobs import chat_job
from tests.workers.conftest import graphs_compiled
from tests.workers.test_engine import Sink, arriving_together
from tests.workers.test_sd_engine import Sink as ProgressSink
from tests.workers.test_sd_engine import job as image_job
from tests.workers.test_sd_engine import pixels
from workers.contract import ChatJob, ChatTurn
from workers.engines.diffusion import DiffusionEngine
from workers.engines.llava_transformers import TransformersLlava
from workers.engines.sd_requests import decode_image
from workers.engines.sd_requests import png as encoded

TOKENS = 12
CONVERSATIONS = {
    "short text": [ChatTurn(role="user", content="hi")],
    "an image": [ChatTurn(role="user", content="What is this?", images=[png(color="red")])],
    "several turns": [
        ChatTurn(role="system", content="Answer in one sentence."),
        ChatTurn(role="user", content="Describe the picture.", images=[png(color="blue")]),
        ChatTurn(role="assistant", content="A blue square on a white background."),
        ChatTurn(role="user", content="And what is written on it, if anything at all?"),
    ],
    "a longer text": [
        ChatTurn(
            role="user",
            content="Read the table and give the total of the second column, then explain "
            "how you added the numbers up, one by one, in a short paragraph.",
        )
    ],
}


def greedy(turns: list[ChatTurn]) -> ChatJob:
    """Greedy, and kind `generate`: its final chunk keeps the token ids (`context`)."""
    return chat_job(turns, TOKENS, seed=None, kind="generate")


def reference_tokens(model, processor, turns: list[ChatTurn]) -> list[int]:
    """What transformers' generate gives for the same conversation, processor and template."""
    conversation, images = [], []
    for turn in turns:
        parts = [{"type": "image"} for _ in turn.images]
        parts.append({"type": "text", "text": turn.content})
        conversation.append({"role": turn.role, "content": parts})
        images += [decode_image(data, "RGB") for data in turn.images]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=TOKENS)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def reference(models_dir):
    path = models_dir / "llava-llama3"
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def test_greedy_decoding_is_transformers_generate_token_for_token(engine, reference):
    model, processor = reference
    expected = {name: reference_tokens(model, processor, t) for name, t in CONVERSATIONS.items()}
    jobs = [greedy(turns) for turns in CONVERSATIONS.values()]
    passes = engine.prefill_batches
    results = arriving_together(engine, jobs)  # one prefill, one batch, rows of all lengths
    assert engine.prefill_batches - passes == 1
    for name, result in zip(CONVERSATIONS, results, strict=True):
        assert result.output_tokens == TOKENS, name
        assert list(result.context[-TOKENS:]) == expected[name], name
    alone = engine.generate(greedy(CONVERSATIONS["an image"]), Sink())
    assert list(alone.context[-TOKENS:]) == expected["an image"]


def test_a_compiled_decode_step_is_transformers_generate_too(models_dir, reference):
    """The GPU's default (the fixed cache's step compiled at load, every bucket), here on the
    CPU: greedy decoding is still generate's token for token, and no request compiles."""
    torch._dynamo.reset()  # as in a fresh worker: no graph compiled by an earlier test
    before = graphs_compiled()
    engine = TransformersLlava(
        "llava-llama3", models_dir / "llava-llama3", device="cpu", decode="fixed", compile="on"
    )
    try:
        assert engine.status()["compiled"] is True
        at_load = graphs_compiled()
        assert at_load > before
        model, processor = reference
        jobs = [greedy(turns) for turns in CONVERSATIONS.values()]
        results = arriving_together(engine, jobs)
        for name, turns, result in zip(CONVERSATIONS, CONVERSATIONS.values(), results, strict=True):
            expected = reference_tokens(model, processor, turns)
            assert list(result.context[-TOKENS:]) == expected, name
        assert graphs_compiled() == at_load
    finally:
        engine.close()


def test_a_decode_step_that_fails_to_compile_runs_uncompiled(models_dir, no_compiler, caplog):
    """Where compiling fails at load (no C compiler for Triton, say; here Inductor made to
    fail), the worker says so and decodes eagerly."""
    engine = TransformersLlava(
        "llava-llama3", models_dir / "llava-llama3", device="cpu", decode="fixed", compile="on"
    )
    try:
        assert engine.status()["compiled"] is False
        result = engine.generate(greedy(CONVERSATIONS["short text"]), Sink())
        assert result.output_tokens == TOKENS
    finally:
        engine.close()
    assert "compiling the decode step failed: it runs uncompiled" in caplog.text


# -- Stable Diffusion --------------------------------------------------------------------------


def content(color: str) -> str:
    image = Image.new("RGB", (64, 64), color)
    image.paste("white", (16, 16, 40, 40))
    return encoded(image)


def mask() -> str:
    image = Image.new("L", (64, 64), 0)
    image.paste(255, (8, 8, 32, 48))
    return encoded(image)


MODES = {
    "txt2img": {},
    "img2img": {"kind": "img2img", "image": content("green"), "strength": 0.7},
    "inpaint": {"kind": "inpaint", "image": content("green"), "mask": mask()},
}


def drawn_by_diffusers(path, spec) -> np.ndarray:
    """The same request through diffusers' own pipeline for its mode."""
    kinds = {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }
    pipe = kinds[spec.kind].from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "num_inference_steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "generator": torch.Generator("cpu").manual_seed(spec.seed),
        "output_type": "pil",
    }
    size = {"width": spec.width, "height": spec.height}
    if spec.kind == "txt2img":
        kwargs |= size
    else:
        kwargs |= {"image": decode_image(spec.image, "RGB"), "strength": spec.strength}
    if spec.kind == "inpaint":
        kwargs |= {"mask_image": decode_image(spec.mask, "L")} | size
    with torch.inference_mode():
        return pixels(encoded(pipe(**kwargs).images[0]))


@pytest.mark.parametrize("mode", list(MODES))
def test_images_are_diffusers_own_pipelines_within_one_level(models_dir, mode):
    path = models_dir / "stable-diffusion"
    spec = image_job(5).model_copy(update={"steps": 6} | MODES[mode])
    engine = DiffusionEngine("sd", path, device="cpu")
    try:
        mine = pixels(engine.render(spec, ProgressSink()).images[0])
    finally:
        engine.close()
    theirs = drawn_by_diffusers(path, spec)
    assert mine.shape == theirs.shape == (64, 64, 3)
    assert np.abs(mine - theirs).max() <= 1
