"""`mlx-internvl lora`: a thin shell over `mlx_internvl.lora.finetune`."""

import click

from mlx_internvl.lora import LoraConfig, TrainingArgs, finetune


def _targets(ctx, param, value):
    if value is None:
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("give comma-separated layer names, e.g. q_proj,v_proj")
    return names


@click.command(name="lora")
@click.option("--model", "model_path", required=True, help="Base model: MLX dir, HF dir (either layout) or hub id.")
@click.option("--data", multiple=True, required=True,
              help="Training data: jsonl (InternVL, ms-swift or OpenAI-style lines) or an InternVL meta .json. "
                   "Repeat to combine files.")
@click.option("--val", multiple=True, help="Validation data, same formats as --data.")
@click.option("--root", type=click.Path(), default=None,
              help="Directory image paths are relative to (default: each jsonl file's directory; a meta file's "
                   "'root').")
@click.option("--adapter-path", required=True, type=click.Path(), help="Where adapters and checkpoints go.")
@click.option("--resume", is_flag=True, help="Continue the run in --adapter-path from its last checkpoint.")
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=None, help="LoRA alpha; scale = alpha / rank.  [default: 2 x rank]")
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option("--targets", callback=_targets, default=None,
              help="Comma-separated linear layers of each decoder layer (e.g. q_proj,v_proj). Default: all but MoE "
                   "routers.")
@click.option("--num-layers", type=int, default=None, help="Adapt only the last N decoder layers (default: all).")
@click.option("--dora", is_flag=True, help="DoRA instead of LoRA (mlx-lm's DoRALinear).")
@click.option("--train-vision", is_flag=True, help="Also LoRA-adapt the vision encoder (qkv, proj, fc1, fc2).")
@click.option("--train-projector", type=click.Choice(["lora", "full"]), default=None,
              help="Also train the mlp1 projector, by LoRA or in full.")
@click.option("--quantize", "q_bits", type=click.Choice(["4", "8"]), default=None,
              help="QLoRA: quantize the base to 4 or 8 bits before training (an already quantized base is used "
                   "as is).")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Base weight dtype (default: the checkpoint's).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Samples per microbatch, per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Microbatches per optimizer step.")
@click.option("--lr", type=float, default=1e-4, show_default=True,
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
@click.option("--max-length", type=int, default=4096, show_default=True,
              help="Longer samples are cut after their images; a sample whose images do not fit is skipped.")
@click.option("--max-tiles", type=int, default=None,
              help="Tiles per image (default: the checkpoint's max_dynamic_patch), split over a sample's images.")
@click.option("--val-every", type=int, default=100, show_default=True)
@click.option("--val-batches", type=int, default=-1, show_default=True, help="-1: the whole validation set.")
@click.option("--save-every", type=int, default=100, show_default=True)
@click.option("--report-every", type=int, default=10, show_default=True)
@click.option("--keep-checkpoints", type=int, default=2, show_default=True)
@click.option("--grad-checkpoint", is_flag=True, help="Recompute layer activations in the backward pass.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-compile", is_flag=True, help="Run the training step uncompiled.")
@click.option("--skip-bad", is_flag=True, help="Train on the good samples and list the bad ones, instead of stopping.")
def command(model_path, data, val, root, adapter_path, resume, rank, alpha, dropout, targets, num_layers, dora,
            train_vision, train_projector, q_bits, q_group_size, dtype, batch_size, grad_accum, lr, min_lr, warmup,
            weight_decay, iters, epochs, max_length, max_tiles, val_every, val_batches, save_every, report_every,
            keep_checkpoints, grad_checkpoint, seed, no_compile, skip_bad, bias_correction):
    """Fine-tune an InternVL model with LoRA / QLoRA / DoRA. Run it under `mlx.launch` for data-parallel training
    on several processes or Macs."""
    lora = LoraConfig(rank=rank, alpha=2.0 * rank if alpha is None else alpha, dropout=dropout, targets=targets,
                      num_layers=num_layers, dora=dora, train_vision=train_vision, train_projector=train_projector)
    args = TrainingArgs(batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup, min_lr=min_lr,
                        weight_decay=weight_decay, iters=iters, epochs=epochs, max_length=max_length,
                        max_tiles=max_tiles, val_every=val_every, val_batches=val_batches, save_every=save_every,
                        report_every=report_every, grad_checkpoint=grad_checkpoint, seed=seed,
                        compile=not no_compile, keep_checkpoints=keep_checkpoints, skip_bad=skip_bad,
                        bias_correction=bias_correction)
    finetune(model_path, list(data), adapter_path, val=list(val) or None, root=root, lora=lora, args=args,
             resume=resume, quantize_bits=int(q_bits) if q_bits else None, q_group_size=int(q_group_size), dtype=dtype,
             log=click.echo)
