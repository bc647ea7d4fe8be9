"""The environment pkt installs: a CPU torch never drags CUDA packages along."""

from __future__ import annotations

from importlib import metadata

import torch

from conftest import PROJECT_ROOT


def test_cpu_torch_comes_without_cuda_packages():
    if torch.version.cuda is not None:
        return  # a GPU user's own CUDA build legitimately brings nvidia-* packages
    nvidia = sorted(d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"].lower().startswith("nvidia"))
    assert nvidia == [], f"CPU torch {torch.__version__} but CUDA packages installed: {nvidia}"


def test_constraints_pin_torch_without_a_local_label():
    lines = (PROJECT_ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines
    assert not [line for line in lines if line.lower().startswith("nvidia")]
