"""The real LLaVA-Llama-3-8B architecture, random weights, through gpuhost's engine on a GPU.

    python bench/llava_gpu.py [--tokens 128] [--dir /tmp/llava8b]
    python ../shared/bench/reference_gpu_probe.py      # the baseline, in the same run

Builds CLIP ViT-L/14-336 + Llama 3 8B (bf16) with random weights, saves it once in Hugging
Face layout, loads it through the worker's engine (the same `from_pretrained` path as real
weights) and reports decode tokens/s at 1 and 8 concurrent requests, each with one image.
Goal on an H200: >= 110 tokens/s single-stream, >= 700 in total at 8 concurrent requests.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llava_engine import TimedMeter, run  # noqa: E402

from workers.engines.llava_transformers import TransformersLlava  # noqa: E402


def build(directory: Path) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from workers.tiny import make_llava

    if (directory / "config.json").exists():
        return directory
    make_llava(directory)  # tokenizer, processor and chat template; weights replaced below
    tiny = LlavaConfig.from_pretrained(directory)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            bos_token_id=tiny.text_config.bos_token_id,
            eos_token_id=tiny.text_config.eos_token_id,
            pad_token_id=tiny.text_config.pad_token_id,
        ),
        image_token_index=tiny.image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = LlavaForConditionalGeneration.from_pretrained(
        directory
    ).generation_config
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    torch.set_default_dtype(torch.float32)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llava8b"))
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(0)}), flush=True)
    engine = TransformersLlava("llava-llama3", build(args.dir), device="cuda", max_batch=8)
    engine.meter = TimedMeter()
    try:
        run(engine, 1, 8)  # warm-up
        for streams in (1, 8):
            print(json.dumps({"gpuhost_llava8b": run(engine, streams, args.tokens)}), flush=True)
        print(json.dumps({"peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
