import pytest

from tandem.loader.gguf import convert_gguf


@pytest.fixture(scope="session")
def tiny_dir(tiny_gguf, tmp_path_factory) -> str:
    """The conftest's 2-layer random GGUF Llama as an HF folder: loads at once; its tokens mean
    nothing, but they must not depend on how the engine split the work."""
    dest = str(tmp_path_factory.mktemp("tiny") / "hf")
    convert_gguf(tiny_gguf, dest)
    return dest
