"""memo.integrations: Hugging Face, Accelerate and DeepSpeed glue."""
