"""Backbones as pure functions (BERT encoder, Llama/Qwen2 decoder), LoRA, HF import and PEFT export."""
