"""nrexp: experiments on normalization and regularization in deep networks."""

from pathlib import Path

__version__ = "0.1.0"


def config_dir() -> str:
    """Where Hydra finds configs/: inside the package when installed from a wheel, else the repo's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"nrexp: configs/train.yaml not found next to {here}; reinstall nrexp")
