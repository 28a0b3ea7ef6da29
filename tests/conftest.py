import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path | None:
    """The official CaloChallenge binning XMLs (reference data beside the checkout, not shipped)."""
    for cand in (os.environ.get("CALOFAST_REFERENCE_DIR"), REPO.parent / "shared/reference/calochallenge-binning"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def tiny_geometry():
    """A 3 x 4 x 3 regular geometry for fast model tests."""
    from calofast.geometry import Geometry, Layer
    return Geometry("tiny", "electron", tuple(Layer(i, (0.0, 5.0, 10.0, 15.0), 4) for i in range(3)),
                    threshold_mev=0.01)
