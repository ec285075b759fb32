"""Checkpoint directory or Hugging Face id -> (tokenizer, model) on a device: which files
(`checkpoint`), which family (`family`), which device and dtype and whether it fits (`device`),
tensors into the model (`weights`), and `loader.load_model`, which does it all."""
