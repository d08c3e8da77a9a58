import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from checkpoints import FAMILIES, build, build_deepseek_fp8, build_gpt_oss_mxfp4  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> path of a transformers-written checkpoint (built once per session)."""
    cache: dict[str, str] = {}

    def get(family: str, variant: str = "") -> str:
        key = family + variant
        if key not in cache:
            path = str(tmp_path_factory.mktemp(key) / "ckpt")
            if variant == "fp8":
                build_deepseek_fp8(path)
            elif variant == "mxfp4":
                build_gpt_oss_mxfp4(path)
            elif variant == "tied":
                build(family, path, tie_word_embeddings=True)
            elif variant == "packed":
                build(family, path, packed=True)
            else:
                build(family, path)
            cache[key] = path
        return cache[key]

    return get
