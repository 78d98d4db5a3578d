"""Fine-tuning on the workers: the LoRA trainer (torch) and the train worker that runs its jobs
(`gpuhost worker --queue train`). The torch-free side (datasets, job records, the service the
gateway calls) is `tuning/`."""
