"""The dual head's auxiliary-head kinds (``DualHead(aux_head=...)``): declared apart, torch-free,
so the CLI's choices cost nothing at start-up."""

AUX_HEADS = ("linear", "nonlinear")
