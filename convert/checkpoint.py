"""Reading a checkpoint directory: config, shard list, lazy tensors, and errors that name the file and key.

Tensors come from `mx.load`, which reads only the safetensors header up front; the data of each tensor is read when
it is first evaluated. That is what lets conversion stream shard by shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from mlx_internvl.errors import CheckpointError, UserError
from mlx_internvl.files import read_json

INDEX_NAME = "model.safetensors.index.json"


class Checkpoint:
    """A local directory with `config.json` and safetensors weights (single file, shards, or shards + index)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path}: no such directory")
        self.config = read_json(self.path / "config.json")
        self.key_to_file: Dict[str, Path] = {}
        self._tensors: Dict[Path, Dict[str, mx.array]] = {}
        self.metadata: Dict[Path, dict] = {}
        self.files = self._find_files()
        for f in self.files:
            for k in self._open(f):
                self.key_to_file.setdefault(k, f)
        self._check_index()

    def _find_files(self) -> List[Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            self.index = read_json(index)
            weight_map = self.index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: missing the 'weight_map' object")
            files = sorted({self.path / name for name in weight_map.values()})
            for f in files:
                if not f.exists():
                    keys = [k for k, v in weight_map.items() if self.path / v == f]
                    raise CheckpointError(
                        f"{f}: listed in {INDEX_NAME} (for {len(keys)} tensors, e.g. {keys[0]!r}) but missing. "
                        "Download the complete checkpoint again."
                    )
            return files
        self.index = None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {', '.join(bins)}; convert them to safetensors first)" if bins else ""
            raise CheckpointError(f"{self.path}: no *.safetensors weight files{hint}")
        return files

    def _open(self, f: Path) -> Dict[str, mx.array]:
        if f not in self._tensors:
            try:
                tensors, meta = mx.load(str(f), return_metadata=True)
            except Exception as e:  # mx.load raises RuntimeError/ValueError with the reason
                raise CheckpointError(
                    f"{f}: cannot read safetensors ({e}). The file is corrupt or truncated; download it again."
                ) from e
            self._tensors[f] = tensors
            self.metadata[f] = meta or {}
        return self._tensors[f]

    def _check_index(self) -> None:
        if not self.index:
            return
        for key, name in self.index["weight_map"].items():
            f = self.path / name
            if key not in self._open(f):
                raise CheckpointError(f"{f}: {INDEX_NAME} says it holds {key!r}, but it does not. The shard is stale.")

    def release(self) -> None:
        """Forget the lazy source arrays. Arrays already handed out keep working, and once an output that uses
        one is evaluated its source's memory can be freed instead of staying pinned here for the whole run."""
        self._tensors.clear()

    def keys(self) -> List[str]:
        return sorted(self.key_to_file)

    def file_of(self, key: str) -> Optional[Path]:
        return self.key_to_file.get(key)

    def get(self, key: str) -> mx.array:
        f = self.key_to_file.get(key)
        if f is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} not found in any weight file")
        return self._open(f)[key]
