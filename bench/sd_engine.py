"""Stable Diffusion engine: billed GPU-seconds per image at 1, 4 and 8 concurrent requests.

    python bench/sd_engine.py                                  # tiny random-weight SD, CPU
    python bench/sd_engine.py --model DIR --device cuda --size 512 --steps 25
    python bench/sd_engine.py --arch sd15 --device cuda --size 512 --steps 25   # random weights

Runs the engine the `sd` workers use (micro-batching, per-request metering) in process; each
request asks for one image of the same shape, so concurrent requests share batches.
"""

import argparse
import base64
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

from harness.jobs import image_job  # noqa: E402
from workers.contract import ImageJob
from workers.engines.diffusion import DiffusionEngine


class Sink:
    def progress(self, step: int, steps: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def build_sd15(out: Path) -> Path:
    """Stable Diffusion 1.5's architecture (UNet 860M, VAE, CLIP ViT-L text encoder), random
    weights, saved as a pipeline: costs what the real model costs, draws noise."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from workers.tiny import make_stable_diffusion

    if (out / "model_index.json").exists():
        return out
    tiny = StableDiffusionPipeline.from_pretrained(make_stable_diffusion(out))
    torch.manual_seed(0)
    tokenizer = tiny.tokenizer
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        ),
        text_encoder=CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        scheduler=tiny.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def job(size: int, steps: int, seed: int, adapter: dict | None = None) -> ImageJob:
    prompt = f"a lighthouse at dusk, variant {seed}"
    return image_job(prompt, size, steps, seed, model="sd", **(adapter or {}))


def run(
    engine: DiffusionEngine, concurrent: int, size: int, steps: int, adapter: dict | None = None
) -> dict:
    results = [None] * concurrent
    busy = engine.meter.busy_seconds

    def one(i: int) -> None:
        results[i] = engine.render(job(size, steps, i, adapter), Sink())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrent)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    billed = [r.gpu_seconds for r in results]
    return {
        "concurrent": concurrent,
        "size": size,
        "steps": steps,
        "wall_seconds": round(wall, 3),
        "billed_seconds_per_image": round(sum(billed) / concurrent, 4),
        "largest_batch": max(r.batch_images for r in results),
        "billed_over_busy": round(sum(billed) / (engine.meter.busy_seconds - busy), 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="SD weights (default: make tiny ones)")
    parser.add_argument(
        "--arch", choices=("tiny", "sd15"), default="tiny", help="random weights to make"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--window", type=float, default=0.02, help="batch window, s (the workers' default)"
    )
    parser.add_argument(
        "--cudnn-attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let SDPA use cuDNN (the workers' default)",
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="time convolution algorithms per shape"
    )
    parser.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build the GPU plans of --size at load (the workers' default, 512x512)",
    )
    parser.add_argument(
        "--warm-steps", type=int, default=2, help="steps of each warm-up batch (the workers' 2)"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the UNet at load for --size (default: on a GPU, as the workers do)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the UNet's weights as NHWC (default: when compiled, as the workers do)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="times to run the 1, 4, 8 sequence (default 1)"
    )
    parser.add_argument(
        "--lora", action="store_true", help="every request with a random LoRA adapter"
    )
    parser.add_argument("--save", type=Path, help="write the image of seed 0, alone, here (PNG)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if args.arch == "sd15":  # made where --model says (and kept there for the next run)
            model = build_sd15(model or Path(scratch) / "sd15")
        elif model is None:
            from workers.tiny import make_stable_diffusion

            model = make_stable_diffusion(Path(scratch) / "stable-diffusion")
        storage, adapter = None, None
        if args.lora:
            from storage import Storage, tenant_key
            from workers.tiny import make_lora_adapter

            storage = Storage(str(Path(scratch) / "storage"))
            key = tenant_key(uuid.uuid4(), "adapters", "random.safetensors")
            storage.put(key, make_lora_adapter(model))
            adapter = {"lora": "random", "lora_key": key}
        engine = DiffusionEngine(
            "sd",
            model,
            device=args.device,
            max_batch_images=8,
            batch_window_seconds=args.window,
            cudnn_attention=args.cudnn_attention,
            cudnn_benchmark=args.cudnn_benchmark,
            warm_sizes=((args.size, args.size),) if args.warm else (),
            warm_steps=args.warm_steps,
            compiled=args.compile,
            channels_last=args.channels_last,
            storage=storage,
        )
        variant = {
            "cudnn_attention": args.cudnn_attention,
            "cudnn_benchmark": args.cudnn_benchmark,
            "warm": args.warm,
            "compiled": engine.compiled,
            "channels_last": engine.channels_last,
            "lora": args.lora,
        }
        print(json.dumps({"load_seconds": round(engine.load_seconds, 1), **variant}), flush=True)
        try:
            run(engine, 1, args.size, 2, adapter)  # warm-up
            for round_ in range(1, args.rounds + 1):
                for concurrent in (1, 4, 8):
                    # The first batch of a shape pays for loading its kernels; a serving
                    # engine runs the same few shapes all day, so the second is the one to quote.
                    for pass_ in ("first", "again"):
                        result = run(engine, concurrent, args.size, args.steps, adapter)
                        print(json.dumps({"round": round_, "pass": pass_, **result}), flush=True)
            if args.save:
                alone = engine.render(job(args.size, args.steps, 0, adapter), Sink())
                args.save.write_bytes(base64.b64decode(alone.images[0]))
            if args.device.startswith("cuda"):
                import torch

                peak = torch.cuda.max_memory_allocated() / 2**30
                print(json.dumps({"peak_gpu_memory_gib": round(peak, 2)}), flush=True)
        finally:
            engine.close()


if __name__ == "__main__":
    main()
