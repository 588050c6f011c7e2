"""Make PyPI's CUDA torchvision wheel importable next to CPU-only torch (vLLM test venv only).

Its compiled extension needs libtorch_cuda and is skipped, yet torchvision/_meta_registrations.py registers fake
kernels for ``torchvision::*`` ops, which fails when the op schemas do not exist. Defining the schemas first lets
``torchvision.transforms`` import; the detection ops themselves stay unusable (nothing here needs them).
"""
try:
    import torch

    _lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: F841 kept alive for the process
    for _schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        try:
            _lib.define(_schema)
        except RuntimeError:
            pass  # already defined (a working torchvision build)
except Exception:  # never break interpreter start-up
    pass
