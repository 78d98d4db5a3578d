"""A fine-tune's training settings (pydantic only: the gateway checks them without torch)."""

from pydantic import BaseModel, ConfigDict, Field


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(500, ge=1, le=20_000)
    rank: int = Field(8, ge=1, le=128)
    learning_rate: float = Field(1e-4, gt=0, le=1e-2, allow_inf_nan=False)
    batch_size: int = Field(1, ge=1, le=16)
    resolution: int | None = Field(None, ge=64, le=2048, multiple_of=8)  # None: the model's
    seed: int = Field(0, ge=0, lt=2**63)
    checkpoint_every: int = Field(100, ge=1, le=20_000)
