"""Distillation methods: the method objects with their published defaults (``base``,
``logit_methods``, ``feature_methods``; ``registry`` names them), the PyTorch reference losses,
the losses as ``torch.nn.Module``s, and the feature methods' connectors.

May import: ``kernels``, ``models`` and the base modules. Never ``store``, ``data``, ``training``,
``stages`` or ``cli``.
"""
