"""`finetune`: the whole of `mlx-internvl lora` as one library call (load, optionally quantize, train)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from mlx.utils import tree_flatten

from ..adapters import LoraConfig
from ..errors import UserError
from ..files import check_writable_dir
from ..loading import load
from ..validate import QUANT_GROUPS, check_training_args, choice
from ..weights import quantize
from .data import load_dataset
from .pairs import parse_pair
from .preference import PreferenceConfig
from .reference import check_same_layout
from .trainer import TrainingArgs, TrainResult, train

PathLike = Union[str, Path]


def finetune(model_path: PathLike, data: Union[PathLike, Sequence[PathLike]], adapter_path: PathLike,
             val: Optional[Union[PathLike, Sequence[PathLike]]] = None, root: Optional[PathLike] = None,
             lora: Optional[LoraConfig] = None, args: Optional[TrainingArgs] = None, resume: bool = False,
             quantize_bits: Optional[int] = None, q_group_size: int = 64, dtype: Optional[str] = None,
             on_step: Optional[Callable] = None, log: Callable[[str], None] = print,
             training_callback=None, preference: Optional[PreferenceConfig] = None) -> TrainResult:
    """Fine-tune the model at `model_path` (MLX dir, HF dir of either layout, or hub id) on `data` (jsonl files
    and/or InternVL meta json) and write adapters to `adapter_path`. `quantize_bits` (4 or 8) quantizes the base
    before training (QLoRA); a base converted with `--quantize` is used as it is. `training_callback` is an
    mlx-lm `TrainingCallback` (e.g. from `mlx_lm.tuner.callbacks.get_reporting_callbacks`). With `preference`
    (a `PreferenceConfig`: DPO, MPO or ORPO) `data` and `val` hold preference pairs (`pairs.py` lists the
    formats); its `reference_model` is loaded here, in `dtype`, after its tokens are checked against the model's."""
    if quantize_bits is not None:
        choice("--quantize", quantize_bits, (4, 8))
        choice("--q-group-size", q_group_size, QUANT_GROUPS)
    check_training_args(args or TrainingArgs())
    check_writable_dir(Path(adapter_path).expanduser(), "--adapter-path directory")
    (lora or LoraConfig()).validate()
    parse = {"parse": parse_pair} if preference else {}
    train_data = load_dataset(data, root, **parse)
    val_data = load_dataset(val, root, **parse) if val else None
    model, processor = load(model_path, dtype=dtype)
    reference_loader = None
    if preference is not None and preference.reference_model:
        where = preference.reference_model
        check_same_layout(processor, load(where, dtype=dtype, lazy=True)[1], where)  # lazy: no weights read
        reference_loader = partial(_load_reference, where, dtype)
    if quantize_bits:
        if model.config.quantization:
            log(f"{model_path} is already quantized ({model.config.quantization.get('bits')}-bit); "
                "--quantize is ignored.")
        else:
            model.config.quantization = quantize(model, quantize_bits, q_group_size)
            if not any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters())):
                raise UserError(f"--quantize {quantize_bits} --q-group-size {q_group_size}: no layer of this model "
                                f"can be quantized with groups of {q_group_size} (their input sizes are not "
                                "multiples of it); choose another --q-group-size")
    return train(model, processor, train_data, adapter_path, lora or LoraConfig(), args or TrainingArgs(),
                 val_data=val_data, resume=resume, base_model=str(model_path), on_step=on_step, log=log,
                 training_callback=training_callback, preference=preference, reference_loader=reference_loader)


def _load_reference(path, dtype):
    return load(path, dtype=dtype)[0]
