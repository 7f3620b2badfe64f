"""`mlx-internvl lora`: a thin shell over `mlx_internvl.lora.finetune`.

mlx_lm.lora's spellings work too: `--learning-rate`, `--max-seq-length`, `--steps-per-report`, `--steps-per-eval`,
`--grad-accumulation-steps`, `--fine-tune-type`, `--train`, `--report-to`/`--project-name` (mlx-lm's reporting
callbacks: wandb, swanlab), `--data DIR` holding `train.jsonl` (and `valid.jsonl`), and `-c config.yaml` with
mlx-lm's keys or ours; options on the command line win over the file, as in mlx-lm.
"""

from pathlib import Path

import click
import yaml
from mlx_lm.tuner.callbacks import get_reporting_callbacks

from mlx_internvl.errors import UserError
from mlx_internvl.lora import LoraConfig, PreferenceConfig, TrainingArgs, finetune

from .options import adapter_option

# mlx-lm's YAML keys (and a few of its option names) -> this command's parameter names.
YAML_KEYS = {
    "model": "model_path", "learning_rate": "lr", "max_seq_length": "max_length", "steps_per_report": "report_every",
    "steps_per_eval": "val_every", "grad_accumulation_steps": "grad_accum", "quantize": "q_bits",
}
# mlx-lm keys that have no counterpart here and change nothing in what is trained: accepted with a note.
YAML_IGNORED = {
    "train": "training is what this command does", "test": "there is no test pass; use --val",
    "test_batches": "there is no test pass", "mask_prompt": "the loss always covers the answers only",
    "clear_cache_threshold": "not needed", "trust_remote_code": "no remote code is ever run",
    "optimizer_config": "AdamW with --weight-decay is used", "wandb": "use report_to",
}


def _read_config(ctx, param, value):
    """`-c FILE`: the YAML file's options become this command's defaults (the command line still wins)."""
    if not value:
        return value
    try:
        with open(value, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"{value}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{value}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{value}: expected a mapping of option names to values, got {type(data).__name__}")
    names = {p.name for p in ctx.command.params}
    defaults, unknown = {}, []
    for key, v in data.items():
        k = str(key).replace("-", "_")
        if k in YAML_IGNORED:
            click.echo(f"{value}: ignoring {key!r} ({YAML_IGNORED[k]})", err=True)
            continue
        if k == "lora_parameters" and isinstance(v, dict):
            for sub, sv in v.items():
                if sub == "keys":
                    defaults["targets"] = ",".join(str(t).split(".")[-1] for t in sv)
                elif sub in ("rank", "dropout"):
                    defaults[sub] = sv
                elif sub == "scale":
                    defaults["lora_scale"] = float(sv)
                else:
                    unknown.append(f"lora_parameters.{sub}")
            continue
        if k == "optimizer":
            if str(v).lower() != "adamw":
                raise UserError(f"{value}: optimizer {v!r}: only adamw is implemented")
            continue
        if k == "lr_schedule" and isinstance(v, dict):
            if "warmup" in v:
                defaults["warmup"] = int(v["warmup"])
            continue
        k = YAML_KEYS.get(k, k)
        if k not in names or k in ("config",):
            unknown.append(str(key))
            continue
        if k in ("data", "val") and not isinstance(v, (list, tuple)):
            v = [v]
        if k == "q_bits" and v is not None:
            v = str(v)
        defaults[k] = v
    if unknown:
        raise UserError(f"{value}: unknown option(s) {', '.join(sorted(unknown))}; see `mlx-internvl lora --help`")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _targets(ctx, param, value):
    if value is None:
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("give comma-separated layer names, e.g. q_proj,v_proj")
    return names


@click.command(name="lora")
@click.option("-c", "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_read_config, help="A YAML file of options (mlx-lm's keys or these options' names).")
@click.option("--model", "model_path", required=True, help="Base model: MLX dir, HF dir (either layout) or hub id.")
@click.option("--data", multiple=True, required=True,
              help="Training data: jsonl (InternVL, ms-swift or OpenAI-style lines) or an InternVL meta .json. "
                   "Repeat to combine files. A directory means its train.jsonl (and valid.jsonl), as in mlx-lm.")
@click.option("--val", multiple=True, help="Validation data, same formats as --data.")
@click.option("--root", type=click.Path(), default=None,
              help="Directory image paths are relative to (default: each jsonl file's directory; a meta file's "
                   "'root').")
@adapter_option(required=True, help="Where adapters and checkpoints go.")
@click.option("--resume", is_flag=True, help="Continue the run in --adapter-path from its last checkpoint.")
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=None, help="LoRA alpha; scale = alpha / rank.  [default: 2 x rank]")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--targets", callback=_targets, default=None,
              help="Comma-separated linear layers of each decoder layer (e.g. q_proj,v_proj). Default: all but MoE "
                   "routers.")
@click.option("--num-layers", type=int, default=None, help="Adapt only the last N decoder layers (default: all).")
@click.option("--dora", is_flag=True, help="DoRA instead of LoRA (mlx-lm's DoRALinear).")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora"]), default=None,
              help="mlx-lm's spelling: dora is --dora.")
@click.option("--train-vision", is_flag=True, help="Also LoRA-adapt the vision encoder (qkv, proj, fc1, fc2).")
@click.option("--train-projector", type=click.Choice(["lora", "full"]), default=None,
              help="Also train the mlp1 projector, by LoRA or in full.")
@click.option("--train-flash", type=click.Choice(["mlp2", "router"]), default=None,
              help="InternVL3.5-Flash: a stage of ViCO instead of SFT's loss. mlp2: consistency training (random "
                   "tiles through mlp2 at 64 tokens, KL to the checkpoint at full resolution; trains mlp2 and the "
                   "adapters). router: the router alone, on labels from what compressing each tile costs the "
                   "answer. [default: the router and mlp2 stay frozen]")
@click.option("--flash-percentile", type=float, default=50.0, show_default=True,
              help="--train-flash router: a tile whose loss ratio is below this percentile of the window is "
                   "labelled compress.")
@click.option("--flash-window", type=int, default=2048, show_default=True,
              help="--train-flash router: how many of the latest loss ratios the percentile is taken over.")
@click.option("--quantize", "q_bits", type=click.Choice(["4", "8"]), default=None,
              help="QLoRA: quantize the base to 4 or 8 bits before training (an already quantized base is used "
                   "as is).")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Base weight dtype (default: the checkpoint's).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Samples per microbatch, per process.")
@click.option("--grad-accum", "--grad-accumulation-steps", "grad_accum", type=int, default=1, show_default=True,
              help="Microbatches per optimizer step.")
@click.option("--lr", "--learning-rate", "lr", type=float, default=1e-4, show_default=True,
              help="Peak learning rate of AdamW, with bias correction as torch.optim.AdamW (so rates from upstream "
                   "InternVL / XTuner / ms-swift recipes carry over).")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="Adam bias correction. --no-bias-correction is MLX's default AdamW, whose first ~100 steps are "
                   "several times larger than --lr.")
@click.option("--min-lr", type=float, default=0.0, show_default=True, help="Where the cosine decay ends.")
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warmup, in optimizer steps.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--iters", type=int, default=None, help="Optimizer steps (default: one epoch, or --epochs).")
@click.option("--epochs", type=float, default=None)
@click.option("--max-length", "--max-seq-length", "max_length", type=int, default=4096, show_default=True,
              help="Longer samples are cut after their images; a sample whose images do not fit is skipped.")
@click.option("--max-tiles", type=int, default=None,
              help="Tiles per image (default: the checkpoint's max_dynamic_patch), split over a sample's images.")
@click.option("--val-every", "--steps-per-eval", "val_every", type=int, default=100, show_default=True)
@click.option("--val-batches", type=int, default=-1, show_default=True, help="-1: the whole validation set.")
@click.option("--save-every", type=int, default=100, show_default=True)
@click.option("--report-every", "--steps-per-report", "report_every", type=int, default=10, show_default=True)
@click.option("--report-to", default=None,
              help="Also log the losses through mlx-lm's reporting callbacks: wandb, swanlab, or wandb,swanlab.")
@click.option("--project-name", default=None, help="Project name for --report-to (default: the adapter directory's).")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True)
@click.option("--grad-checkpoint", is_flag=True, help="Recompute layer activations in the backward pass.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-compile", is_flag=True, help="Run the training step uncompiled.")
@click.option("--skip-bad", is_flag=True, help="Train on the good samples and list the bad ones, instead of stopping.")
@click.option("--train-mode", type=click.Choice(["sft", "dpo", "orpo", "mpo"]), default="sft", show_default=True,
              help="sft: answers of conversations. dpo / orpo / mpo: preference pairs (chosen vs rejected); mpo is "
                   "InternVL's recipe, DPO sigmoid 0.8 + bco_pair 0.2 + rpo-alpha 1.0.")
@click.option("--beta", type=float, default=None, help="DPO/MPO beta; ORPO's lambda.  [default: 0.1]")
@click.option("--loss-type", default=None,
              help="DPO loss: sigmoid, hinge, ipo or bco_pair; several with weights as 'sigmoid:0.8,bco_pair:0.2'. "
                   "[default: sigmoid; mpo: sigmoid:0.8,bco_pair:0.2]")
@click.option("--rpo-alpha", type=float, default=None,
              help="Add this times the chosen answers' cross-entropy to the DPO loss.  [default: none; mpo: 1.0]")
@click.option("--reference-model", default=None,
              help="dpo / mpo: another checkpoint as the reference (same tokenizer and image-token layout). "
                   "[default: the model itself with its adapters off]")
@click.option("--precompute-ref-logps", is_flag=True,
              help="dpo / mpo: compute the reference log-probs of every pair once up front and store them with the "
                   "run (reused by --resume), instead of a reference forward pass per step.")
@click.option("--train", "train_flag", is_flag=True, hidden=True, help="Accepted for mlx-lm compatibility.")
@click.option("--lora-scale", "lora_scale", type=float, default=None, hidden=True,
              help="mlx-lm's lora_parameters.scale (= alpha / rank).")
def command(model_path, data, val, root, adapter_path, resume, rank, alpha, dropout, targets, num_layers, dora,
            fine_tune_type, train_vision, train_projector, train_flash, flash_percentile, flash_window, q_bits,
            q_group_size, dtype, batch_size, grad_accum, lr,
            min_lr, warmup, weight_decay, iters, epochs, max_length, max_tiles, val_every, val_batches, save_every,
            report_every, report_to, project_name, keep_checkpoints, grad_checkpoint, seed, no_compile, skip_bad,
            train_flag, lora_scale, bias_correction, train_mode, beta, loss_type, rpo_alpha, reference_model,
            precompute_ref_logps):
    """Fine-tune an InternVL model with LoRA / QLoRA / DoRA. Run it under `mlx.launch` for data-parallel training
    on several processes or Macs."""
    data, val = _data_dirs(list(data), list(val))
    preference = None
    if train_mode != "sft":
        preference = PreferenceConfig.make(train_mode, beta, loss_type, rpo_alpha, reference_model,
                                           precompute_ref_logps)
    elif beta is not None or loss_type or rpo_alpha is not None or reference_model or precompute_ref_logps:
        raise UserError("--beta, --loss-type, --rpo-alpha, --reference-model and --precompute-ref-logps need a "
                        "preference --train-mode (dpo, orpo or mpo)")
    if alpha is None:
        alpha = lora_scale * rank if lora_scale is not None else 2.0 * rank
    lora = LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets, num_layers=num_layers,
                      dora=dora or fine_tune_type == "dora", train_vision=train_vision,
                      train_projector=train_projector, train_flash=train_flash)
    args = TrainingArgs(batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup, min_lr=min_lr,
                        weight_decay=weight_decay, iters=iters, epochs=epochs, max_length=max_length,
                        max_tiles=max_tiles, val_every=val_every, val_batches=val_batches, save_every=save_every,
                        report_every=report_every, grad_checkpoint=grad_checkpoint, seed=seed,
                        compile=not no_compile, keep_checkpoints=keep_checkpoints, skip_bad=skip_bad,
                        bias_correction=bias_correction, flash_percentile=flash_percentile,
                        flash_window=flash_window)
    callback = _reporting_callback(report_to, project_name, adapter_path, {**vars(lora), **vars(args)})
    finetune(model_path, data, adapter_path, val=val or None, root=root, lora=lora, args=args,
             resume=resume, quantize_bits=int(q_bits) if q_bits else None, q_group_size=int(q_group_size), dtype=dtype,
             log=click.echo, training_callback=callback, preference=preference)


def _data_dirs(data, val):
    """mlx-lm's `--data DIR`: DIR/train.jsonl to train on, and DIR/valid.jsonl to validate on unless --val is given."""
    files = []
    for d in data:
        p = Path(d)
        if not p.is_dir():
            files.append(d)
            continue
        if not (p / "train.jsonl").is_file():
            raise UserError(f"--data {d}: a directory must hold train.jsonl (and may hold valid.jsonl), as in mlx-lm")
        files.append(str(p / "train.jsonl"))
        if not val and (p / "valid.jsonl").is_file():
            val = [str(p / "valid.jsonl")]
    return files, val


def _reporting_callback(report_to, project_name, adapter_path, config):
    """mlx-lm's `get_reporting_callbacks` (wandb, swanlab), with its errors as one-line user errors."""
    if not report_to:
        return None
    log_dir = str(Path(adapter_path).expanduser())
    try:
        return get_reporting_callbacks(report_to, project_name=project_name or Path(log_dir).name, log_dir=log_dir,
                                       config={k: v for k, v in config.items() if isinstance(v, (int, float, str,
                                                                                                 bool, list,
                                                                                                 type(None)))})
    except ImportError as e:
        raise UserError(f"--report-to {report_to}: {e}") from None
    except ValueError as e:
        raise UserError(f"--report-to {report_to}: {e}") from None
