"""Model cards (`README.md` with the hub's YAML front matter) for what `convert`, `fuse` and `export` write.

An MLX directory gets `library_name: mlx`, the tags `mlx` and `internvl`, `pipeline_tag: image-text-to-text` and
`base_model` (the hub repo it came from, when that can be told), so the hub lists it with the other MLX InternVL
repos; the body says how it was made (the command) and how to run it. A Hugging Face export is a PyTorch
checkpoint, so its card says `library_name: transformers` instead and keeps the rest.
"""

from __future__ import annotations

import re
import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable, List, Optional

import yaml

CARD = "README.md"
_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[0-9a-f]+/?$")
_CONVERTED = re.compile(r"models/([^/]+?)--([^/]+)/[0-9a-f]+/?$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _version() -> str:
    try:
        return version("mlx-internvl")
    except PackageNotFoundError:
        return "unknown"


def front_matter(path: Path) -> dict:
    """The YAML front matter of the model card in directory `path` ({} when there is none or it is not YAML)."""
    card = Path(path) / CARD
    if not card.is_file():
        return {}
    text = card.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_model_of(spec, path: Optional[Path] = None) -> Optional[str]:
    """The hub repo a model came from: `spec` itself when it is a repo id that is not a local path, else the repo a
    hub-cache or conversion-cache path belongs to, else the `base_model` of a card in the directory."""
    text = str(spec)
    if _REPO_ID.match(text) and not Path(text).expanduser().exists():
        return text
    for candidate in (path, Path(text).expanduser()):
        if candidate is None:
            continue
        resolved = str(Path(candidate).expanduser().resolve())
        m = _SNAPSHOT.search(resolved) or _CONVERTED.search(resolved)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
        base = front_matter(Path(candidate)).get("base_model")
        if isinstance(base, list) and base:
            base = base[0]
        if isinstance(base, str) and _REPO_ID.match(base):
            return base
    return None


def _yaml_list(key: str, values: Iterable[str]) -> List[str]:
    return [f"{key}:"] + [f"- {v}" for v in values]


def render(*, name: str, how: str, command: str, base_model: Optional[str] = None, relation: Optional[str] = None,
           library: str = "mlx", notes: Iterable[str] = (), usage: Optional[str] = None) -> str:
    """The card text. `how` is one sentence on how it was made, `command` the command that made it, `usage` the
    block that runs it (default: mlx-internvl generate)."""
    tags = ["mlx", "internvl", "mlx-internvl"] if library == "mlx" else ["internvl", "mlx-internvl"]
    head = ["---", f"library_name: {library}", "pipeline_tag: image-text-to-text"]
    head += _yaml_list("tags", tags)
    if base_model:
        head.append(f"base_model: {base_model}")
        if relation:
            head.append(f"base_model_relation: {relation}")
    head.append("---")
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local checkpoint"
    if usage is None:
        usage = "\n".join([
            "```bash",
            "pip install mlx-internvl",
            f'mlx-internvl generate --model {name} --image image.jpg --prompt "Describe this image."',
            "```",
            "",
            "```python",
            "from mlx_internvl import load, generate",
            "",
            f'model, processor = load("{name}")',
            'print(generate(model, processor, "Describe this image.", ["image.jpg"]))',
            "```",
        ])
    body = [
        f"# {name}",
        "",
        f"{how} from {source} with [mlx-internvl](https://pypi.org/project/mlx-internvl/) {_version()}:",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    body += [f"- {n}" for n in notes]
    if notes:
        body.append("")
    body += ["## Use", "", usage, ""]
    return "\n".join(head + [""] + body)


def write(directory: Path, text: str) -> Path:
    path = Path(directory) / CARD
    path.write_text(text, encoding="utf-8")
    return path


def quantization_note(quantization: Optional[dict]) -> List[str]:
    if not quantization:
        return []
    return [f"Weights quantized to {quantization['bits']} bits ({quantization.get('mode', 'affine')}, group size "
            f"{quantization['group_size']}); layers without a `.scales` tensor stay in float."]


def shell_join(args: Iterable) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def for_convert(spec, src: Path, out: Path, *, upload_repo: Optional[str], dtype: Optional[str], quantization,
                quantize_model: bool, q_bits: int, q_group_size: int, quantize_vision: bool,
                source_layout: Optional[str] = None) -> str:
    """The card of `mlx-internvl convert SPEC OUT ...`."""
    args = ["mlx-internvl", "convert", spec, out]
    if dtype:
        args += ["--dtype", dtype]
    if quantize_model:
        args += ["-q", "--q-bits", q_bits, "--q-group-size", q_group_size] + (["--quantize-vision"] if
                                                                            quantize_vision else [])
    if upload_repo:
        args += ["--upload-repo", upload_repo]
    notes = quantization_note(quantization)
    if source_layout:
        notes.append(f"Source read as {source_layout}.")
    return render(name=upload_repo or Path(out).name, how="Converted to MLX", command=shell_join(args),
                  base_model=base_model_of(spec, src), relation="quantized" if quantization else None, notes=notes)


def for_fuse(model_spec, source: Path, adapter_path, out: Path, *, upload_repo: Optional[str], dequantize: bool,
             quantization) -> str:
    """The card of `mlx-internvl fuse` writing an MLX model."""
    args = ["mlx-internvl", "fuse", "--model", model_spec, "--adapter-path", adapter_path, "--save-path", out]
    if dequantize:
        args.append("--dequantize")
    if upload_repo:
        args += ["--upload-repo", upload_repo]
    return render(name=upload_repo or Path(out).name, how="LoRA adapters fused into the base model (MLX)",
                  command=shell_join(args), base_model=base_model_of(model_spec, source), relation="finetune",
                  notes=quantization_note(quantization))


def for_export(model_spec, source: Optional[Path], out: Path, *, layout: str, upload_repo: Optional[str],
               command: Optional[str] = None) -> str:
    """The card of a Hugging Face checkpoint written back from MLX (`export`, `fuse --export-hf`)."""
    name = upload_repo or Path(out).name
    if layout == "hf":
        usage = "\n".join([
            "```python",
            "from transformers import AutoProcessor, InternVLForConditionalGeneration",
            "",
            f'model = InternVLForConditionalGeneration.from_pretrained("{name}")',
            "```"])
    else:
        usage = "\n".join([
            "```python",
            "from transformers import AutoModel",
            "",
            f'model = AutoModel.from_pretrained("{name}", trust_remote_code=True)  # OpenGVLab\'s InternVLChatModel',
            "```"])
    if command is None:
        command = shell_join(["mlx-internvl", "export", model_spec, out, "--layout", layout]
                             + (["--upload-repo", upload_repo] if upload_repo else []))
    return render(name=name, how=f"Exported from MLX to a Hugging Face checkpoint ({layout} layout)",
                  command=command, base_model=base_model_of(model_spec, source), library="transformers",
                  usage=usage)
