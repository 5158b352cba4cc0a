"""Fine-tuning: ADGEN data, LoRA, the Trainer, distributed plans and YAML recipes."""
