"""The logit store's codecs: how teacher logits are stored. Imports no torch, so the CLI's names
and help cost nothing at start-up."""

CODECS = ("fp16", "bf16", "fp32", "int8")
