"""The names of the losses' choices, declared apart from ``losses`` (which imports torch) so the
CLI's choices and help cost nothing at start-up."""

BACKENDS = ("auto", "triton", "torch")  # losses: fused Triton kernels on CUDA ("auto"), or forced
KD_LOSS_NAMES = ("kd", "binary_kl", "binary_kl_norm")  # losses.KD_LOSSES: name -> the loss ``NAME_loss``
